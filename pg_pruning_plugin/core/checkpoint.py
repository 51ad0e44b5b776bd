"""Saving and loading pruned models.

``save_pruned`` writes ``save_pretrained`` output (plus tokenizer) to a temporary directory and
renames it into place, so an interrupted run never leaves a half-written model; it refuses an output
on the model's own source directory or the caches (``resources.outputs``), and a model whose config
does not describe its weights (pruned without updating the config), which nothing could load. The
config keeps ``pruned_layers`` (per-layer widths; 0 marks a removed block). Uniform widths also set
the standard config fields, so stock ``AutoModelForCausalLM.from_pretrained`` loads them; heterogeneous
widths load with :func:`load_pruned`, which builds each layer's projections at the recorded sizes
before the weights are read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..resources.files import atomic_directory
from ..resources.outputs import check_output, model_source
from .architectures import PROJECTION_ROLES, SearchSpace, architecture_of, decoder_layers
from .removal import RemovedAttention, RemovedMLP
from .slicing import UNIT_AXES

__all__ = ["check_config_describes_weights", "is_pruned_checkpoint", "load_model_dir", "load_pruned",
           "pruned_model_class", "save_pruned"]

logger = logging.getLogger(__name__)


def save_pruned(model: PreTrainedModel, output_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                inputs: Iterable[str | os.PathLike] = (), extra_files: dict[str, str] | None = None) -> Path:
    """Atomically write ``model`` (and ``tokenizer``) to ``output_dir``; returns the final path.

    Refuses (before writing anything) an existing ``output_dir`` unless ``overwrite``; an output on, inside
    or around the directory the model was loaded from (``config._name_or_path``), the other ``inputs`` or
    the caches, whatever ``overwrite`` says; and a model whose config does not describe its weights
    (:func:`check_config_describes_weights`).
    """
    out = check_output(output_dir, overwrite, [*model_source(model), *inputs])
    check_config_describes_weights(model)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    logger.info("pruned model written to %s", out)
    return out


def check_config_describes_weights(model: PreTrainedModel) -> None:
    """Raise ``ValueError`` unless every Linear's ``in/out_features`` match its weight and the config's
    widths (``pruned_layers``, else the standard fields) match every decoder layer's weights.

    A model pruned without updating its config (a plain Torch-Pruning step, say) fails here: saved, it
    would load with neither :func:`load_pruned` nor ``from_pretrained``.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (module.out_features, module.in_features) != tuple(module.weight.shape):
            raise ValueError(f"{name}: in/out_features ({module.in_features}, {module.out_features}) do not match its "
                             f"weight {tuple(module.weight.shape)}; the model was pruned without resetting them")
    config = model.config.get_text_config()
    space = SearchSpace.from_model(model)
    recorded = getattr(config, "pruned_layers", None)
    if recorded is None:
        recorded = [{key: getattr(config, key) for key in ("num_attention_heads", "num_key_value_heads",
                                                           "intermediate_size")}] * config.num_hidden_layers
    if len(recorded) != space.num_layers or config.num_hidden_layers != space.num_layers:
        raise ValueError(f"the config records {config.num_hidden_layers} layers ({len(recorded)} widths) but the model "
                         f"has {space.num_layers}; update the config (core.removal.update_config) before saving")
    for i, (widths, shape) in enumerate(zip(recorded, space.layers)):
        actual = {"num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_kv_groups,
                  "intermediate_size": shape.intermediate_size}
        if any(widths[key] != value for key, value in actual.items()):
            raise ValueError(
                f"layer {i}: the config records {widths['num_attention_heads']} query heads, "
                f"{widths['num_key_value_heads']} KV heads and {widths['intermediate_size']} MLP channels, but its "
                f"weights hold {actual['num_attention_heads']}, {actual['num_key_value_heads']} and "
                f"{actual['intermediate_size']}: the model was pruned without updating its config, and the checkpoint "
                f"would not load. Prune with prune_model or prune_step (Torch-Pruning: not a plain pruner.step()), "
                f"or call pg_pruning_plugin.core.removal.update_config(model) before saving"
            )


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
