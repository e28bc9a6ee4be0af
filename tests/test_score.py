"""Layer-major scoring equals transformers' log-likelihoods and reads the model once per pass."""
import numpy as np
import pytest
import torch

import airmlx

REQUESTS = [([5, 17, 33], [2, 9, 60]), [4, 8, 15, 16, 23, 42], ([7], [7, 7, 7, 1]), [90, 3],
            ([11, 12, 13, 14, 15, 16], [17]), list(range(20, 40))]


def greedy_continuation(ref, context, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([context]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(context):].tolist()


def reference(ref, request):
    context, continuation = request if isinstance(request, tuple) else (request[:1], request[1:])
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logp = torch.log_softmax(ref(ids).logits[0].double(), -1)
    pos = torch.arange(len(context) - 1, ids.shape[1] - 1)
    targets = ids[0, len(context):]
    return logp[pos, targets].sum().item(), bool((logp[pos].argmax(-1) == targets).all())


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_scores_equal_transformers_loglikelihoods(checkpoints, tmp_path, backend):
    folder, ref = checkpoints("llama")
    shards = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    requests = REQUESTS + [([5, 17, 33], greedy_continuation(ref, [5, 17, 33], 4))]  # one must be greedy
    with airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="260KB") as model:
        got = model.score(requests, batch_size=3, progress=False)
    assert got[-1][1] is True and not all(g for _, g in got)
    for request, (loglik, greedy) in zip(requests, got):
        want_loglik, want_greedy = reference(ref, request)
        assert loglik == pytest.approx(want_loglik, rel=1e-4, abs=1e-4) and greedy == want_greedy
    assert got.passes == 1


def test_model_read_once_per_pass(checkpoints, tmp_path):
    folder, _ = checkpoints("llama")
    shards = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    requests = [[(7 * i + j) % 90 + 3 for j in range(12)] for i in range(64)]
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="260KB") as model:
        one = model.score(requests, batch_size=8, progress=False)
        again = model.score(requests, batch_size=8, progress=False)
        chunked = model.score(requests, batch_size=8, max_tokens=8 * 12 * 2, progress=False)
        streamed, slack = model.plan.streamed_bytes_per_step, 2 * max(model.plan.stage_bytes.values())
        each = [model.score([r], progress=False)[0] for r in requests[:4]]
    assert one.passes == 1 and chunked.passes == 4  # 8 batches of 8, two batches per pass
    assert model.plan.resident_bytes > 0  # the first pass loads them, which its bytes_read leaves out
    assert streamed - slack <= one.bytes_read == again.bytes_read <= streamed + slack
    assert 4 * streamed - slack <= chunked.bytes_read <= 4 * streamed + slack
    # batching and passes change nothing but the cost
    assert np.allclose([s[0] for s in one[:4]], [e[0] for e in each], rtol=1e-5)
    assert [s[1] for s in one[:4]] == [e[1] for e in each]
    assert np.allclose([s[0] for s in one], [s[0] for s in chunked], rtol=1e-5)


def test_text_requests_use_the_tokenizer_and_bad_requests_fail(checkpoints, tmp_path):
    folder, _ = checkpoints("llama")
    with airmlx.AutoModel.from_pretrained(folder, backend="torch") as model:
        (loglik, _), = model.score([("w3 w4", " w5 w6")], progress=False)
        ids = model.tokenizer("w3 w4")["input_ids"]
        (direct, _), = model.score([(ids, [5, 6])], progress=False)
        assert loglik == pytest.approx(direct, rel=1e-6)
        with pytest.raises(airmlx.errors.ScoreRequestError, match="^request 1 .* nothing to score") as e:
            model.score([[5, 6], [5]], progress=False)
        assert e.value.number == 1 and isinstance(e.value, airmlx.errors.GenerationError)
        # Regression (QA): batch_size=-1 returned [None, None], 0 and 2.5 raised Python's own errors
        for bad in (dict(batch_size=-1), dict(batch_size=0), dict(batch_size=2.5), dict(max_tokens=0),
                    dict(max_tokens=-5)):
            with pytest.raises(airmlx.errors.GenerationError, match=f"^{next(iter(bad))}="):
                model.score([[5, 6], [7, 8]], progress=False, **bad)


def test_a_model_opened_with_progress_false_shows_no_progress_bars(checkpoints, tmp_path, capsys):
    """Regression: after from_pretrained(progress=False), score() still showed its "scoring pass" bar and a
    long prompt its "prefill N tokens" bar."""
    folder, _ = checkpoints("llama", max_position_embeddings=1024)
    shards = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    long_prompt = [5 + i % 50 for i in range(600)]  # past model.PROGRESS_TOKENS
    for progress in (True, False):
        with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="260KB",
                                              progress=progress) as model:
            capsys.readouterr()
            model.score(REQUESTS)
            model.generate(long_prompt, max_new_tokens=1)
            err = capsys.readouterr().err
        shown = "scoring pass" in err and "prefill 600 tokens" in err
        assert shown if progress else not ("scoring pass" in err or "prefill" in err), err


def test_the_score_face_prints_transformers_loglikelihoods_a_line_per_request(checkpoints, tmp_path, capsys):
    """`python -m airmlx.score` was the library module: it printed nothing and exited 0."""
    import json

    from airmlx.score import main
    folder, ref = checkpoints("llama")
    shards = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    file = tmp_path / "requests.jsonl"
    file.write_text("\n".join(json.dumps({"text": r} if isinstance(r, list) else
                                         {"context": r[0], "continuation": r[1]}) for r in REQUESTS) + "\n\n")
    assert main([str(file), "--model", str(shards), "--backend", "torch", "--memory-budget", "260KB",
                 "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == len(REQUESTS) and f"scored {len(REQUESTS)} requests in 1 pass," in err
    file.write_text('\ufeff{"id": 7, "text": [5, 17, 33]}\n{"id": null, "text": [5, 17]}\n{"id": 0, "text": [5, 1]}\n'
                    '{"text": [5, 2]}\n')  # a BOM, and a key of the caller's own
    assert main([str(file), "--model", str(shards), "--backend", "torch"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("id", "none") for line in out] == [7, None, 0, "none"]  # each comes back with its answer
    # Regression (QA): a blank line between requests moved every later answer up a line
    file.write_text('{"text": [5, 17, 33]}\n\n  \n{"text": [4, 8, 15]}\n\n')
    assert main([str(file), "--model", str(shards), "--backend", "torch"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [bool(line) for line in out] == [True, False, False, True]
    for request, line in zip(REQUESTS, lines):
        want_loglik, want_greedy = reference(ref, request)
        assert line["loglikelihood"] == pytest.approx(want_loglik, rel=1e-4, abs=1e-4)
        assert line["is_greedy"] == want_greedy

    for text, phrase in [('{"text": [1, 2]}\n{"prompt": "x"}', 'line 2: use {"text": ...} or'),
                         ("{not json", "line 1: not JSON"), ("", "holds no requests"),
                         # each of these was a traceback (a QA pass)
                         (b'{"text": "\xff\xfe bad"}', "line 1: not UTF-8 text"),
                         ('{"text": "ok \\ud800"}', "line 1: holds a lone surrogate escape"),
                         ('\n{"text": [1, 5000]}', "line 2: token id 5000 is outside the model's vocabulary"),
                         # Regression (QA): these named score()'s Python arguments, not the file's fields
                         ('{"text": [1, 2.5, 3]}', 'line 1: "text" is [1, 2.5, 3]; give a string or a list of token'),
                         ('{"context": "a", "continuation": 5}', 'line 1: "continuation" is 5; give a string'),
                         ('{"text": [true, 3]}', 'line 1: "text" is [true, 3]; give')]:
        file.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert main([str(file), "--model", str(shards), "--backend", "torch"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"airmlx: {file}") and phrase in err and err.count("\n") == 1, err


def test_a_text_past_the_context_gets_our_refusal_not_the_tokenizers_warning(tmp_path):
    """Regression (QA): transformers' "Token indices sequence length is longer ..." came before score's own line."""
    import logging

    from airmlx.errors import ScoreRequestError
    from airmlx.hub import DEMO_MODEL
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with airmlx.AutoModel.from_pretrained(DEMO_MODEL, backend="torch") as model:
            with pytest.raises(ScoreRequestError, match="more than the model's context"):
                model.score(["list " * 2000], progress=False)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "sequence length is longer" in r.getMessage()]


def test_a_text_pair_is_split_where_its_whole_text_splits_as_in_the_harness(tmp_path):
    """Regression (QA): score() encoded a pair's texts apart, so "the cat " + "sat" scored a lone space token and
    "sat" where the harness (as lm-eval's models) scores " sat": the same request had two answers."""
    from tiny import make_chat_checkpoint
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from airmlx.harness import AirmlxLM
    folder = make_chat_checkpoint(tmp_path / "src")
    with airmlx.AutoModel.from_pretrained(folder, backend="torch") as model:
        tok = model.tokenizer
        context, whole = tok("What is a list?")["input_ids"], tok("What is a list? A list")["input_ids"]
        assert tok("What is a list? ")["input_ids"] != context  # the trailing space is a token of its own
        pairs = [("What is a list? ", "A list"), ("What is a list?", " A list")]
        got = model.score(pairs, progress=False)
        (want, _), = model.score([(context, whole[len(context):])], progress=False)
        assert [s for s, _ in got] == pytest.approx([want, want], rel=1e-6)
        (empty, _), = model.score([("", "A list")], progress=False)  # the BOS token is its context
        (bos, _), = model.score([([tok.bos_token_id], tok("A list", add_special_tokens=False)["input_ids"])],
                                progress=False)
        assert empty == pytest.approx(bos, rel=1e-6)
    adapter = AirmlxLM(pretrained=str(folder), backend="torch")
    try:
        harness = adapter.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    finally:
        adapter.model.close()
    assert [s for s, _ in harness] == pytest.approx([want, want], rel=1e-6)


def test_a_pair_whose_whole_text_does_not_start_with_its_contexts_tokens_scores_the_continuation_apart():
    """Review: a token across the boundary ("a" + "b" is the token "ab") left the continuation no token of its own,
    and a tokenizer that appends EOS scored that EOS in place of the continuation's last token."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    from airmlx.scoring import encode_pair
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "c": 5}
    merging = Tokenizer(models.BPE(vocab, [("a", "b")]))
    tok = PreTrainedTokenizerFast(tokenizer_object=merging, bos_token="<s>", eos_token="</s>")
    assert tok("ab", add_special_tokens=False)["input_ids"] == [4]
    assert encode_pair(tok, "a", "b") == ([2], [3])
    appending = Tokenizer(models.BPE(vocab, []))
    appending.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=appending, bos_token="<s>", eos_token="</s>")
    assert tok("ac")["input_ids"] == [2, 5, 1]
    context, continuation = encode_pair(tok, "ac", "c")
    assert continuation == [5]
    assert encode_pair(tok, "", "c") == ([0], [5])  # an empty context: the BOS token
