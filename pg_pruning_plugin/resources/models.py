"""Model loading: the embedded SmolLM2 default, local HF directories, GGUF files and Hub ids.

GGUF files are de-quantized once by transformers' gguf support and re-saved as a plain safetensors
directory under ``cache_dir()/models/`` (bf16 on disk, like the reference baselines), so later loads
are an ordinary fast ``from_pretrained``. Note that the SmolLM2 weights are de-quantized Q4_1: every
"dense" baseline carries 4-bit quantization noise.

The compute dtype is chosen per device, not by the checkpoint: :func:`default_dtype` gives float32 on
the CPU and bfloat16 on accelerators, for every command and for :func:`load_model`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .assets import cache_dir, smollm2_gguf
from .files import atomic_directory, write_atomic

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_DTYPE = torch.bfloat16  # dtype of the re-saved GGUF directories (halves disk; weights are Q4 anyway)

_LOCAL_ALTERNATIVES = (
    f"use {DEFAULT_MODEL!r} (the embedded SmolLM2-135M-Instruct), a local Hugging Face model directory, "
    "or a .gguf file"
)


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The compute dtype used unless one is asked for: float32 on the CPU (bfloat16 matmuls are slow and
    coarse there), bfloat16 on an accelerator."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def as_dtype(dtype: torch.dtype | str | None, device: str | torch.device = "cpu") -> torch.dtype:
    """``torch.float32`` or ``"float32"``/``"torch.float32"`` -> ``torch.dtype`` (ValueError if unknown);
    ``None`` or ``"auto"``: :func:`default_dtype` of ``device``."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _looks_like_path(name: str) -> bool:
    """True for strings that cannot be a Hub id (``org/name`` or ``name``)."""
    return (
        name.endswith(".gguf")
        or name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def gguf_cache_path(gguf_path: str | os.PathLike) -> Path:
    """Directory where the plain re-saved copy of ``gguf_path`` lives (keyed by name, size, mtime)."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{p.stem}-{key}"


def _align_special_tokens(tok: PreTrainedTokenizerBase, cfg) -> None:
    """Make the tokenizer's eos/pad agree with the model config (the GGUF tokenizer sets eos = bos)."""
    for attr in ("eos", "pad"):
        want = getattr(cfg, f"{attr}_token_id", None)
        if isinstance(want, int) and 0 <= want < len(tok) and getattr(tok, f"{attr}_token_id") != want:
            token = tok.convert_ids_to_tokens(want)
            logger.info("setting tokenizer %s_token to %r (id %d) from the model config", attr, token, want)
            setattr(tok, f"{attr}_token", token)


def _resave_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize ``gguf_path`` and save it as a plain HF directory at ``out_dir`` (atomic)."""
    folder, fname = str(gguf_path.parent), gguf_path.name
    logger.info("de-quantizing %s once (cached at %s)", gguf_path, out_dir)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    cfg = copy.deepcopy(gguf_model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a GGUF-marked model refuses save_pretrained
    plain = type(gguf_model)(cfg)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    bad_missing = [k for k in missing if "rotary" not in k]
    if unexpected or bad_missing:
        raise RuntimeError(f"GGUF re-save mismatch: missing={bad_missing} unexpected={unexpected}")
    plain.tie_weights()
    del gguf_model
    _align_special_tokens(tok, cfg)
    with atomic_directory(out_dir, replace=False) as tmp:  # a concurrent writer's finished copy is kept
        plain.to(CACHE_DTYPE).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    _bpe_cleanup_off(out_dir)


def _bpe_cleanup_off(model_dir: Path) -> None:
    """Record ``clean_up_tokenization_spaces: false`` in a cached GGUF copy's tokenizer config.

    GGUF tokenizers are BPE (byte-level or SentencePiece), for which transformers ignores the clean-up (it
    would strip spaces before punctuation) and warns about it on every load; ``false`` is what it does
    anyway. Copies cached before this was recorded are corrected on their next use.
    """
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("clean_up_tokenization_spaces") is not False:
        write_atomic(path, json.dumps(config | {"clean_up_tokenization_spaces": False}, indent=2) + "\n")


def resolve_model_dir(name_or_path: str | os.PathLike | None = None) -> str:
    """Map a model spec to something ``from_pretrained`` accepts without GGUF handling.

    ``None``/``DEFAULT_MODEL`` and ``.gguf`` files become their cached plain directory (created on first
    use); local directories are returned as is; other strings are returned as Hub ids.
    Raises ``FileNotFoundError`` for a path that does not exist.
    """
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if name == DEFAULT_MODEL:
        gguf = smollm2_gguf()
    else:
        p = Path(name).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"{p} is a directory without config.json; {_LOCAL_ALTERNATIVES}")
            return str(p)
        if p.is_file():
            if p.suffix != ".gguf":
                raise ValueError(f"{p} is a file but not a .gguf model; {_LOCAL_ALTERNATIVES}")
            gguf = p
        elif _looks_like_path(name):
            raise FileNotFoundError(f"model path {name!r} does not exist; {_LOCAL_ALTERNATIVES}")
        else:
            return name  # Hugging Face Hub id
    out = gguf_cache_path(gguf)
    if not (out / "config.json").is_file():
        _resave_gguf(Path(gguf), out)
    _bpe_cleanup_off(out)
    return str(out)


def model_paths(name_or_path: str | os.PathLike | None = None) -> list[Path]:
    """The local paths a model spec reads, found without building anything: a directory; a ``.gguf`` file
    and its cached plain copy (the embedded default's too); nothing for a Hub id. Outputs must stay clear
    of them (:func:`~pg_pruning_plugin.resources.outputs.check_output`)."""
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    gguf = smollm2_gguf() if name == DEFAULT_MODEL else Path(name).expanduser()
    if gguf.is_file() and gguf.suffix == ".gguf":
        return [gguf, gguf_cache_path(gguf)]
    return [gguf] if gguf.exists() else []


def weightless_model(model_dir: str | os.PathLike) -> PreTrainedModel:
    """The causal LM of ``model_dir``'s config on the meta device: its shapes, with no weight read or
    allocated (for checks before loading)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of any model spec accepted by :func:`load_model`."""
    src = resolve_model_dir(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(src)
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load tokenizer {src!r} (Hub unreachable or unknown id?): {exc}; {_LOCAL_ALTERNATIVES}"
        ) from exc


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` with ``dtype`` (default:
    :func:`default_dtype` of ``device``: float32 on the CPU, bfloat16 on an accelerator).

    ``name_or_path``: ``None`` or ``"smollm2-135m"`` (embedded default), a local HF directory, a ``.gguf``
    file (de-quantized once and cached) or a Hugging Face Hub id. A missing path raises
    ``FileNotFoundError``; an unreachable Hub id raises ``FileNotFoundError`` naming the local alternatives.
    """
    src = resolve_model_dir(name_or_path)
    torch_dtype = as_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=torch_dtype, attn_implementation=attn_implementation
        )
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load model {src!r} (Hub unreachable or unknown id?): {exc}; {_LOCAL_ALTERNATIVES}"
        ) from exc
    model.to(device)
    model.eval()
    return model, tokenizer

