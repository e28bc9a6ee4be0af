"""Byte sizes in and out: "4GB" -> 4_000_000_000 and back to "4.00 GB"."""
import math
import re

from .errors import BudgetError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: "int | float | str", what: str = "memory_budget") -> int:
    """4_000_000_000, "4GB", "4 GiB", "512MB" -> bytes. A fraction of a byte ("4.5", 0.5) is refused: 4.5 meant
    4.5 GB more likely than 4 bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value) \
            and value == int(value):
        return int(value)
    m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in UNITS:
        raise BudgetError(f"{what} {value!r} is not a size; use bytes or a string like '4GB' or '512MiB'.")
    if float(m.group(1)) <= 0:
        raise BudgetError(f"{what} {value!r}: a size must be more than 0 bytes; use one like '4GB' or '512MiB'.")
    if UNITS[m.group(2).upper()] == 1 and float(m.group(1)) != int(float(m.group(1))):
        raise BudgetError(f"{what} {value!r} is a fraction of a byte; give a unit, like '{m.group(1)}GB', or whole "
                          "bytes.")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def per_token(seconds: float) -> str:
    """A decoding rate the way people read it: tokens per second, or seconds per token below one."""
    return f"{1 / seconds:.1f} tokens/s" if 0 < seconds < 1 else f"{seconds:.2f} s/token"
