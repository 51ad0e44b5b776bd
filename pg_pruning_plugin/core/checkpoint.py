"""Saving and loading pruned models.

``save_pruned`` writes ``save_pretrained`` output (plus tokenizer) to a temporary directory and
renames it into place, so an interrupted run never leaves a half-written model. The config keeps
``pruned_layers`` (per-layer widths; 0 marks a removed block). Uniform widths also set the standard config fields, so stock
``AutoModelForCausalLM.from_pretrained`` loads them; heterogeneous widths load with
:func:`load_pruned`, which builds each layer's projections at the recorded sizes before the weights
are read.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .architectures import architecture_of, decoder_layers
from .removal import RemovedAttention, RemovedMLP

__all__ = ["atomic_directory", "check_output_dir", "write_atomic", "load_pruned", "pruned_model_class", "save_pruned"]

logger = logging.getLogger(__name__)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False,
                     input_dir: str | os.PathLike | None = None) -> Path:
    """Refuse an existing output (unless ``overwrite``) and any path inside the input model's directory."""
    out = Path(output_dir).resolve()
    if input_dir is not None and Path(input_dir).exists():
        src = Path(input_dir).resolve()
        src = src if src.is_dir() else src.parent
        if out == src or src in out.parents:
            raise ValueError(f"output {out} is inside the input model directory {src}; choose another --output")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} exists; pass overwrite=True (--overwrite) or choose another path")
    return out


@contextmanager
def atomic_directory(output: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``output``; on success it replaces ``output``, on error it is removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    try:
        yield tmp
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to a temporary sibling of ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pruned(model: PreTrainedModel, output_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                input_dir: str | os.PathLike | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Atomically write ``model`` (and ``tokenizer``) to ``output_dir``; returns the final path."""
    out = check_output_dir(output_dir, overwrite, input_dir)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    logger.info("pruned model written to %s", out)
    return out


def _resize_layers(model: nn.Module, widths: list[dict]) -> None:
    """Replace each layer's projections with Linears of the recorded widths (before weights load)."""
    spec = architecture_of(model)
    config = model.config.get_text_config()
    head_dim = config.head_dim
    layers = decoder_layers(model)
    if len(widths) != len(layers):
        raise ValueError(f"config records {len(widths)} pruned layers but the model has {len(layers)}")
    for i, (layer, w) in enumerate(zip(layers, widths)):
        attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        if w["num_key_value_heads"] == 0:
            setattr(layer, spec.attention, RemovedAttention(i))
        if w["intermediate_size"] == 0:
            setattr(layer, spec.mlp, RemovedMLP())
        q_width, kv_width = w["num_attention_heads"] * head_dim, w["num_key_value_heads"] * head_dim
        new_shapes = {
            (attn, spec.q): (None, q_width), (attn, spec.k): (None, kv_width), (attn, spec.v): (None, kv_width),
            (attn, spec.o): (q_width, None), (mlp, spec.gate): (None, w["intermediate_size"]),
            (mlp, spec.up): (None, w["intermediate_size"]), (mlp, spec.down): (w["intermediate_size"], None),
        }
        for (parent, name), (in_features, out_features) in new_shapes.items():
            if (parent is attn and not w["num_key_value_heads"]) or (parent is mlp and not w["intermediate_size"]):
                continue
            old = getattr(parent, name)
            new = nn.Linear(in_features or old.in_features, out_features or old.out_features,
                            bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
            setattr(parent, name, new)
        if w["num_key_value_heads"]:
            attn.num_key_value_groups = w["num_attention_heads"] // w["num_key_value_heads"]
        if w["intermediate_size"]:
            mlp.intermediate_size = w["intermediate_size"]


_PRUNED_CLASSES: dict[type, type] = {}


def pruned_model_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A subclass of ``base`` whose ``__init__`` builds the per-layer widths in ``config.pruned_layers``."""
    if base not in _PRUNED_CLASSES:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            widths = getattr(config.get_text_config(), "pruned_layers", None)
            if widths:
                _resize_layers(self, widths)

        _PRUNED_CLASSES[base] = type(f"Pruned{base.__name__}", (base,), {"__init__": __init__})
    return _PRUNED_CLASSES[base]


def load_pruned(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs) -> PreTrainedModel:
    """Load a checkpoint written by :func:`save_pruned` (uniform or heterogeneous widths)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a directory written by save_pruned")
    config = AutoConfig.from_pretrained(path)
    architecture_of(config)
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = pruned_model_class(base).from_pretrained(path, config=config, dtype=dtype, **kwargs)
    return model.eval()
