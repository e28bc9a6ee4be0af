"""The lm-evaluation-harness adapter: its requests equal transformers' answers, and a local task runs end to end."""
import json
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

import airmlx  # noqa: E402
from airmlx.harness import AirmlxLM  # noqa: E402

WORDS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w20"]


def local_task_command(folder, work):
    """python -m airmlx.harness on a local multiple-choice task of WORDS, written into `work`."""
    data = work / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": w, "choices": [" w30", " w31", " w32"], "answer": i % 3})
                              for i, w in enumerate(WORDS)))
    (work / "task.yaml").write_text(f"""task: airmlx_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    # batch_size as the README gives it: it collided with lm-eval's own --batch_size
    return [sys.executable, "-m", "airmlx.harness", "--model", "airmlx", "--model_args",
            f"pretrained={folder},backend=torch,layer_shards_saving_path={work / 's'},batch_size=2",
            "--tasks", "airmlx_local", "--include_path", str(work), "--output_path", str(work / "results")]


COMMANDS = {  # the tests that run the harness's command line, and what each runs
    "local task": ("test_local_task_end_to_end_from_the_command_line", local_task_command),
    "unknown task": ("test_lm_evals_own_refusals_are_one_line_exit_2",
                     lambda folder, work: [sys.executable, "-m", "airmlx.harness", "--model", "airmlx", "--tasks",
                                           "no_such_task"]),
}


@pytest.fixture(scope="module", autouse=True)
def harness_runs(checkpoints, tmp_path_factory, request):
    """{name: a future of (the finished process, its work folder)} for each of COMMANDS whose test this run
    selected, started ahead as the module starts: most of a run is lm-eval indexing its thousands of tasks and
    importing the frameworks, which then overlaps the tests run in this process."""
    from tiny import selected_tests, started_ahead
    folder, _ = checkpoints("llama")
    selected = selected_tests(request, __file__)
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1"}

    def run(name):
        work = tmp_path_factory.mktemp(name.replace(" ", "-"))
        done = subprocess.run(COMMANDS[name][1](folder, work), capture_output=True, text=True, env=env, timeout=600)
        return done, work / "results"
    with started_ahead([(name,) for name, (test, _) in COMMANDS.items() if test in selected], run) as got:
        yield {name: future for (name,), future in got.items()}


@pytest.fixture
def lm(checkpoints, tmp_path):
    folder, ref = checkpoints("llama")
    shards = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    adapter = AirmlxLM(pretrained=str(shards), backend="torch", memory_budget="260KB", batch_size=2)
    yield adapter, ref
    adapter.model.close()


def ids(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_loglikelihood_matches_transformers(lm):
    adapter, ref = lm
    pairs = [("w5 w6", " w7 w8"), ("w9", " w10"), ("w3 w4 w5", " w6")]
    got = adapter.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (loglik, greedy) in zip(pairs, got):
        c, k = ids(adapter, context), ids(adapter, continuation)
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([c + k])).logits[0].double(), -1)
        want = sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(k))
        assert loglik == pytest.approx(want, rel=1e-4)
        assert greedy == all(logp[len(c) - 1 + j].argmax().item() == t for j, t in enumerate(k))


def test_rolling_scores_every_token_after_the_prefix(lm):
    adapter, ref = lm
    (got,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("w5 w6 w7 w8",), 0)])
    tokens = [adapter.prefix_token] + ids(adapter, "w5 w6 w7 w8")
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([tokens])).logits[0].double(), -1)
    assert got == pytest.approx(sum(logp[j, tokens[j + 1]].item() for j in range(len(tokens) - 1)), rel=1e-4)


def test_rolling_scores_a_text_longer_than_max_length_in_lm_evals_windows(lm):
    """Regression (QA): a window of max_length scored tokens after its prefix token is max_length + 1 tokens, and
    score() ran (and refused, past the context) the last one too, so any text past max_length was an error."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    adapter, ref = lm
    text = " ".join(f"w{3 + (7 * i) % 90}" for i in range(300))
    assert adapter.max_length == 256
    (got,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    want = 0.0
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
            ids(adapter, text), adapter.prefix_token, adapter.max_length, context_len=1)):
        tokens = context + continuation
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([tokens[:-1]])).logits[0].double(), -1)
        want += sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))
    assert got == pytest.approx(want, rel=1e-4)


def test_generate_until_stops_at_the_stop_string(lm):
    adapter, _ = lm
    free = adapter.generate_until([Instance("generate_until", {}, ("w5 w6", {"max_gen_toks": 6}), 0)])[0]
    stop = free.split()[2]
    cut = adapter.generate_until([Instance("generate_until", {}, ("w5 w6", {"until": [stop], "max_gen_toks": 6}), 0)])[0]
    assert cut == free.split(stop)[0] and stop not in cut


def test_the_limit_under_any_of_lm_evals_names_is_taken(lm):
    """Regression (review): lm-eval takes max_new_tokens, max_tokens and max_completion_tokens for max_gen_toks (ten
    bundled tasks use max_new_tokens); they were ignored with a warning, and 256 tokens generated. null values of
    temperature and do_sample were a TypeError, or greedy where the temperature asked for sampling."""
    from airmlx.harness import GenerationSettings
    adapter, _ = lm
    want = adapter.generate_until([Instance("generate_until", {}, ("w5 w6", {"max_gen_toks": 3}), 0)])[0]
    for name in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        got = adapter.generate_until([Instance("generate_until", {}, ("w5 w6", {name: 3}), 0)])[0]
        assert got == want and len(adapter.tokenizer(got, add_special_tokens=False)["input_ids"]) <= 3
    assert GenerationSettings.from_kwargs({"max_gen_toks": 4, "max_new_tokens": 9}, 256).max_new_tokens == 4
    nulls = GenerationSettings.from_kwargs({"temperature": None, "do_sample": None, "max_gen_toks": None}, 256)
    assert (nulls.do_sample, nulls.temperature, nulls.max_new_tokens) == (False, None, 256)
    assert GenerationSettings.from_kwargs({"temperature": 0.7, "do_sample": None}, 256).do_sample


def test_a_generation_prompt_that_starts_with_the_pad_id_keeps_it(checkpoints, tmp_path):
    """Regression (review): prompts went to model.generate without a mask, so leading tokens equal to the pad id
    were taken for padding: with a pad id that is the BOS (and not an EOS), every prompt lost its BOS."""
    folder, _ = checkpoints("llama", pad_token_id=1, bos_token_id=1, eos_token_id=2)
    adapter = AirmlxLM(pretrained=str(airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)),
                       backend="torch", batch_size=2)
    try:
        prompt = ids(adapter, "w1 w5 w6")
        assert prompt[0] == adapter.model.pad_token_id == 1
        want = adapter.model.generate([prompt], attention_mask=[[1] * 3], max_new_tokens=5)[0][3:]
        assert want != adapter.model.generate([prompt], max_new_tokens=5)[0][3:]  # without a mask: the BOS dropped
        got = adapter.generate_until([Instance("generate_until", {}, ("w1 w5 w6", {"max_gen_toks": 5}), 0)])[0]
        assert got == adapter.continuation_text(want, ())
    finally:
        adapter.model.close()


def test_local_task_end_to_end_from_the_command_line(harness_runs, checkpoints, tmp_path):
    run, out = harness_runs["local task"].result()
    assert run.returncode == 0, run.stderr[-2000:]
    (result,) = out.rglob("results*.json")
    acc = json.loads(result.read_text())["results"]["airmlx_local"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and "airmlx_local" in run.stdout and "CUDA" not in run.stderr
    folder, _ = checkpoints("llama")
    made = AirmlxLM.create_from_arg_string(f"pretrained={folder},backend=torch,batch_size=3,layer_shards_saving_path="
                                           f"{tmp_path / 's'}", {"batch_size": 1, "device": "cuda"})
    assert made.batch_size == 3  # --model_args over lm-eval's own options
    made.model.close()


def until_request(context, i=0, **kwargs):
    return Instance("generate_until", {}, (context, kwargs), i)


def test_generate_until_batches_and_stops_the_batch_at_the_stop_string(lm):
    adapter, _ = lm
    adapter.batch_size = 8
    m = adapter.model
    context = "w20 w3"
    prompt = adapter.tokenizer(context)["input_ids"]
    free = m.generate(prompt, max_new_tokens=32)[len(prompt):]
    words = adapter.tokenizer.decode(free).split()
    stop = next(w for j, w in enumerate(words) if j >= 2 and w not in " ".join(words[:j]))  # a word not seen before
    n = next(k for k in range(1, 33) if stop in adapter.tokenizer.decode(free[:k]))
    assert 3 <= n < 32
    before = m.memory_stats()["steps"]
    out = adapter.generate_until([until_request(context, i, until=[stop], max_gen_toks=32) for i in range(4)])
    assert m.memory_stats()["steps"] - before == n  # one batch, one sweep per token, none after the stop
    assert out == [adapter.tokenizer.decode(free).split(stop)[0]] * 4 and out[0]


def test_batched_generate_until_equals_one_request_at_a_time(lm):
    adapter, _ = lm
    contexts = ["w5 w6", "w9", "w10 w11 w12 w13", "w20 w3", "w7 w8 w9"]
    kinds = [dict(max_gen_toks=6), dict(until=["w5"], max_gen_toks=5)]
    requests = [until_request(c, i, **kinds[i % 2]) for i, c in enumerate(contexts)]
    adapter.batch_size = 1
    alone = adapter.generate_until(requests)
    adapter.batch_size = 8
    calls, real = [], adapter.model.generate
    adapter.model.generate = lambda rows, **kw: calls.append(len(rows)) or real(rows, **kw)
    try:
        batched = adapter.generate_until(requests)
    finally:
        adapter.model.generate = real
    assert batched == alone and all(a for a in alone)
    assert sorted(calls) == [2, 3]  # one batch per kind of generation kwargs


def test_generate_until_sampling_follows_lm_evals_seed(lm):
    import random

    import numpy as np
    adapter, _ = lm

    def sampled(seed):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)  # what lm-eval's --seed does
        return adapter.generate_until([until_request("w5 w6", max_gen_toks=12, do_sample=True, temperature=1.0)])[0]

    assert sampled(1234) == sampled(1234)
    assert sampled(1234) != sampled(4321)


def test_a_context_is_cut_from_the_left_to_fit_max_length_with_its_continuation(lm):
    """Regression (QA): at a continuation of exactly max_length - 0 tokens of room, c[-0:] kept the whole context
    (and the request went over the model's context); a continuation longer than max_length cut the context to
    nothing and the error blamed the request. Regression (QA): the context was cut to max_length tokens with its
    continuation, where lm-eval's models keep max_length + 1 (the last token is only scored)."""
    from airmlx.errors import OptionError
    adapter, ref = lm
    adapter.max_length = 3
    c, k = ids(adapter, "w5 w6 w7"), ids(adapter, " w8 w9")
    assert len(c) > 4 - len(k)  # it is cut
    (loglik, _), = adapter.loglikelihood([Instance("loglikelihood", {}, ("w5 w6 w7", " w8 w9"), 0)])
    kept = c[-(4 - len(k)):]
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([kept + k])).logits[0].double(), -1)
    assert loglik == pytest.approx(sum(logp[len(kept) - 1 + j, t].item() for j, t in enumerate(k)), rel=1e-4)
    adapter.max_length = len(k) - 1
    with pytest.raises(OptionError, match=rf"request 0: its continuation has {len(k)} tokens, which leaves no room "
                                          rf"for its context under max_length={len(k) - 1}"):
        adapter.loglikelihood([Instance("loglikelihood", {}, ("w5 w6 w7", " w8 w9"), 0)])


@pytest.mark.parametrize("args, error", [("max_length=abc", "max_length='abc': use a whole number >= 1"),
                                         ("max_gen_toks=-3", "max_gen_toks=-3: use a whole number >= 1"),
                                         ("max_length=0", "max_length=0: use a whole number >= 1"),
                                         ("batch_size=x", "batch_size='x': use a whole number >= 1"),
                                         ("memory_budgt=4MB", "--model_args memory_budgt: not an option of the airmlx "
                                                              "model; it takes pretrained, backend, ")])
def test_model_args_that_are_not_whole_numbers_are_refused_in_one_line(checkpoints, tmp_path, args, error):
    """Regression (QA): max_length=abc ended in a ValueError traceback; batch_size=-1 became 8 without a word;
    max_length=0 became the model's context."""
    from airmlx.errors import OptionError
    folder, _ = checkpoints("llama")
    with pytest.raises(OptionError, match=error):
        AirmlxLM.create_from_arg_string(f"pretrained={folder},backend=torch,layer_shards_saving_path={tmp_path / 's'},"
                                        f"{args}")
    made = AirmlxLM.create_from_arg_string(f"pretrained={folder},backend=torch,batch_size=auto:4,"
                                           f"layer_shards_saving_path={tmp_path / 's'}")
    assert made.batch_size == 8
    made.model.close()


def test_lm_evals_own_refusals_are_one_line_exit_2(harness_runs):
    """Regression (QA): an unknown task ended in lm-eval's ValueError traceback."""
    run, _ = harness_runs["unknown task"].result()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.splitlines()[-1] == "airmlx: lm-eval: Tasks not found: no_such_task"


def test_apply_chat_template_is_refused_in_one_line(lm):
    """Regression (QA): --apply_chat_template ended in lm-eval's NotImplementedError traceback ("please implement the
    'tokenizer_name' property"), which its evaluator raises from getattr(lm, "tokenizer_name", "")."""
    from airmlx.errors import OptionError
    adapter, _ = lm
    with pytest.raises(OptionError, match="--apply_chat_template: the airmlx model scores and generates the task's "
                                          "plain text; leave it out"):
        getattr(adapter, "tokenizer_name", "")


def test_errors_name_the_model_args_as_model_args_take_them(checkpoints, tmp_path, capsys):
    """Regression (QA): the harness said "raise --memory-budget to at least ...", an option lm-eval does not take, where
    the user gives --model_args memory_budget=..."""
    from airmlx.harness import main
    folder, _ = checkpoints("llama")
    (tmp_path / "task.yaml").write_text("task: airmlx_budget\ndataset_path: json\noutput_type: loglikelihood\n")
    code = main(["--model", "airmlx", "--model_args", f"pretrained={folder},backend=torch,memory_budget=1KB,"
                 f"layer_shards_saving_path={tmp_path / 's'}", "--tasks", "airmlx_budget", "--include_path", str(tmp_path)])
    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and last.startswith("airmlx: memory_budget 1.00 KB is below") and "raise memory_budget to" in last


def test_rolling_reads_the_model_once_for_many_texts(lm):
    """Regression (QA): loglikelihood_rolling called model.score once per text, so a task of N documents read the
    streamed model N times where one pass holds them all."""
    adapter, _ = lm
    texts = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13", "w14 w15 w16 w17 w18"]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    alone = [adapter.loglikelihood_rolling([r])[0] for r in requests]
    sweeps, real = [], adapter.model.sweep
    adapter.model.sweep = lambda *a, **k: sweeps.append(1) or real(*a, **k)
    try:
        together = adapter.loglikelihood_rolling(requests)
    finally:
        adapter.model.sweep = real
    assert len(sweeps) == 1 and together == pytest.approx(alone, rel=1e-6)
