"""Text sources, splits and token blocks (real SmolLM2 tokenizer, real wiki-vital corpus)."""

from __future__ import annotations

import json

import pytest
import torch

from pg_pruning_plugin.resources import text as data


def test_wiki_vital_splits_disjoint_deterministic():
    ev, cal = data.wiki_vital_titles("eval"), data.wiki_vital_titles("calib")
    assert (len(ev), len(cal)) == (1010, 9023)
    assert not set(ev) & set(cal)
    assert all(data.wiki_vital_split_of(t) == "eval" for t in ev)
    assert ev == sorted(ev)
    eval_text, calib_text = data.load_text("wiki-vital", "eval"), data.load_text("wiki-vital", "calib")
    assert eval_text.startswith(f" = {ev[0]} = \n\n")
    assert f" = {ev[5]} = \n\n" in eval_text and f" = {ev[5]} = \n\n" not in calib_text
    assert f" = {cal[7]} = \n\n" in calib_text and f" = {cal[7]} = \n\n" not in eval_text
    assert "  " not in eval_text  # whitespace normalised
    assert data.load_text("wiki-vital", "eval") == eval_text


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        data.load_text("wiki-vital", "test")


def test_token_blocks_shape_and_no_remainder(tok):
    text = data.load_text("wiki-vital", "eval")[:5000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    blocks = data.token_blocks(tok, text, 16)
    n = len(ids) // 16
    assert blocks.dtype == torch.long and blocks.shape == (n, 16)
    assert blocks.flatten().tolist() == ids[: n * 16]
    assert torch.equal(data.token_blocks(tok, text, 16, max_blocks=3), blocks[:3])
    with_bos = data.token_blocks(tok, text, 16, max_blocks=4, add_bos=True)
    assert with_bos.shape == (4, 16)
    assert (with_bos[:, 0] == tok.bos_token_id).all()
    assert with_bos[:, 1:].flatten().tolist() == ids[: 4 * 15]


def test_incremental_tokenization_matches_one_shot(tok):
    text = data.load_text("wiki-vital", "eval")  # > 2 chunks of 200k characters
    full = data.token_blocks(tok, text, 128)
    assert full.shape[0] == 909  # 116,422 tokens // 128
    assert torch.equal(data.token_blocks(tok, text, 128, max_blocks=10_000), full)
    assert torch.equal(data.token_blocks(tok, text, 128, max_blocks=500), full[:500])


def test_too_short_text(tok):
    with pytest.raises(ValueError, match=r"has \d+ tokens, fewer than the 128 needed"):
        data.token_blocks(tok, "Hello world.", 128)


def test_nonexistent_path():
    with pytest.raises(FileNotFoundError, match="wiki-vital"):
        data.load_text("/no/such/file.txt", "calib")


def test_wrong_suffix(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        data.load_text(str(p), "eval")


def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\nsecond doc\n")
    assert data.load_text(str(txt), "calib") == "first doc\n\nsecond doc\n"
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    assert data.load_text(str(jl), "eval") == "one\n\ntwo"
    jl.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ValueError, match="'text'"):
        data.load_text(str(jl), "eval")


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_offline_hub_source_names_alternatives(source, monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds")  # no stale cache hit
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(data.TextSourceUnavailable) as err:
        data.load_text(source, "eval")
    msg = str(err.value)
    assert "wiki-vital" in msg and ".txt" in msg and ".jsonl" in msg and source in msg


def test_token_cache_file(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PRUNING_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "doc.txt"
    src.write_text(data.load_text("wiki-vital", "eval")[:3000])
    ids = data.source_token_ids(tok, str(src), "eval")
    files = list((tmp_path / "cache" / "tokens").glob("doc-eval-*.pt"))
    assert len(files) == 1
    assert ids.tolist() == tok(src.read_text(), add_special_tokens=False)["input_ids"]
    assert torch.equal(data.source_token_ids(tok, str(src), "eval"), ids)
    src.write_text("changed text " * 50)  # new size/mtime -> new cache entry
    assert data.source_token_ids(tok, str(src), "eval").numel() != ids.numel()


def test_calibration_blocks(tok):
    a = data.calibration_blocks(tok, seq_len=128, num_blocks=64, seed=0)
    assert a.shape == (64, 128) and a.dtype == torch.long
    assert torch.equal(a, data.calibration_blocks(tok, seq_len=128, num_blocks=64, seed=0))
    b = data.calibration_blocks(tok, seq_len=128, num_blocks=64, seed=1)
    assert not torch.equal(a, b)
    calib = data.source_blocks(tok, "wiki-vital", "calib", 128)
    evalb = data.source_blocks(tok, "wiki-vital", "eval", 128)
    calib_rows = {tuple(r) for r in calib.tolist()}
    assert all(tuple(r) in calib_rows for r in a.tolist())
    assert not calib_rows & {tuple(r) for r in evalb.tolist()}
    with pytest.raises(ValueError, match=rf"only {calib.shape[0]} blocks.*num_blocks <= {calib.shape[0]}"):
        data.calibration_blocks(tok, seq_len=128, num_blocks=calib.shape[0] + 1)
