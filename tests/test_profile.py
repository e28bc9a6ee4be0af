"""profiling_mode: the per-stage report, the plot, the CLI's --profile, and the errors when it is off."""
import re
import sys

import pytest

import airmlx
from airmlx.profile import ProfilingError, plot, report, summarize, verdict
from airmlx.schedule import StageRecord
from airmlx.units import format_bytes

PROMPT = [5, 17, 33, 2, 9, 60, 7]
STEPS = 4


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    from tiny import make_checkpoint
    folder = tmp_path_factory.mktemp("prof")
    make_checkpoint(folder / "src", "llama")
    shards = airmlx.shard_checkpoint(folder / "src", folder / "shards", progress=False)
    sizes = {}
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="1GB") as probe:
        sizes = dict(probe.plan.stage_bytes)
    layer = max(v for k, v in sizes.items() if k.startswith("layer"))
    budget = sizes["embed"] + sizes["head"] + int(1.5 * layer)  # head and embedding resident, layers streamed
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget=budget, profiling_mode=True) as m:
        assert m.plan.streamed and set(m.plan.resident) >= {"embed", "head"}
        m.generate(PROMPT, max_new_tokens=STEPS)
        yield m


def test_report_has_every_stage_with_plausible_numbers(profiled, capsys):
    m = profiled
    text = m.profile_report()
    assert capsys.readouterr().out.strip() == text.strip()  # printed and returned
    records = m.scheduler.records
    assert len(records) == STEPS * len(m.plan.stage_bytes)
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    for name, nbytes in m.plan.stage_bytes.items():
        assert name in rows, name
        cells = rows[name].split()
        steps, reads = int(cells[1]), int(cells[2])
        assert steps == STEPS
        assert reads == (1 if name in m.plan.resident else STEPS)  # resident stages are read once
        assert format_bytes(reads * nbytes) in rows[name]
        times = [float(c) for c in cells[5:]]  # read, wait, load, compute, ms/step
        assert all(t >= 0 for t in times) and times[3] > 0  # every stage computed
    for r in records:
        assert r.read_s >= 0 and r.wait_s >= 0 and r.load_s >= 0 and r.compute_s > 0
    total = sum(r.bytes_read for r in records)
    assert format_bytes(total) in rows["total"]
    assert total <= m.store.bytes_read  # the prefetcher may have read ahead of the last sweep
    assert re.search(r"(disk|compute)-bound", text.splitlines()[-1])
    assert format_bytes(total / STEPS) in text.splitlines()[-1]


def _records(wait, compute, reads=2):
    return [StageRecord(step, stage, 1000 if step < reads else 0, wait + 0.001, wait, 0.0001, compute)
            for step in range(3) for stage in ("embed", "layer.000", "head")]


def test_verdict_follows_where_the_time_went():
    assert verdict(summarize(_records(wait=0.05, compute=0.001)))[0] == "disk-bound"
    assert verdict(summarize(_records(wait=0.0001, compute=0.02)))[0] == "compute-bound"
    assert "resident" in verdict(summarize(_records(wait=0.0001, compute=0.02, reads=1)))[1]
    # one step: every stage was read once whether it stays or streams (QA: a streamed sweep was called resident)
    one = [r for r in _records(wait=0.0001, compute=0.02) if r.step == 0]
    assert "resident" not in verdict(summarize(one))[1]
    text = report(_records(wait=0.05, compute=0.001))
    assert "disk-bound" in text and "3 step(s)" in text
    assert report([]).startswith("profile: nothing recorded")


def test_plot_has_one_bar_per_stage(profiled):
    from matplotlib.figure import Figure
    fig = profiled.profile_plot()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    names = list(profiled.plan.stage_bytes)
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.containers and all(len(c) == len(names) for c in ax.containers)  # each segment: one bar per stage
    totals = summarize(profiled.scheduler.records)
    for bar, t in zip(ax.containers[-2], totals):  # compute, ms per step
        assert bar.get_width() == pytest.approx(t.compute_s / t.steps * 1e3)
    import matplotlib.pyplot as plt
    _, given = plt.subplots()
    assert plot(profiled.scheduler.records, ax=given) is given.figure
    plt.close("all")


def test_plot_without_matplotlib_names_the_extra(profiled, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"airmlx\[plot\]"):
        profiled.profile_plot()


def test_profiling_off_says_to_turn_it_on(checkpoints, tmp_path):
    folder, _ = checkpoints("llama")
    with airmlx.AutoModel.from_pretrained(folder, backend="torch", layer_shards_saving_path=tmp_path / "s") as m:
        m.generate(PROMPT, max_new_tokens=1)
        for call in (m.profile_report, m.profile_plot):
            with pytest.raises(ProfilingError, match="profiling_mode=True"):
                call()
    with pytest.raises(ProfilingError, match="nothing recorded"):
        plot([])


def test_generate_cli_profile_prints_the_report(tmp_path, capsys):
    from test_chat import make_chat_checkpoint

    from airmlx.generate import main as generate_main
    src = make_chat_checkpoint(tmp_path / "src")
    code = generate_main(["--model", str(src), "--backend", "torch", "--max-tokens", "3", "--profile",
                          "--prompt", "def"])
    err = capsys.readouterr().err
    assert code == 0
    assert "profile: 3 step(s)" in err and "layer.003" in err and "-bound" in err
