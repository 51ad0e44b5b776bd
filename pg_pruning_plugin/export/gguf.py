"""GGUF export of pruned models for llama.cpp, the serving runtime that can express per-layer widths.

Stock transformers / vLLM Llama modules have one ``num_attention_heads``, ``num_key_value_heads`` and
``intermediate_size`` for all layers; a pruned model with heterogeneous widths or removed blocks does
not fit them. llama.cpp reads ``<arch>.attention.head_count``, ``<arch>.attention.head_count_kv`` and
``<arch>.feed_forward_length`` either as one number or as one number per layer, and its ``deci``
architecture (written for NVIDIA's Nemotron-51B / DeciLM) builds every layer at its own widths and
skips blocks whose width is 0. :func:`export_gguf` writes that format:

* uniform widths, no removed blocks: architecture ``llama`` with scalar widths (any llama.cpp build,
  and the tools built on it, load it);
* anything else: architecture ``deci`` with per-layer arrays. Two details of llama.cpp's ``deci``
  graph are worked around with exact zero stand-ins (they contribute exactly 0 to the residual stream),
  so the file computes the pruned model's function:
  - a layer that keeps its attention but lost its MLP is written with a 1-channel MLP whose weights
    are zero, because the ``deci`` graph discards the attention output of a layer with
    ``feed_forward_length == 0`` (``src/models/deci.cpp``: the FFN-free branch ``continue``s before the
    residual stream is updated; measured: wrong logits for a middle layer, ``GGML_ASSERT(buffer)`` for
    the last one);
  - a removed attention block in layer 0 is written as one zero query/KV head, because llama.cpp derives
    the head size only when layer 0 has heads (``llama_model::load_hparams``: ``if (hparams.n_head() > 0)``;
    measured: ``GGML_ASSERT(t_meta.ne[dim] >= 1)`` at load).
  The true per-layer widths are recorded under ``pg_pruning_plugin.pruned_layers`` (JSON). Measured with
  node-llama-cpp 3.22.1 (llama.cpp tag v0.5.0).

Supported families: ``llama`` (Llama 1/2/3, SmolLM2, Vicuna), ``mistral`` and ``qwen2``: their decoder
layer is exactly llama.cpp's (RMSNorm, RoPE, SiLU-gated MLP, optional q/k/v/o and MLP biases). Others
are refused: Qwen3 and Gemma 3 have per-head q/k norms, Gemma 1/2 scale the embeddings and use
GELU and extra norms, none of which the ``deci`` graph computes.

Q and K rows are reordered per head for llama.cpp's RoPE, which rotates adjacent pairs where
transformers rotates the two halves of a head (the same reordering ``convert_hf_to_gguf.py`` applies
to Llama checkpoints), with each layer's own head counts.

Running the file in llama.cpp and comparing it with transformers is llama_cpp.py's job.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.architectures import SearchSpace, architecture_of, decoder_layers
from ..core.checkpoint import load_model_dir
from ..resources.assets import smollm2_gguf
from ..resources.files import atomic_file
from ..resources.outputs import check_output, model_source

__all__ = ["GGUF_DTYPES", "GGUF_FAMILIES", "LayerPlan", "check_gguf_output", "check_unquantized", "export_gguf",
           "gguf_layer_plan", "permute_for_llama_cpp_rope"]

logger = logging.getLogger(__name__)

GGUF_FAMILIES = ("llama", "mistral", "qwen2")
GGUF_DTYPES = ("f32", "f16")
_REFUSED = {
    "qwen3": "Qwen3 has per-head q/k RMSNorms, which llama.cpp's deci/llama graphs do not compute",
    "gemma": "Gemma scales the embeddings and uses GELU, which llama.cpp's deci/llama graphs do not compute",
    "gemma2": "Gemma 2 has extra norms and soft-capping, which llama.cpp's deci/llama graphs do not compute",
    "gemma3_text": "Gemma 3 has per-head q/k norms and sliding windows, which llama.cpp's deci graph does not compute",
}
# tokenizer.ggml.pre names llama.cpp knows, for byte-level BPE tokenizers built from an HF tokenizer
_KNOWN_PRE = {"smollm": "SmolLM/SmolLM2", "llama-bpe": "Llama 3", "qwen2": "Qwen2/2.5"}


@dataclass(frozen=True)
class LayerPlan:
    """What one GGUF layer holds: the pruned widths and the (possibly stand-in) widths written."""

    heads: int  # query heads in the model
    kv_heads: int
    ff: int  # MLP channels in the model
    gguf_heads: int  # written to the GGUF (differs only for a zero stand-in)
    gguf_kv_heads: int
    gguf_ff: int

    @property
    def zero_attention(self) -> bool:
        return self.heads == 0 and self.gguf_heads > 0

    @property
    def zero_mlp(self) -> bool:
        return self.ff == 0 and self.gguf_ff > 0


def gguf_layer_plan(space: SearchSpace) -> tuple[str, list[LayerPlan]]:
    """The llama.cpp architecture (``llama`` or ``deci``) and per-layer widths for a model's widths."""
    widths = [(s.num_attention_heads, s.num_kv_groups, s.intermediate_size) for s in space.layers]
    if all(w == widths[0] for w in widths) and not space.has_removed_blocks:
        return "llama", [LayerPlan(*widths[0], *widths[0]) for _ in widths]
    plan = []
    for i, (heads, kv, ff) in enumerate(widths):
        g_heads, g_kv, g_ff = heads, kv, ff
        if i == 0 and heads == 0:
            g_heads, g_kv = 1, 1  # layer 0 must have heads for llama.cpp to read the head size
        if ff == 0 and heads > 0:
            g_ff = 1  # deci drops the attention output of an FFN-free layer
        plan.append(LayerPlan(heads, kv, ff, g_heads, g_kv, g_ff))
    return "deci", plan


def permute_for_llama_cpp_rope(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder the rows of a q/k weight (or bias) inside each head from halves to adjacent pairs.

    transformers' ``rotate_half`` pairs row ``j`` with ``j + head_dim/2``; llama.cpp's normal RoPE pairs
    rows ``2j`` and ``2j+1``. Row ``j`` (first half) moves to ``2j``, row ``j + head_dim/2`` to ``2j+1``.
    """
    rows = weight.shape[0]
    if rows % head_dim or head_dim % 2:
        raise ValueError(f"{rows} rows are not whole heads of {head_dim} (even) dimensions")
    heads = rows // head_dim
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _rope_settings(config) -> tuple[float, str, dict]:
    """``(theta, rope_type, parameters)`` from a transformers 5 (``rope_parameters``) or 4 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    return float(params.get("rope_theta", 10000.0)), str(rope_type), params


def _llama3_rope_factors(theta: float, head_dim: int, params: dict) -> torch.Tensor:
    """Per-frequency divisors of Llama 3 RoPE scaling, the form llama.cpp reads as ``rope_freqs.weight``."""
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    divisor = 1.0 / ((1.0 - smooth) / factor + smooth)  # 1 for short wavelengths, `factor` for long ones
    return divisor.to(torch.float32)


def _check_supported(model: nn.Module) -> None:
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if model_type in _REFUSED:
        raise ValueError(f"GGUF export does not support model_type {model_type!r}: {_REFUSED[model_type]}. "
                         f"Supported: {', '.join(GGUF_FAMILIES)}")
    if model_type not in GGUF_FAMILIES:
        raise ValueError(f"GGUF export does not support model_type {model_type!r}; supported: "
                         f"{', '.join(GGUF_FAMILIES)}")
    architecture_of(model)
    if any(isinstance(m, nn.Linear) and not isinstance(getattr(m, "weight", None), torch.Tensor)
           for m in model.modules()):
        raise ValueError("the model holds quantized (compressed-tensors) weights; export the unquantized pruned "
                         "checkpoint and quantize the GGUF with llama.cpp's llama-quantize instead")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"GGUF export needs hidden_act 'silu'; the model uses {config.hidden_act!r}")
    if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ValueError("GGUF export needs RoPE over the whole head (partial_rotary_factor 1)")
    _, rope_type, _ = _rope_settings(config)
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"GGUF export supports RoPE types default, linear and llama3; the model uses {rope_type!r}")
    window = getattr(config, "sliding_window", None)
    uses_window = window and (model_type == "mistral" or getattr(config, "use_sliding_window", False))
    if uses_window and window < config.max_position_embeddings:
        logger.warning("the model has a %d-token sliding window; llama.cpp's llama/deci graphs attend to the whole "
                       "context, so outputs agree only for contexts of at most %d tokens", window, window)


def _is_tied(model: nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is None or out.weight is emb.weight or out.weight.data_ptr() == emb.weight.data_ptr()


def _model_tensors(model: nn.Module, plan: list[LayerPlan], head_dim: int, dtype: str):
    """Yield ``(gguf name, numpy array)`` for every tensor llama.cpp will load, in its naming."""
    import gguf

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    spec = architecture_of(model)
    config = model.config.get_text_config()
    hidden = config.hidden_size

    def arr(t: torch.Tensor) -> np.ndarray:
        t = t.detach().to("cpu")
        half = dtype == "f16" and t.ndim == 2
        return t.to(torch.float16 if half else torch.float32).contiguous().numpy()

    def weight_name(kind, bid=None, suffix="weight"):
        return f"{names[kind].format(bid=bid)}.{suffix}"

    yield weight_name(T.TOKEN_EMBD), arr(model.get_input_embeddings().weight)
    theta, rope_type, params = _rope_settings(config)
    if rope_type == "llama3":
        yield weight_name(T.ROPE_FREQS), _llama3_rope_factors(theta, head_dim, params).numpy()
    for i, (layer, p) in enumerate(zip(decoder_layers(model), plan)):
        attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        if p.gguf_heads:
            yield weight_name(T.ATTN_NORM, i), arr(layer.input_layernorm.weight)
        if p.zero_attention:
            zeros = torch.zeros(head_dim, hidden)
            for kind in (T.ATTN_Q, T.ATTN_K, T.ATTN_V):
                yield weight_name(kind, i), arr(zeros)
            yield weight_name(T.ATTN_OUT, i), arr(zeros.T)
        elif p.gguf_heads:
            for kind, proj, rope in ((T.ATTN_Q, spec.q, True), (T.ATTN_K, spec.k, True), (T.ATTN_V, spec.v, False),
                                     (T.ATTN_OUT, spec.o, False)):
                linear = getattr(attn, proj)
                w, b = linear.weight, linear.bias
                if rope:
                    w = permute_for_llama_cpp_rope(w, head_dim)
                    b = None if b is None else permute_for_llama_cpp_rope(b, head_dim)
                yield weight_name(kind, i), arr(w)
                if b is not None:
                    yield weight_name(kind, i, "bias"), arr(b)
        if p.gguf_ff:
            yield weight_name(T.FFN_NORM, i), arr(getattr(layer, spec.mlp_norm).weight)
        if p.zero_mlp:
            zeros = torch.zeros(1, hidden)
            yield weight_name(T.FFN_GATE, i), arr(zeros)
            yield weight_name(T.FFN_UP, i), arr(zeros)
            yield weight_name(T.FFN_DOWN, i), arr(zeros.T)
        elif p.gguf_ff:
            for kind, proj in ((T.FFN_GATE, spec.gate), (T.FFN_UP, spec.up), (T.FFN_DOWN, spec.down)):
                linear = getattr(mlp, proj)
                yield weight_name(kind, i), arr(linear.weight)
                if linear.bias is not None:
                    yield weight_name(kind, i, "bias"), arr(linear.bias)
    yield weight_name(T.OUTPUT_NORM), arr(model.model.norm.weight)
    if not _is_tied(model):
        yield weight_name(T.OUTPUT), arr(model.get_output_embeddings().weight)


# ---------------------------------------------------------------------------------------------- tokenizer


def _hf_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    special = {a["id"]: a["special"] for a in backend.get("added_tokens", [])}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in special else
                         gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def _guess_pre(tokenizer, model_type: str) -> str | None:
    vocab = tokenizer.get_vocab()
    if model_type == "qwen2":
        return "qwen2"
    if "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    if vocab.get("<|endoftext|>") == 0 and vocab.get("<|im_start|>") == 1 and len(vocab) == 49152:
        return "smollm"
    return None


def _write_hf_tokenizer(writer, tokenizer, vocab_size: int, model_type: str, pre: str | None) -> None:
    """Tokenizer metadata built from a byte-level BPE HF tokenizer (``tokenizer.ggml.model`` gpt2)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers) tokenizer, or tokenizer_gguf= a GGUF of the base model")
    tj = json.loads(backend.to_str())
    if tj["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")):
        raise ValueError("only byte-level BPE tokenizers (GPT-2 style) are built from the HF tokenizer; for this one "
                         "pass tokenizer_gguf= a GGUF of the base model (e.g. from llama.cpp's convert_hf_to_gguf.py)")
    pre = pre or _guess_pre(tokenizer, model_type)
    if pre is None:
        raise ValueError("cannot tell llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for this tokenizer; pass "
                         f"tokenizer_pre= (e.g. {', '.join(f'{k!r} for {v}' for k, v in _KNOWN_PRE.items())}) or "
                         "tokenizer_gguf= a GGUF of the base model")
    tokens, types = _hf_tokens(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _gguf_tokenizer_fields(path: Path) -> dict[str, tuple]:
    """``{key: (value, type, array item type)}`` for every ``tokenizer.*`` key of a GGUF (cached per file version;
    ``GGUFReader`` takes seconds over a 49k-token vocabulary)."""
    st = Path(path).stat()
    return _read_tokenizer_fields(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_tokenizer_fields(path: str, mtime_ns: int, size: int) -> dict[str, tuple]:
    import gguf

    fields = {}
    for key, f in gguf.GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            vtype = f.types[0]
            fields[key] = (f.contents(), vtype, f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    return fields


def _copy_gguf_tokenizer(writer, source: Path, vocab_size: int) -> None:
    """Copy every ``tokenizer.*`` key of ``source`` (a GGUF) into ``writer``."""
    fields = _gguf_tokenizer_fields(source)
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{source} has no tokenizer metadata (tokenizer.ggml.tokens)")
    n = len(fields["tokenizer.ggml.tokens"][0])
    if n != vocab_size:
        raise ValueError(f"{source} has {n} tokens but the model's vocab_size is {vocab_size}")
    for key, (value, vtype, sub) in fields.items():
        writer.add_key_value(key, value, vtype, sub)


def _smollm2_gguf_if_matching(tokenizer) -> Path | None:
    """The embedded SmolLM2 GGUF when ``tokenizer`` has exactly its vocabulary (SmolLM2-derived models)."""
    if tokenizer is None or _guess_pre(tokenizer, "") != "smollm":
        return None
    try:
        source = smollm2_gguf()
    except (RuntimeError, OSError) as exc:
        logger.info("embedded SmolLM2 GGUF unavailable (%s); building tokenizer metadata from the HF tokenizer", exc)
        return None
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens = _gguf_tokenizer_fields(source).get("tokenizer.ggml.tokens", ([],))[0]
    return source if tokens == [by_id.get(i) for i in range(len(by_id))] else None


# ---------------------------------------------------------------------------------------------- export


def check_gguf_output(path: str | os.PathLike, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike] = (), overwrite_hint: str = "overwrite=True") -> Path:
    """The resolved output path, after refusing a name without ``.gguf``, an existing file without
    ``overwrite``, and a path on or inside the input model or the caches (``resources.outputs``)."""
    out = check_output(path, overwrite, inputs, overwrite_hint)
    if out.suffix != ".gguf":
        raise ValueError(f"output {out} must end in .gguf")
    return out


def check_unquantized(config: dict, source) -> None:
    """Refuse a quantized checkpoint (``quantization_config`` in its config, e.g. compressed-tensors) from its
    config alone: GGUF export writes float weights and would have to de-quantize them first."""
    quantization = (config.get("text_config") or config).get("quantization_config") or config.get(
        "quantization_config")
    if quantization:
        method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
        raise ValueError(
            f"{source} is a {method} checkpoint; GGUF export needs the unquantized weights. Export the checkpoint "
            f"before quantization (pg-prune prune's output, or a pruning-only recipe's), then quantize the GGUF with "
            f"llama.cpp's llama-quantize (docs/serving.md)"
        )


def export_gguf(model_or_dir, path: str | os.PathLike, tokenizer=None, overwrite: bool = False, dtype: str = "f32",
                tokenizer_gguf: str | os.PathLike | None = None, tokenizer_pre: str | None = None,
                name: str | None = None) -> Path:
    """Write a (pruned) Llama / Mistral / Qwen2 model as a GGUF file for llama.cpp; returns the path.

    ``model_or_dir``: a model in memory (pruned or not) or a directory (``save_pruned`` output or a plain
    HF checkpoint; its tokenizer is used when ``tokenizer`` is None). ``dtype``: ``"f32"`` or ``"f16"``
    (2-D weights only; norms stay f32). Tokenizer metadata comes from ``tokenizer_gguf`` (every
    ``tokenizer.*`` key is copied), else (when ``tokenizer_pre`` is not given) from the embedded SmolLM2
    GGUF when the tokenizer has its exact vocabulary, else it is built from ``tokenizer`` (byte-level BPE;
    ``tokenizer_pre`` names llama.cpp's pre-tokenizer, guessed for SmolLM2, Llama 3 and Qwen2). The file
    is written under a temporary name and renamed into place; an existing ``path`` is refused unless
    ``overwrite``. ``name``: ``general.name`` (default: the model's directory name).
    """
    import gguf

    from_dir = not isinstance(model_or_dir, nn.Module)
    out = check_gguf_output(path, overwrite, [model_or_dir] if from_dir else model_source(model_or_dir))
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    if tokenizer_gguf is not None and not Path(tokenizer_gguf).is_file():
        raise FileNotFoundError(f"tokenizer GGUF {tokenizer_gguf} does not exist")
    config_file = Path(model_or_dir).expanduser() / "config.json" if from_dir else None
    if config_file is None or config_file.is_file():  # a missing config is load_model_dir's error
        check_unquantized(json.loads(config_file.read_text(encoding="utf-8")) if config_file else
                          model_or_dir.config.to_dict(), model_or_dir if from_dir else "the model")
    model, tokenizer = load_model_dir(model_or_dir, tokenizer)
    _check_supported(model)
    config = model.config.get_text_config()
    space = SearchSpace.from_model(model)
    head_dim = space.layers[0].head_dim
    arch, plan = gguf_layer_plan(space)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    if tokenizer_gguf is not None:
        source = Path(tokenizer_gguf)
    else:  # an explicit tokenizer_pre asks for metadata built from the HF tokenizer
        source = _smollm2_gguf_if_matching(tokenizer) if tokenizer_pre is None else None
    if source is None and tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer=, tokenizer_gguf=, or a directory that contains one")

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "")).name or "pruned-model")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_block_count(len(plan))
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        per_layer = arch == "deci"
        writer.add_feed_forward_length([p.gguf_ff for p in plan] if per_layer else plan[0].gguf_ff)
        writer.add_head_count([p.gguf_heads for p in plan] if per_layer else plan[0].gguf_heads)
        writer.add_head_count_kv([p.gguf_kv_heads for p in plan] if per_layer else plan[0].gguf_kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        theta, rope_type, params = _rope_settings(config)
        writer.add_rope_freq_base(theta)
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(vocab_size))
        writer.add_string("pg_pruning_plugin.pruned_layers", json.dumps(
            [{"num_attention_heads": p.heads, "num_key_value_heads": p.kv_heads, "intermediate_size": p.ff}
             for p in plan]))
        if source is not None:
            _copy_gguf_tokenizer(writer, source, vocab_size)
        else:
            _write_hf_tokenizer(writer, tokenizer, vocab_size, config.model_type, tokenizer_pre)
        n_tensors = 0
        for tensor_name, data in _model_tensors(model, plan, head_dim, dtype):
            writer.add_tensor(tensor_name, data)
            n_tensors += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    stand_ins = [i for i, p in enumerate(plan) if p.zero_attention or p.zero_mlp]
    logger.info("GGUF (%s, %s, %d layers, %d tensors) written to %s%s", arch, dtype, len(plan), n_tensors, out,
                f"; zero stand-in blocks in layers {stand_ins}" if stand_ins else "")
    return out
