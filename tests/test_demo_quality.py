"""The bundled demo model is genuinely trained, and quantising it costs little perplexity."""
import json

import pytest

from airmlx.demo import DEMO_MODEL, quantisation_report

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").is_file(), reason="demo model not built")


def test_quantised_demo_model_keeps_its_perplexity(tmp_path):
    rows = {r["compression"]: r for r in quantisation_report(tmp_path)}
    vocab = json.loads((DEMO_MODEL / "config.json").read_text())["vocab_size"]
    base = rows["none"]["perplexity"]
    print({k: round(r["perplexity"], 3) for k, r in rows.items()})
    assert base < vocab / 10  # far below a uniform model's perplexity (= vocab size)
    assert rows["8bit"]["perplexity"] <= 1.01 * base
    assert rows["4bit"]["perplexity"] <= 1.10 * base
    assert rows["4bit"]["shard_bytes"] < rows["8bit"]["shard_bytes"] < rows["none"]["shard_bytes"]
