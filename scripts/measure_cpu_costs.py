"""Two CPU costs the README and BENCHMARKS.md quote, measured on this machine:

    python scripts/measure_cpu_costs.py

1. oneDNN's kernel caches: the resident memory a bf16 linear leaves behind for each new row count (1..128), with
   the caches as `import airmlx` sets them (32 each), as torch leaves them (1024 each) and off; and the time of a
   call whose kernel is not kept. torch keeps such kernels only where it runs bf16 matmuls through oneDNN
   (CPUs with AVX-512); elsewhere every column reads about 0.
2. The sharder's fp8 dequantiser: weights per second for a DeepSeek-V3-sized (7168 x 18432) weight, written with
   its sha256 as the stage writer does.
3. torch's packed int4 CPU kernel (a 4-bit stage's decode-step matmul, one row) against a dense linear, with fp32,
   bf16 and fp16 activations: where torch vectorises it for bf16 only (AVX2 CPUs), fp32 and fp16 run far slower,
   which is why a draft model computes in bf16 on the CPU.
"""
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE_PROBE = """
import time, torch
from pathlib import Path
def anon():
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
torch.set_num_threads(2)
w = torch.randn(2048, 512, dtype=torch.bfloat16)
xs = [torch.randn(m, 512, dtype=torch.bfloat16) for m in range(1, 129)]
base = anon()
for x in xs:
    torch.nn.functional.linear(x, w)
grown = (anon() - base) / 1024
t = time.perf_counter()
for x in xs[:64]:
    torch.nn.functional.linear(x, w)
print(f"{grown:.0f} MB after 128 row counts; 64 of them again in {(time.perf_counter() - t) * 1e3:.1f} ms")
"""


def caches():
    print(f"torch CPU capability: {__import__('torch').backends.cpu.get_cpu_capability()}")
    for label, size in [("airmlx's 32", "32"), ("torch's 1024", "1024"), ("off", None)]:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
               "LRU_CACHE_CAPACITY": size or "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": size or "0"}
        out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, timeout=300)
        print(f"  caches {label:>13}: {out.stdout.strip() or out.stderr.strip()[-300:]}")


def fp8():
    import numpy as np

    from airmlx.relayout import Fp8Blocks, fp8_rows
    from airmlx.tensorfile import TensorInfo
    rows, cols = 7168, 18432
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    (folder / "codes").write_bytes(rng.integers(0, 126, (rows, cols), dtype=np.uint8).tobytes())
    scales = rng.random((rows // 128, cols // 128), dtype=np.float32)
    (folder / "scales").write_bytes(scales.tobytes())
    info = Fp8Blocks("w", "BF16", (rows, cols), 0, rows * cols, fp8="F8_E4M3", block=(128, 128),
                     scale=(folder / "scales", 0, TensorInfo("s", "F32", scales.shape, 0, scales.nbytes)))
    for _ in range(3):
        t = time.perf_counter()
        digest = hashlib.sha256()
        with open(folder / "out", "wb") as f:
            for piece in fp8_rows(folder / "codes", 0, info):
                f.write(piece.data)
                digest.update(piece.data)
        took = time.perf_counter() - t
        print(f"  fp8 dequantiser: {rows * cols / 1e6:.0f} M weights written in {took:.2f} s = "
              f"{rows * cols / took / 1e6:.0f} M weights/s")
    for name in ("codes", "scales", "out"):
        (folder / name).unlink()
    folder.rmdir()


def int4(shapes=((192, 192), (2048, 192), (1024, 1024), (4096, 4096)), group=64):
    import torch
    torch.set_num_threads(1)

    def per_call(f, seconds=0.2):
        f()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            f()
            n += 1
        return (time.perf_counter() - t) / n * 1e6

    print(f"  int4 kernel, one row, one thread (us per call: int4 / dense) on {torch.backends.cpu.get_cpu_capability()}")
    for n, k in shapes:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        line = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x, w = torch.randn(1, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            scales = torch.rand(k // group, n, 2, dtype=dtype)
            kernel = per_call(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales))
            dense = per_call(lambda: torch.nn.functional.linear(x, w))
            line.append(f"{str(dtype)[6:]} {kernel:.0f} / {dense:.0f}")
        print(f"    {n:>5} x {k:<5} " + ", ".join(line))


if __name__ == "__main__":
    caches()
    fp8()
    int4()
