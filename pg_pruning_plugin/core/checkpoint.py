"""Saving and loading pruned models.

``save_pruned`` writes ``save_pretrained`` output (plus tokenizer) to a temporary directory and
renames it into place, so an interrupted run never leaves a half-written model. The config keeps
``pruned_layers`` (per-layer widths; 0 marks a removed block). Uniform widths also set the standard config
fields, so stock ``AutoModelForCausalLM.from_pretrained`` loads them; heterogeneous widths load with
:func:`load_pruned`, which builds each layer's projections at the recorded sizes before the weights
are read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..resources.files import atomic_directory, check_output_dir
from .architectures import PROJECTION_ROLES, architecture_of, decoder_layers
from .removal import RemovedAttention, RemovedMLP
from .slicing import UNIT_AXES

__all__ = ["is_pruned_checkpoint", "load_model_dir", "load_pruned", "pruned_model_class", "save_pruned"]

logger = logging.getLogger(__name__)


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
    head_dim = model.config.get_text_config().head_dim
    layers = decoder_layers(model)
    if len(widths) != len(layers):
        raise ValueError(f"config records {len(widths)} pruned layers but the model has {len(layers)}")
    for i, (layer, w) in enumerate(zip(layers, widths)):
        kv_heads, channels = w["num_key_value_heads"], w["intermediate_size"]
        width = {"query": w["num_attention_heads"] * head_dim, "kv": kv_heads * head_dim, "mlp": channels}
        kept_blocks = {spec.attention: kv_heads > 0, spec.mlp: channels > 0}
        for role in PROJECTION_ROLES:
            kind, dim = UNIT_AXES[role]
            parent = getattr(layer, spec.block_of(role))
            if not kept_blocks[spec.block_of(role)]:
                continue
            old = getattr(parent, getattr(spec, role))
            shape = [old.out_features, old.in_features]
            shape[dim] = width[kind]
            setattr(parent, getattr(spec, role), nn.Linear(shape[1], shape[0], bias=old.bias is not None,
                                                          device=old.weight.device, dtype=old.weight.dtype))
        if kv_heads:
            getattr(layer, spec.attention).num_key_value_groups = w["num_attention_heads"] // kv_heads
        else:
            setattr(layer, spec.attention, RemovedAttention(i))
        if channels:
            getattr(layer, spec.mlp).intermediate_size = channels
        else:
            setattr(layer, spec.mlp, RemovedMLP())


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


def is_pruned_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by :func:`save_pruned` (its config records ``pruned_layers``)."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    saved = json.loads(config.read_text(encoding="utf-8"))
    return bool(saved.get("pruned_layers") or (saved.get("text_config") or {}).get("pruned_layers"))


def load_model_dir(model_or_dir, tokenizer=None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer)``: a model passes through; a directory loads with :func:`load_pruned` (pruned
    checkpoints) or ``from_pretrained``, with its tokenizer when ``tokenizer`` is None and the directory has one."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir, tokenizer
    path = Path(model_or_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    if is_pruned_checkpoint(path):
        model = load_pruned(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            logger.info("no tokenizer in %s (%s)", path, exc)
    return model.to(device), tokenizer
