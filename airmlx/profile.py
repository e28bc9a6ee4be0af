"""Where the time goes: a table and a chart of the scheduler's per-stage, per-step records.

With `profiling_mode=True` the scheduler appends one StageRecord(step, stage, bytes_read, read_s, wait_s,
load_s, compute_s) per stage and step:

- read_s: how long reading the stage's bytes took (on the prefetch thread for streamed stages, so it may
  overlap compute; 0 when the stage was already in memory),
- wait_s: how long the sweep stood still waiting for those bytes (the part of the read prefetching did not
  hide; without prefetching, the whole read),
- load_s: turning the bytes into the framework's tensors (a copy on MLX, views on torch CPU),
- compute_s: running the stage.

`report(records)` sums and averages them per stage and says whether the run was disk-bound or
compute-bound; `plot(records)` draws the same as stacked horizontal bars (matplotlib: `pip install
'airmlx[plot]'`). Imports neither mlx, torch nor matplotlib at module level.
"""
from dataclasses import dataclass

from .errors import AirmlxError
from .units import format_bytes


class ProfilingError(AirmlxError, RuntimeError):
    """No profile to show: the model was loaded without profiling_mode=True, or nothing ran yet."""


@dataclass
class StageTotals:
    stage: str
    steps: int = 0  # sweeps this stage ran in
    reads: int = 0  # times its bytes were read from disk
    bytes_read: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0
    load_s: float = 0.0
    compute_s: float = 0.0

    @property
    def busy_s(self):
        """Time the sweep spent on this stage: waiting for its bytes, loading them, running it."""
        return self.wait_s + self.load_s + self.compute_s


def summarize(records):
    """Per-stage totals in sweep order (the order stages first appear in the records)."""
    stages = {}
    for r in records:
        t = stages.get(r.stage)
        if t is None:
            t = stages[r.stage] = StageTotals(r.stage)
        t.steps += 1
        t.reads += 1 if r.bytes_read else 0
        t.bytes_read += r.bytes_read
        t.read_s += r.read_s
        t.wait_s += r.wait_s
        t.load_s += r.load_s
        t.compute_s += r.compute_s
    return list(stages.values())


def verdict(totals):
    """("disk-bound" | "compute-bound", one-line reason) from per-stage totals."""
    wait = sum(t.wait_s for t in totals)
    compute = sum(t.compute_s for t in totals)
    busy = sum(t.busy_s for t in totals) or 1e-12
    if wait > compute:
        return "disk-bound", (f"the sweep waited {wait / busy:.0%} of its time for stage reads "
                              f"(compute {compute / busy:.0%}): a faster disk, a larger memory_budget or "
                              "quantised weights would help")
    if all(t.reads <= 1 < t.steps for t in totals):  # one step cannot tell a stage kept from one streamed
        return "compute-bound", (f"compute took {compute / busy:.0%} of the sweep's time; every stage was read "
                                 "once and stayed resident")
    return "compute-bound", (f"compute took {compute / busy:.0%} of the sweep's time (waiting for reads "
                             f"{wait / busy:.0%}): the reads keep up with compute")


def _ms(seconds):
    return f"{seconds * 1e3:.2f}"


def report(records):
    """A table per stage (reads, bytes read, read / wait / load / compute time, totals and per step)
    and a totals line that says whether the run was disk-bound or compute-bound."""
    records = list(records)
    if not records:
        return "profile: nothing recorded yet (run generate first)."
    totals = summarize(records)
    steps = len({r.step for r in records})
    head = ("stage", "steps", "reads", "bytes read", "read ms", "wait ms", "load ms", "compute ms", "ms/step")
    row = lambda t, n: (t.stage, str(t.steps), str(t.reads), format_bytes(t.bytes_read), _ms(t.read_s),
                        _ms(t.wait_s), _ms(t.load_s), _ms(t.compute_s), _ms(t.busy_s / max(n, 1)))
    rows = [row(t, t.steps) for t in totals]
    sums = StageTotals("total", steps, sum(t.reads for t in totals), sum(t.bytes_read for t in totals),
                       sum(t.read_s for t in totals), sum(t.wait_s for t in totals),
                       sum(t.load_s for t in totals), sum(t.compute_s for t in totals))
    n = max(steps, 1)
    rows.append(row(sums, n))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt(head))
    lines = [f"profile: {steps} step(s), {len(totals)} stages; times summed over steps, ms/step = "
             "(wait + load + compute) per step", fmt(head), rule]
    lines += [fmt(r) for r in rows[:-1]] + [rule, fmt(rows[-1])]
    kind, why = verdict(totals)
    bandwidth = (f", {format_bytes(sums.bytes_read / sums.read_s)}/s while reading" if sums.read_s > 0 else "")
    lines.append(f"totals: {format_bytes(sums.bytes_read / n)} read per step{bandwidth}; "
                 f"{_ms(sums.busy_s / n)} ms per step; {kind}: {why}.")
    return "\n".join(lines)


def plot(records, ax=None):
    """Stacked horizontal bars, one per stage, in milliseconds per step: the read hidden by prefetching,
    the wait for the read, the load and the compute. Returns the matplotlib Figure."""
    try:
        import matplotlib
        if ax is None:
            import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("profile plots need matplotlib: pip install 'airmlx[plot]' (or pip install matplotlib)."
                          ) from None
    del matplotlib
    records = list(records)
    if not records:
        raise ProfilingError("nothing recorded yet: run generate before plotting the profile.")
    totals = summarize(records)
    steps = len({r.step for r in records})
    per_step = lambda attr: [getattr(t, attr) / max(t.steps, 1) * 1e3 for t in totals]
    read, wait, load, compute = (per_step(a) for a in ("read_s", "wait_s", "load_s", "compute_s"))
    hidden = [max(r - w, 0.0) for r, w in zip(read, wait)]  # read time prefetching overlapped with compute
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(totals) + 1.6))
    else:
        fig = ax.figure
    names = [t.stage for t in totals]
    y = list(range(len(names)))
    left = [0.0] * len(names)
    for values, label, color in ((wait, "wait for read", "tab:red"), (load, "load", "tab:orange"),
                                 (compute, "compute", "tab:blue"), (hidden, "read hidden by prefetch", "tab:gray")):
        ax.barh(y, values, left=left, label=label, color=color, alpha=0.45 if label.startswith("read") else 0.9)
        left = [a + b for a, b in zip(left, values)]
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # sweep order top to bottom
    ax.set_xlabel("milliseconds per step")
    kind, _ = verdict(totals)
    ax.set_title(f"airmlx profile: {len(names)} stages, {steps} step(s), {kind}")
    ax.legend(loc="best", fontsize="small", framealpha=0.8)
    fig.tight_layout()
    return fig


def _records_of(model):
    scheduler = model.scheduler
    if not scheduler.profiling:
        raise ProfilingError("this model was loaded without profiling; pass profiling_mode=True to "
                             "AutoModel.from_pretrained (or --profile on the command line).")
    return scheduler.records


def model_report(model, show=True):
    """model.profile_report(): the table, printed unless show=False (with speculative decoding's draft and
    verify time after it)."""
    text = report(_records_of(model))
    speculation = getattr(model, "speculation", None)
    if speculation is not None and speculation.total.sweeps:
        text += "\n" + speculation.total.line()
    if show:
        print(text)
    return text


def model_plot(model, ax=None):
    """model.profile_plot(): the Figure."""
    return plot(_records_of(model), ax=ax)
