"""Perplexity under the two protocols of the literature (never compare numbers across them).

* ``seq_len=128`` ("LLM-Pruner/FLAP", the paper's): the eval text is tokenized once without special tokens
  and cut into non-overlapping 128-token windows (remainder dropped); batches of 8 windows;
  ``PPL = exp(mean over batches of the batch-mean token cross-entropy)``; NaN batches are dropped.
  Dense SmolLM2-135M-Instruct (de-quantized Q4_1) on the wiki-vital eval split: 909 windows, PPL 19.73.
* ``seq_len=2048`` ("SparseGPT/SliceGPT"): non-overlapping 2048-token windows,
  ``PPL = exp(token-weighted mean cross-entropy)``; the model must allow 2048 positions.

``reduction="batch"`` is the default for ``seq_len <= 128``, ``"token"`` above; both can be forced.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..core.modeling import eval_mode, model_device, next_token_losses
from ..resources.text import DEFAULT_TEXT, Split, source_blocks

__all__ = ["PerplexityResult", "perplexity", "perplexity_on_blocks"]

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity over ``n_windows`` windows of ``seq_len`` tokens; ``n_tokens`` = scored (predicted) tokens."""

    ppl: float
    seq_len: int
    n_windows: int
    n_tokens: int
    source: str
    split: str = "eval"
    reduction: str = "batch"

    def __str__(self) -> str:
        return (f"PPL {self.ppl:.2f} ({self.source} {self.split}, "
                f"{self.n_windows} windows x {self.seq_len} tokens)")


def _max_positions(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) if cfg is not None else None


@torch.no_grad()
def perplexity_on_blocks(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    reduction: Literal["batch", "token"] = "batch",
    progress: bool = True,
) -> tuple[float, int]:
    """``(ppl, n_scored_tokens)`` of ``model`` on ``blocks`` ``[N, L]`` (each row is an independent window).

    ``reduction="batch"``: exp(mean over batches of batch-mean CE); ``"token"``: exp(token-weighted mean
    CE). Batches whose loss is not finite are dropped with a warning. ``model(input_ids=..., use_cache=False)``
    must return an object with ``.logits`` (or a logits tensor).
    """
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N, L] with L >= 2, got {tuple(blocks.shape)}")
    if reduction not in ("batch", "token"):
        raise ValueError(f"reduction must be 'batch' or 'token', got {reduction!r}")
    device = model_device(model)
    batch_means: list[float] = []
    total_nll, total_tokens, dropped = 0.0, 0, 0
    with eval_mode(model):
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc="perplexity", disable=not progress,
                          leave=False):
            batch = blocks[start:start + batch_size].to(device)
            out = model(input_ids=batch, use_cache=False)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            nll = next_token_losses(logits, batch).double().sum().item()
            count = batch[:, 1:].numel()
            if not math.isfinite(nll):
                dropped += 1
                continue
            batch_means.append(nll / count)
            total_nll += nll
            total_tokens += count
    if dropped:
        logger.warning("perplexity: dropped %d non-finite batch(es)", dropped)
    if not batch_means:
        return float("nan"), 0
    mean_ce = sum(batch_means) / len(batch_means) if reduction == "batch" else total_nll / total_tokens
    return math.exp(mean_ce), total_tokens


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: str = DEFAULT_TEXT,
    seq_len: int = 128,
    batch_size: int | None = None,
    max_windows: int | None = None,
    split: Split = "eval",
    progress: bool = True,
    reduction: Literal["batch", "token"] | None = None,
    add_bos: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on non-overlapping ``seq_len`` windows of ``source``/``split``.

    See the module docstring for the two protocols. ``batch_size`` defaults to 8 for the batch protocol and
    to ``max(1, 8192 // seq_len)`` for the token protocol (where it does not change the result).
    ``max_windows`` keeps the first windows only. Raises ``ValueError`` if the text is shorter than one
    window or ``seq_len`` exceeds the model's ``max_position_embeddings``.
    """
    max_pos = _max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    reduction = reduction or ("batch" if seq_len <= 128 else "token")
    if batch_size is None:
        batch_size = 8 if reduction == "batch" else max(1, 8192 // seq_len)
    blocks = source_blocks(tokenizer, source, split, seq_len, max_blocks=max_windows, add_bos=add_bos)
    ppl, n_tokens = perplexity_on_blocks(model, blocks, batch_size, reduction, progress)
    result = PerplexityResult(ppl, seq_len, blocks.shape[0], n_tokens, source, split, reduction)
    logger.debug("%s", result)
    return result
