"""python -m airmlx.doctor: the disk measured, the sweep simulated, the prediction saved and shown beside
what a run achieves; the CLIs' one-line preflight."""
import subprocess
import sys

import pytest

import airmlx
from airmlx.doctor import main
from airmlx.plan import Plan, StageCost
from airmlx.preflight import PREFLIGHT_NAME, load, measure_disk, measure_experts, predict, sweep_seconds

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
    assert main(args + ["--prompt-tokens", "300"]) == 2  # past the context: generate would refuse it (QA)
    assert "--prompt-tokens 300 is past the model's context of 256 tokens" in capsys.readouterr().err
    assert main(args + ["--request-tokens", "258"]) == 2  # score() takes 257: the last token only scored (QA)
    assert "--request-tokens 258 is past the model's context of 256 tokens; give at most 257." in capsys.readouterr().err
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
    assert main(args[:-1] + ["1MB", "--draft-model", "4bit"]) == 0  # the draft: its call time, what decode means
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("draft ") and "ms a call" in line]
    # Regression (QA): the doctor took --num-draft-tokens and --profile and did nothing with them
    assert main(args[:-1] + ["1MB", "--draft-model", "4bit", "--num-draft-tokens", "6", "--profile"]) == 0
    out, err = capsys.readouterr()
    assert "a round of 6 draft tokens (--num-draft-tokens) costs about " in out
    assert "layer.007" in err and "compute ms" in err  # the profile of the steps it timed


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
    assert "experts " in out and saved.expert_cold_bps > 0 and saved.expert_warm_bps > 0
    assert saved.cold_s_per_token > saved.experts_per_step / saved.expert_cold_bps  # at least its experts read cold
    # its synthetic prompt's routing stays out of the usage profile (review): it would be what the next run pins
    from airmlx.experts import PROFILE_NAME
    assert not (shards / PROFILE_NAME).exists()


def test_routed_experts_are_measured_as_steps_read_them_and_predicted_at_that_speed(tmp_path):
    """A disk reads a routed expert (a byte range of a few MB somewhere in its layer's file) slower than a whole
    stage file: on the bench MoE model 0.5-0.8 GB/s against 1.0-1.3. The doctor read the experts' bytes at the
    stage files' speed, and predicted the torch cold step at 0.53-0.68 x what it measured."""
    make_checkpoint(tmp_path / "src", "mixtral")
    shards = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="1GB") as model:
        minimum = model.minimum_budget
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget=minimum) as model:
        routed = [s for s in model.store.stages.values() if s.kind == "experts"]
        sizes = [e - s for st in routed for s, e in st.parts.values()]
        before = model.bytes_read
        assert model.expert_read_bandwidth(cold=True, limit_bytes=3 * max(sizes)) > 0
        assert 3 * min(sizes) <= model.bytes_read - before <= 3 * max(sizes)  # experts, as far as the sample goes
        before = model.bytes_read
        assert model.expert_read_bandwidth(cold=False) > 0
        assert model.bytes_read - before == sum(sizes)  # no limit: every expert, once
        cold, warm = measure_disk(model)
        slow = predict(model, cold, warm, expert_bps=(1e5, 1e6))  # experts read at 100 KB/s cold, 1 MB/s warm
    assert slow.experts_per_step > 0 and (slow.expert_cold_bps, slow.expert_warm_bps) == (1e5, 1e6)
    assert slow.cold_s_per_token > 0.9 * slow.experts_per_step / 1e5 > 10 * slow.experts_per_step / cold
    assert slow.warm_s_per_token > 0.9 * slow.experts_per_step / 1e6


def test_a_dense_model_has_no_expert_bandwidth(tmp_path):
    make_checkpoint(tmp_path / "src", "llama")
    shards = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="1GB") as model:
        assert model.expert_read_bandwidth() is None and measure_experts(model) == (0.0, 0.0)


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


def test_the_doctor_counts_the_passes_score_makes(tmp_path):
    """Regression (QA): the doctor took 4,096 tokens a pass where score() holds 512 MB of hidden states in one: it
    said 3 passes for 40 requests of 256 tokens that score() ran in 1, and 63 where it needed 1."""
    from airmlx.doctor import scoring_passes
    from airmlx.scoring import make_passes
    make_checkpoint(tmp_path / "src", "llama")
    with airmlx.AutoModel.from_pretrained(tmp_path / "src", backend="torch", memory_budget="1MB",
                                          layer_shards_saving_path=tmp_path / "s") as model:
        scored = model.score([list(range(3, 40))] * 40, max_tokens=300, progress=False)
    assert scored.passes == scoring_passes(40, 37, 300) == 5
    assert scoring_passes(40, 256, 2_000_000) == 1
    for requests, tokens, per_pass in [(250_000, 100, 8000), (100_000, 7, 100)]:  # counted, and listed, alike
        listed = len(make_passes([tokens - 1] * requests, 8, per_pass))  # score() runs all tokens but the last
        assert scoring_passes(requests, tokens, per_pass) in (listed, listed + 1)


def test_the_scoring_line_counts_one_request_and_one_pass_in_the_singular():
    """Regression (QA): the doctor said "(1 passes)", and "1 requests" for --requests 1."""
    from types import SimpleNamespace

    from airmlx.doctor import report
    from airmlx.preflight import Preflight
    model = SimpleNamespace(plan=plan(1), config={"hidden_size": 64}, shard_dir="s", shard_bytes=1000,
                            backend_name="torch")
    p = Preflight(100.0, 1000.0, compute_s={}, prefill_s_per_token=0.001, cold_s_per_token=1.0, warm_s_per_token=1.0)
    assert report(model, p, 16, 1, 8).splitlines()[-1].endswith("for 1 request of 8 tokens (1 pass)")
    assert report(model, p, 16, 3, 8).splitlines()[-1].endswith("for 3 requests of 8 tokens (1 pass)")
