"""Sliding-window attention: the window of architectures that apply config.sliding_window to every layer
(audit bug 2), and rolling a cache back past the window exactly, or with a clear error the chat recovers
from (audit bug 4)."""
import numpy as np
import pytest
import torch

import airmlx
from airmlx.errors import CacheTrimError
from airmlx.session import ChatSession

from tiny import BACKENDS, NEW_TOKENS, assert_last_logits_match, interrupt_at, make_chat_checkpoint, reference_generate

LONG = [[5, 17, 33, 2, 9, 60, 7, 41, 12, 30, 22, 8, 3, 4, 71, 19]]  # 16 tokens: twice the window of 8
SLACK = 64  # tokens a sliding layer keeps beyond its window (backends/*: TRIM_SLACK)


EVERY_LAYER = [(arch, extra, backend) for arch, extra in [
    ("mistral", {}), ("phi3", {}), ("mixtral", {}), ("qwen3_moe", {"use_sliding_window": True}), ("phimoe", {}),
    ("starcoder2", {})] for backend in BACKENDS if (arch, backend) != ("starcoder2", "mlx")]  # mlx-lm's exact GELU


@pytest.mark.parametrize("arch, extra, backend", EVERY_LAYER, ids=[f"{a}-{b}" for a, _, b in EVERY_LAYER])
def test_a_window_on_every_layer_matches_transformers(checkpoints, tmp_path, arch, extra, backend):
    """Mistral-7B-v0.1 (4096), Phi-3-*-4k (2047) and StarCoder2 (4096) ship sliding_window and no layer_types;
    phimoe and starcoder2 were registered without it (found by QA)."""
    folder, ref = checkpoints(arch, sliding_window=8, **extra)
    assert ref.config.sliding_window == 8 and not getattr(ref.config, "layer_types", None) or \
        set(ref.config.layer_types) == {"sliding_attention"}
    shards = airmlx.shard_checkpoint(folder, tmp_path / "shards", progress=False)
    with airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="1GB") as model:
        want = reference_generate(ref, LONG)
        assert model.generate(torch.tensor(LONG), max_new_tokens=NEW_TOKENS).tolist() == want
        assert_last_logits_match(model, ref, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_its_config_turns_off_is_not_applied(checkpoints, tmp_path, backend):
    """A Qwen3-MoE config.json with use_sliding_window false and a sliding_window value: transformers applies no
    window; airmlx applied it (torch raised, MLX's tokens differed past it). Found by QA."""
    import json
    import shutil
    folder, ref = checkpoints("qwen3_moe")
    shutil.copytree(folder, tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_sliding_window": False, "sliding_window": 8}))
    shards = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    with airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="1GB") as model:
        assert model.generate(torch.tensor(LONG), max_new_tokens=NEW_TOKENS).tolist() == reference_generate(ref, LONG)


def fresh_logits(model, seq):
    seq = np.array([seq])
    return model.step(seq, np.ones_like(seq), model.new_cache())


@pytest.fixture(scope="module", params=["gemma3_text", "mistral"])
def sliding_shards(request, checkpoints, tmp_path_factory):
    folder, _ = checkpoints(request.param, sliding_window=8, initializer_range=0.2, seed=1) \
        if request.param == "gemma3_text" else checkpoints(request.param, sliding_window=8)
    return airmlx.shard_checkpoint(folder, tmp_path_factory.mktemp("sliding") / "shards", progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rolling_back_past_the_window_is_exact_within_the_slack(sliding_shards, backend):
    with airmlx.AutoModel.from_pretrained(sliding_shards, backend=backend, memory_budget="1GB") as model:
        seq = model.generate(LONG[0], max_new_tokens=14)
        for drop in (1, 2, 5, 13):
            cache = model.new_cache()
            model.generate(LONG[0], max_new_tokens=10, past_key_values=cache)  # 25 tokens: the window rotated
            keep = len(LONG[0]) + 9 - drop
            model.trim_cache(cache, keep)
            assert model.cache_length(cache) == keep
            ours = model.step(np.array([seq[keep:keep + 3]]), np.ones((1, keep + 3)), cache)
            np.testing.assert_allclose(ours, fresh_logits(model, seq[:keep + 3]), rtol=1e-4, atol=1e-4)
            # and decoding goes on exactly (in-place updates of a rotated buffer)
            ours = model.step(np.array([seq[keep + 3:keep + 4]]), np.ones((1, keep + 4)), cache)
            np.testing.assert_allclose(ours, fresh_logits(model, seq[:keep + 4]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rolling_back_further_than_the_window_keeps_is_a_clear_error(sliding_shards, backend):
    with airmlx.AutoModel.from_pretrained(sliding_shards, backend=backend, memory_budget="1GB") as model:
        cache = model.new_cache()
        # a prompt, then decode steps past the window and its slack: the oldest tokens are gone
        model.generate(LONG[0], max_new_tokens=81, eos_token_id=-1, past_key_values=cache)
        before = model.cache_length(cache)
        assert before == 16 + 80
        with pytest.raises(CacheTrimError, match="cannot go back 86 tokens exactly.*/reset"):
            model.trim_cache(cache, 10)
        assert model.cache_length(cache) == before  # refused whole: no layer was cut


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_chat_recovers_where_the_cache_cannot_roll_back(tmp_path, backend):
    shards = airmlx.shard_checkpoint(make_chat_checkpoint(tmp_path / "src", "gemma3_text", sliding_window=8),
                                     tmp_path / "shards", progress=False)
    with airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="1GB") as model:
        chat, fresh = ChatSession(model, max_tokens=6), ChatSession(model, max_tokens=6)
        for text in ["What is a list?", "And a dict?", "def f(x): return x + 1", "for item in items"]:
            chat.send(text)
        assert chat.cache_length() > 8 + SLACK  # far past the window and its slack
        # a template that renders the conversation differently from the start: nothing of the cache fits
        chat.cached[0] += 1
        turn = chat.send("What is a tuple?")
        for text in ["What is a list?", "And a dict?", "def f(x): return x + 1", "for item in items"]:
            fresh.send(text)
        assert turn.reused_tokens == 0 and turn.text == fresh.send("What is a tuple?").text
        # Ctrl-C mid-answer past the window: the one-token roll-back is exact, the chat goes on
        restore = interrupt_at(model.backend, 4)
        cut = chat.send("Another?")
        restore()
        assert cut.interrupted and chat.send("Done?").text
