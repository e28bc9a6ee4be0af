"""torch.distributed as the pipeline's transport (airmlx/pipeline_link.py): point-to-point send/recv between
neighbouring ranks, over the process group torchrun sets up: gloo for a model on the CPU, NCCL for one on CUDA.

gloo's receives time out by themselves (times_out); its sends wait until the receiver takes them, so small
messages that must not wait (pings) go with isend and are kept until done. NCCL (untested here: no GPUs) has no
per-receive timeout: airmlx's watchdog covers it.
"""
import datetime

import numpy as np
import torch
import torch.distributed as dist

PENDING_LIMIT = 64  # pings in flight before the oldest are waited for


class TorchTransport:
    name = "torch"

    def __init__(self, device=None, startup_timeout: float = 600.0):
        device = torch.device(device or "cpu")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(device)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=startup_timeout))
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.times_out = backend == "gloo"
        self.pending = []  # (work, tensor) of sends made with wait=False

    def describe(self, x) -> tuple:
        return [*x.shape], str(x.dtype).rpartition(".")[2], False

    def send(self, x, dst: int, wait: bool = True) -> None:
        t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.contiguous()
        t = t.to(self.device)
        if wait:
            dist.send(t, dst)
            for work, _ in self.pending:  # sent before, so taken before
                work.wait()
            self.pending.clear()
            return
        self.pending.append((dist.isend(t, dst), t))
        if len(self.pending) > PENDING_LIMIT:
            self.pending.pop(0)[0].wait()

    def flush(self, timeout: float) -> None:
        """Wait up to timeout seconds for the sends made with wait=False to be taken (an abort before exiting)."""
        for work, _ in self.pending:
            try:
                work.wait(timeout=datetime.timedelta(seconds=timeout))
            except RuntimeError:
                return

    def recv(self, shape: tuple, dtype: str, src: int, timeout: float, is_numpy: bool):
        kind = torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype if is_numpy else getattr(torch, dtype)
        t = torch.empty(shape, dtype=kind, device=self.device)
        work = dist.irecv(t, src)
        if self.times_out:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
        else:
            work.wait()
        return t.cpu().numpy() if is_numpy else t

    def all_gather(self, row: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(row)).to(self.device)
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t)
        return np.stack([o.cpu().numpy() for o in out])

    def close(self) -> None:
        # the process group stays for the process (as MLX's does): a later model reuses it
        self.pending.clear()
