"""mx.distributed as the pipeline's transport (airmlx/pipeline_link.py): point-to-point send/recv between
neighbouring ranks of the ring mlx.launch sets up (or JACCL over Thunderbolt, where the MLX build has it).

mx.distributed.recv has no timeout: a receive that hangs is ended by airmlx's watchdog (times_out = False).
Each send and receive is evaluated on its own, in order: two receives evaluated together may run in either
order and take each other's bytes.
"""
import mlx.core as mx
import numpy as np

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "int64": mx.int64,
          "int32": mx.int32, "uint8": mx.uint8, "uint32": mx.uint32, "bool": mx.bool_}


class MLXTransport:
    name = "mlx"
    times_out = False  # airmlx's watchdog ends a receive that passes its deadline

    def __init__(self):
        self.group = mx.distributed.init(strict=True)
        self.rank, self.size = self.group.rank(), self.group.size()

    def describe(self, x) -> tuple:
        """(shape, dtype name, is numpy) of an mx.array for the receiver."""
        return [*x.shape], str(x.dtype).rpartition(".")[2], False

    def send(self, x, dst: int, wait: bool = True) -> None:
        """Small sends return at once (the socket buffers them), so wait=False needs nothing more."""
        if isinstance(x, np.ndarray):
            x = mx.array(x)
        mx.eval(mx.distributed.send(x, dst, group=self.group, stream=mx.cpu))

    def flush(self, timeout: float) -> None:
        pass  # sends are written to the socket before they return

    def recv(self, shape: tuple, dtype: str, src: int, timeout: float, is_numpy: bool):
        """An mx.array (or numpy, is_numpy) from rank src. timeout: unused, see times_out."""
        kind = np.dtype(dtype).name if is_numpy else dtype
        x = mx.distributed.recv(shape, DTYPES[kind], src, group=self.group, stream=mx.cpu)
        mx.eval(x)
        return np.array(x) if is_numpy else x

    def all_gather(self, row: np.ndarray) -> np.ndarray:
        """(size, len(row)): every rank's row, in rank order."""
        out = mx.distributed.all_gather(mx.array(row)[None], group=self.group, stream=mx.cpu)
        mx.eval(out)
        return np.array(out)

    def close(self) -> None:
        pass  # the group lives as long as the process
