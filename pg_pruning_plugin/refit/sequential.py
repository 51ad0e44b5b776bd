"""The refit step: repair the surviving weights of a pruned model from forward statistics.

:func:`refit` takes the *unpruned* model and the final 0/1 masks and visits the decoder layers in
order over calibration text (:class:`~.statistics.LayerStream`). In layer ``l`` it

1. runs the layer's attention on the hidden states of the model already pruned and refitted up to
   ``l − 1``, and accumulates the statistics of the ``o_proj`` input over every channel (the heads the
   mask removes included: the target is the dense layer's output on these inputs);
2. writes ``o_proj``'s new kept columns (``method``), and zeroes the removed ones, so the layer now
   computes what the pruned layer computes;
3. does the same for ``down_proj`` with the MLP input, measured after step 2;
4. advances the hidden states through the pruned, refitted layer.

Methods (:data:`REFIT_METHODS`):

* ``"lstsq"``: ``W'_k = W H[:, k] (H_kk + λI)⁻¹`` (:func:`~.lstsq.lstsq_weights`), so the kept channels
  reproduce the dense projection's output ``W X``; a projection whose refit would not lower the
  calibration error keeps its weights (never the case except for rounding when nothing is removed).
* ``"bias"``: FLAP's compensation with these sequential statistics: the removed channels' mean
  contribution ``W[:, removed] E[x_removed]`` is added to the projection's bias.
* ``"none"``: only the zeroing of removed columns.

Whole blocks that the masks remove are zeroed and not compensated. The target is the dense layer's
output on the *pruned* model's inputs (``target="pruned-input"``, as Týr-the-Pruner and SparseGPT);
``target="dense-input"`` fits the dense model's own output instead, which also asks each layer to
undo the errors of earlier layers (measured worse, docs/refit.md). ``lstsq`` changes only the values
of existing weights, so a refitted model saves and loads exactly like an unrefitted one.

Under a process group every rank passes the same calibration, streams its shard of it and the
statistics are summed over the ranks (refit/statistics.py), so every rank writes the same weights.
Projections that accelerate offloads are refit where accelerate keeps them (core/offload.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.architectures import SearchSpace, decoder_layers
from ..core.modeling import eval_mode
from ..core.offload import onloaded
from ..core.units import UnitValues
from .bias import add_output_bias, enable_output_biases
from .lstsq import lstsq_weights, relative_error
from .statistics import InputStatistics, LayerStream

__all__ = ["REFIT_METHODS", "REFIT_TARGETS", "ProjectionRefit", "RefitReport", "refit"]

logger = logging.getLogger(__name__)

REFIT_METHODS = ("none", "bias", "lstsq")
REFIT_TARGETS = ("pruned-input", "dense-input")


@dataclass
class ProjectionRefit:
    """One projection's refit: kept/total input channels and the relative calibration reconstruction
    error ``‖W X − V X_k‖²/‖W X‖²`` with the kept columns as they were (``error_before``) and refitted."""

    layer: int
    projection: str  # "o_proj" | "down_proj" (the architecture's names)
    kept: int
    width: int
    error_before: float
    error_after: float


@dataclass
class RefitReport:
    """What :func:`refit` did: per projection errors, calibration tokens, time and peak statistics memory."""

    method: str
    target: str
    damping: float
    tokens: int
    seconds: float
    peak_statistics_mib: float
    projections: list[ProjectionRefit] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def mean_errors(self) -> dict[str, tuple[float, float]]:
        """``{projection: (mean error before, mean error after)}`` over the layers where units were removed."""
        out: dict[str, tuple[float, float]] = {}
        for name in dict.fromkeys(p.projection for p in self.projections):
            rows = [p for p in self.projections if p.projection == name and p.kept < p.width]
            if rows:
                out[name] = (sum(p.error_before for p in rows) / len(rows),
                             sum(p.error_after for p in rows) / len(rows))
        return out


def _check(model: nn.Module, masks: UnitValues, method: str, target: str, damping: float) -> SearchSpace:
    if method not in REFIT_METHODS:
        raise ValueError(f"refit method {method!r}; choose one of {', '.join(REFIT_METHODS)}")
    if target not in REFIT_TARGETS:
        raise ValueError(f"refit target {target!r}; choose one of {', '.join(REFIT_TARGETS)}")
    if not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"damping={damping}: a positive fraction of the mean diagonal of H (e.g. 0.01)")
    space = SearchSpace.from_model(model)
    if space.has_removed_blocks:
        raise ValueError("refit needs the unpruned model (it measures the removed units' inputs); refit before "
                         "prune_model, or pass refit=... to prune_model")
    if masks.attn.numel() != space.num_attn_units or masks.mlp.numel() != space.num_mlp_units:
        raise ValueError(f"masks cover {masks.attn.numel()} KV groups and {masks.mlp.numel()} MLP channels; the model "
                         f"has {space.num_attn_units} and {space.num_mlp_units}: masks of another model?")
    return space


def _as_batches(calibration: torch.Tensor | Sequence, batch_size: int) -> list:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise ValueError("calibration tokens must be a [N, T] tensor of token ids")
        return [calibration[i:i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
    return list(calibration)


def _kept_columns(mask: torch.Tensor, width_per_unit: int) -> torch.Tensor:
    units = torch.nonzero(mask > 0.5).flatten()
    return (units[:, None] * width_per_unit + torch.arange(width_per_unit)).flatten()


@torch.no_grad()
def _write_columns(linear: nn.Linear, kept: torch.Tensor, values: torch.Tensor | None) -> None:
    """Zero every input column of ``linear`` except ``kept``; with ``values`` ([out, |kept|]) write those."""
    with onloaded(linear, write=True):  # an offloaded projection is rewritten in accelerate's store
        weight = linear.weight
        new = torch.zeros_like(weight)
        kept = kept.to(weight.device)
        new[:, kept] = weight[:, kept] if values is None else values.to(weight.device, weight.dtype)
        weight.copy_(new)


def refit(
    model: nn.Module,
    masks: UnitValues,
    calibration: torch.Tensor | Sequence[torch.Tensor | dict[str, torch.Tensor]],
    method: str = "lstsq",
    damping: float = 0.01,
    batch_size: int = 8,
    target: str = "pruned-input",
    progress: bool = True,
) -> RefitReport:
    """Refit ``model`` (unpruned, modified in place) for ``masks`` on ``calibration``; see the module docstring.

    ``calibration``: ``[N, T]`` token ids (cut into batches of ``batch_size``) or a list of batches.
    Afterwards the removed units' output columns are zero, so ``model`` computes what the pruned model
    computes; ``prune_model(model, masks)`` then removes them. Raises before any forward pass on
    masks that do not fit the model or bad settings; warns when the calibration has fewer tokens
    than a projection keeps channels (``H_kk`` is then rank-deficient and only the damping holds the
    solve).
    """
    space = _check(model, masks, method, target, damping)
    batches = _as_batches(calibration, batch_size)
    spec = space.spec
    start = time.perf_counter()
    report = RefitReport(method, target, damping, 0, 0.0, 0.0)
    if method == "bias":
        enable_output_biases(model)
    layers = decoder_layers(model)
    peak = 0
    with eval_mode(model):
        stream = None if method == "none" else LayerStream(model, batches)  # "none" needs no statistics
        dense = stream.copy() if stream is not None and target == "dense-input" else None
        report.tokens = 0 if stream is None else stream.num_tokens
        for i in tqdm(range(space.num_layers), desc=f"refit ({method})", disable=not progress, leave=False):
            shape = space.layers[i]
            attn, mlp = getattr(layers[i], spec.attention), getattr(layers[i], spec.mlp)
            projections = (
                (spec.o, getattr(attn, spec.o), not masks.has_blocks or bool(masks.attn_blocks[i]),
                 _kept_columns(masks.attn[space.attn_slice(i)], shape.queries_per_group * shape.head_dim)),
                (spec.down, getattr(mlp, spec.down), not masks.has_blocks or bool(masks.mlp_blocks[i]),
                 _kept_columns(masks.mlp[space.mlp_slice(i)], 1)),
            )
            # the dense layer's inputs on the dense model's stream, before this layer changes
            references = dense.inputs_of(i, [p[1] for p in projections]) if dense is not None else [None, None]
            for (name, linear, block_kept, kept), reference in zip(projections, references):
                if not block_kept:
                    _write_columns(linear, kept[:0], None)
                elif kept.numel() < linear.in_features or reference is not None:
                    if method == "none":
                        _write_columns(linear, kept, None)
                        continue
                    with InputStatistics(linear, f"layer {i} {name}", reference) as stats:
                        stream.run_until(i, linear)
                    stats.all_reduce()
                    peak = max(peak, sum(t.numel() * t.element_size() for t in
                                         (stats.gram, stats.cross, stats.reference_gram) if t is not None))
                    if stats.tokens < kept.numel():
                        logger.warning("layer %d %s: %d calibration tokens for %d kept channels; give at least %d "
                                       "tokens for a well-conditioned refit", i, name, stats.tokens, kept.numel(),
                                       kept.numel())
                    report.projections.append(_refit_projection(linear, stats, kept, method, damping, i, name))
            if stream is not None:
                stream.advance(i)
    report.seconds = time.perf_counter() - start
    report.peak_statistics_mib = peak / 2**20
    return report


def _refit_projection(linear: nn.Linear, stats: InputStatistics, kept: torch.Tensor, method: str, damping: float,
                      layer: int, name: str) -> ProjectionRefit:
    """Refit one projection from its statistics; the refit is kept only if it lowers the calibration error."""
    with onloaded(linear, write=True):  # an offloaded projection is read and rewritten through accelerate's hook
        return _fit_projection(linear, stats, kept, method, damping, layer, name)


def _fit_projection(linear: nn.Linear, stats: InputStatistics, kept: torch.Tensor, method: str, damping: float,
                    layer: int, name: str) -> ProjectionRefit:
    gram, cross, reference_gram = stats.gram, stats.cross, stats.reference_gram
    kept = kept.to(gram.device)
    weight = linear.weight.detach().to(gram.device, torch.float64)
    before = weight[:, kept]
    error_before = relative_error(weight, gram, kept, before, cross, reference_gram)
    if method == "bias":
        removed = torch.ones(linear.in_features, dtype=torch.bool, device=gram.device)
        removed[kept] = False
        add_output_bias(linear, weight[:, removed] @ stats.mean[removed])
        _write_columns(linear, kept, None)
        return ProjectionRefit(layer, name, kept.numel(), linear.in_features, error_before, float("nan"))
    new = lstsq_weights(weight, gram, kept, damping, cross)
    error_after = relative_error(weight, gram, kept, new, cross, reference_gram)
    if error_after > error_before:
        new, error_after = before, error_before
    _write_columns(linear, kept, new)
    return ProjectionRefit(layer, name, kept.numel(), linear.in_features, error_before, error_after)
