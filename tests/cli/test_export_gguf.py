"""`pg-prune export-gguf`: a pruned checkpoint as GGUF, refusals, and ``--verify`` with llama.cpp."""

import json

from pg_pruning_plugin import save_pruned
from pg_pruning_plugin.cli import main
from tests.helpers import GGUF_HEADS, gguf_fields, heterogeneous_gguf_model, needs_llama_cpp


def test_cli_exports_a_pruned_checkpoint(tok, tmp_path, capsys):
    save_pruned(heterogeneous_gguf_model("mistral", tok), tmp_path / "ckpt", tok)
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(out)]) == 0
    assert gguf_fields(out)[1]["deci.attention.head_count"] == GGUF_HEADS
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export-gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 2


def test_cli_refuses_outputs_in_the_model_and_quantized_checkpoints_before_loading(tok, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_pruned(heterogeneous_gguf_model("mistral", tok), ckpt, tok)
    assert main(["export-gguf", str(ckpt), str(ckpt / "m.gguf")]) == 2
    assert "the input model" in capsys.readouterr().err and not (ckpt / "m.gguf").exists()
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes(b"not read")  # loading the weights would fail differently
    assert main(["export-gguf", str(ckpt), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "is a compressed-tensors checkpoint; GGUF export needs the unquantized weights" in err


@needs_llama_cpp
def test_cli_verify(tok, tmp_path, capsys):
    save_pruned(heterogeneous_gguf_model("qwen2", tok), tmp_path / "ckpt", tok)
    argv = ["export-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--verify", "--verify-tokens", "8"]
    assert main(argv) == 0
    assert "greedy tokens equal: True" in capsys.readouterr().out
