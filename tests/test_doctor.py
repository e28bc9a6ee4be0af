"""python -m airmlx.doctor: the disk measured, the sweep simulated, the prediction saved and shown beside
what a run achieves; the CLIs' one-line preflight."""
import subprocess
import sys

import pytest

import airmlx
from airmlx.doctor import main
from airmlx.plan import Plan, StageCost
from airmlx.preflight import PREFLIGHT_NAME, load, sweep_seconds

from tiny import make_checkpoint

STAGES = {"embed": StageCost(10, 10, 10), **{f"layer.{i}": StageCost(100, 100, 100) for i in range(4)},
          "head": StageCost(20, 20, 20)}


def plan(depth, resident=("embed", "head")):
    return Plan(1000, STAGES, list(resident), depth)


def test_the_simulated_sweep_is_reads_plus_compute_without_prefetch_and_the_larger_with_it():
    compute = {name: 0.5 for name in STAGES}
    assert sweep_seconds(plan(0), compute, bps=100) == pytest.approx(4 * 1.0 + 6 * 0.5)
    disk_bound = sweep_seconds(plan(1), {name: 0.1 for name in STAGES}, bps=100)
    assert 4 * 1.0 <= disk_bound <= 4 * 1.0 + 6 * 0.1  # reads back to back, compute hidden behind them
    compute_bound = sweep_seconds(plan(2), {name: 2.0 for name in STAGES}, bps=1000)
    assert 6 * 2.0 <= compute_bound <= 6 * 2.0 + 0.1  # reads hidden behind compute


def test_doctor_predicts_saves_and_the_stats_line_compares(tmp_path, capsys):
    make_checkpoint(tmp_path / "src", "llama", num_hidden_layers=8)
    shards = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    args = ["--model", str(shards), "--backend", "torch", "--memory-budget", "400KB"]
    assert main(args + ["--prompt-tokens", "100", "--requests", "10"]) == 0
    out = capsys.readouterr().out
    for line in ("disk ", "decode ", "prefill ", "scoring "):
        assert line in out, out
    saved = load(shards)
    assert saved.cold_bps > 0 and saved.warm_bps > 0 and saved.cold_s_per_token >= saved.streamed_per_step / saved.cold_bps
    done = subprocess.run([sys.executable, "-m", "airmlx.generate", *args, "--prompt", "w5 w6", "--max-tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "achieved (disk:" in done.stderr and "preflight:" not in done.stderr  # measured once already


def test_the_doctor_counts_a_moe_steps_expert_reads(tmp_path, capsys):
    """A MoE decode step also reads the routed experts the cache lacks, after its router has run. The
    prediction counted only the stages: on the bench MoE model it said 0.052 s cold against 0.11-0.14 s."""
    make_checkpoint(tmp_path / "src", "mixtral")
    shards = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="1GB") as model:
        minimum = model.minimum_budget
    assert main(["--model", str(shards), "--backend", "torch", "--memory-budget", str(minimum)]) == 0
    out = capsys.readouterr().out
    saved = load(shards)
    assert "of routed experts per token" in out and saved.experts_per_step > 0
    assert saved.cold_s_per_token > saved.experts_per_step / saved.cold_bps  # at least its experts read cold


def test_the_cli_prints_a_preflight_the_first_time(tmp_path):
    make_checkpoint(tmp_path / "src", "llama", num_hidden_layers=8)
    shards = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    cmd = [sys.executable, "-m", "airmlx.generate", "--model", str(shards), "--backend", "torch", "--memory-budget",
           "400KB", "--prompt", "w5 w6", "--max-tokens", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "preflight: disk" in first.stderr, first.stderr
    assert "s/token cold" in first.stderr or "tokens/s cold" in first.stderr
    assert (shards / PREFLIGHT_NAME).is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "preflight:" not in again.stderr
