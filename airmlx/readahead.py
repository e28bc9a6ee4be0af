"""Read-ahead hints: the OS starts reading a stage file into its page cache before the sweep needs it.

Where the budget leaves no room for a prefetch slot, the disk reads stage i + 1 while stage i computes; before a
speculative round's drafting it reads the first stages of the sweep that will verify it. The scheduler chooses the
stages (schedule.hinted_stages: on Linux not those mapped in huge pages). A hint holds no memory of the process:
the pages are the page cache's, which the OS gives back under pressure, and the stage is still mapped or read (and
counted) only when its turn comes. The calls run on a daemon thread of their own, as a large hint may take a while
to queue. Linux: posix_fadvise(WILLNEED); macOS: fcntl(F_RDADVISE); elsewhere hints do nothing.
"""
import os
import queue
import struct
import sys
import threading
from pathlib import Path

F_RDADVISE = 44  # macOS <sys/fcntl.h>; its argument is struct radvisory {off_t ra_offset; int ra_count;}


def advise(path: Path, nbytes: int) -> bool:
    """Ask the OS to read the first nbytes of a file ahead. A hint: failures are the later read's to report."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_WILLNEED)
            return True
        if sys.platform == "darwin":
            import fcntl
            fcntl.fcntl(fd, F_RDADVISE, struct.pack("qi4x", 0, min(nbytes, 2**31 - 1)))
            return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


class ReadAhead:
    """Hints made in order on one daemon thread, started on the first hint."""

    def __init__(self):
        self._queue, self._thread = queue.SimpleQueue(), None
        self.hinted_bytes = 0  # bytes asked for so far (a platform without hints counts them too)

    def hint(self, files: list) -> None:
        """files: [(path, bytes from its start)], in the order they will be read."""
        if not files:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="airmlx-readahead", daemon=True)
            self._thread.start()
        for path, nbytes in files:
            self.hinted_bytes += nbytes
            self._queue.put((path, nbytes))

    def _run(self):
        while (item := self._queue.get()) is not None:
            advise(*item)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
