"""Every workaround for Torch-Pruning 1.6.1 on transformers 5, numbered as in docs/torch_pruning.md.

The numbers are those of the bug table there (1–9 are reproduced in the project's reference notes,
10–16 were found while building the plugin or by its users). Each workaround acts on a graph or pruner object the
plugin builds or is handed; nothing in ``torch_pruning`` or ``transformers`` is patched. Only the
Torch-Pruning plugin (``integrations/torch_pruning``) imports this module: the core engine removes
units without Torch-Pruning.

======  ==================================================================  ==============================
bug     problem                                                             here
======  ==================================================================  ==============================
1, 2    tracing hangs with a KV cache; SDPA tracing mis-couples GQA          :func:`tracing_mode`,
                                                                            :func:`tracing_inputs`,
                                                                            :func:`trace_in_tracing_mode`
3a, 8   duplicated GQA indices fail ``check_pruning_group``; a group that    :func:`step_groups`
        would empty a layer is skipped silently                             (refusing check)
3b      duplicated indices corrupt ``in/out_features``; per-head q/k norm    :func:`prune_linear_members`,
        weights sit in attention groups                                     :func:`resync_linear_features`
4–7     stock GQA head pruning removes query heads only, or nothing          :func:`kv_group_heads`,
                                                                            :func:`use_kv_group_heads`
10      RoPE's concat loops ``get_pruning_group`` forever when n_rep == 2    :func:`freeze_index_mappings`,
                                                                            :func:`init_base_pruner`
11      index mappings recomputed from current widths couple q to k/v 1:1   :func:`freeze_index_mappings`
12      the global head threshold crashes on a step that removes no head    :func:`step_groups`
13      ``BasePruner``'s mutable default dicts leak state between pruners    :func:`init_base_pruner`
14      Torch-Pruning's counting: ``int(n·(1−r))`` loses a unit to float     :func:`keep_ratio`,
        error; per-layer head pruning removes ``ceil(r·n_now)`` per step    :func:`head_schedule`
15      a plain ``BasePruner.step()`` prunes MLP channels, silently no KV    :func:`calling_pruner`
        group (3a, 8), and leaves the config stale                          (the importance refuses it)
16      "Unwrapped parameters detected" for the norm weights                 :func:`unwrapped_parameters`
======  ==================================================================  ==============================
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.dependency.constants import INDEX_MAPPING_PLACEHOLDER

from ..core.architectures import SearchSpace, decoder_layers
from ..core.modeling import model_device

__all__ = [
    "calling_pruner",
    "dependency_graph",
    "freeze_index_mappings",
    "head_schedule",
    "init_base_pruner",
    "keep_ratio",
    "kv_group_heads",
    "prune_linear_members",
    "resync_linear_features",
    "step_groups",
    "trace_in_tracing_mode",
    "tracing_inputs",
    "tracing_mode",
    "unwrapped_parameters",
    "use_kv_group_heads",
]

logger = logging.getLogger(__name__)


# -- bugs 1, 2: tracing ---------------------------------------------------------------------------
@contextmanager
def tracing_mode(model: nn.Module) -> Iterator[None]:
    """Eager attention and no KV cache while Torch-Pruning traces; restored afterwards (bugs 1, 2)."""
    config = model.config
    attn_impl, use_cache = config._attn_implementation, getattr(config, "use_cache", None)
    model.set_attn_implementation("eager")
    config.use_cache = False
    try:
        yield
    finally:
        model.set_attn_implementation(attn_impl)
        config.use_cache = use_cache


def _torch_pruning_traces(model: nn.Module) -> bool:
    """True while ``DependencyGraph._trace`` runs ``model``: its recording hooks sit on the model's modules."""
    return torch.is_grad_enabled() and any(
        getattr(hook, "__name__", "") == "_record_grad_fn"
        for module in model.modules() for hook in module._forward_hooks.values())


def trace_in_tracing_mode(model: nn.Module) -> None:
    """Make every Torch-Pruning trace of ``model`` run under :func:`tracing_mode` (bugs 1, 2), once.

    A forward pre-hook recognises the forward pass of Torch-Pruning's tracing (it registers its recording
    hooks on the model's modules, with autograd on) and runs that pass with eager attention and
    ``use_cache=False``; a forward hook restores the settings. Any other forward pass is left alone, so a
    ``tp.pruner.BasePruner`` built the way Torch-Pruning's examples build it (a tensor of token ids as
    ``example_inputs``, no context) traces correctly instead of hanging on the KV cache.
    """
    if getattr(model, "_pg_pruning_tracing_hooks", False):
        return
    saved: list[tuple[str, Any]] = []

    def before(module, args, kwargs):
        if not _torch_pruning_traces(module):
            return None
        saved.append((module.config._attn_implementation, getattr(module.config, "use_cache", None)))
        module.set_attn_implementation("eager")
        module.config.use_cache = False
        return args, kwargs | {"use_cache": False}

    def after(module, args, kwargs, output):
        if saved:
            attn_impl, use_cache = saved.pop()
            module.set_attn_implementation(attn_impl)
            module.config.use_cache = use_cache

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True, always_call=True)
    model._pg_pruning_tracing_hooks = True


def tracing_inputs(model: nn.Module, inputs: torch.Tensor | dict | None = None) -> dict[str, Any]:
    """Tracing inputs as a dict with ``use_cache=False`` (a KV cache makes tracing hang, bug 1);
    ``None`` gives 8 seeded random tokens."""
    if inputs is None:
        vocab = model.config.get_text_config().vocab_size
        inputs = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    device = model_device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()} | {"use_cache": False}


@contextmanager
def _tracing(model: nn.Module) -> Iterator[None]:
    """:func:`tracing_mode` with gradients on (Torch-Pruning traces autograd) and the harmless
    "unwrapped parameters" warning of the norm weights silenced (the hidden size is never pruned)."""
    with tracing_mode(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        yield


# -- bugs 10, 11: index mappings --------------------------------------------------------------------
def freeze_index_mappings(graph: tp.DependencyGraph) -> None:
    """Fix ``graph``'s index mappings at their traced values, with identity for concatenations.

    Torch-Pruning 1.6.1 recomputes mappings before every group from the *current* layer widths:
    * the GQA mapping of ``repeat_kv``'s expand takes ``n_rep`` = current query width / traced KV
      width, which is wrong once a KV group is gone (bug 11: a second pruning step on the same
      graph couples q to k/v 1:1);
    * RoPE's ``rotate_half`` (``cat(..., dim=-1)`` over head_dim; autograd saves ``dim=-1`` as
      2**64-1) is taken for a channel concat, and when the inferred sizes match (``n_rep == 2``)
      its offsets make ``get_pruning_group`` loop forever (bug 10). Whole heads map onto
      themselves through ``rotate_half``, so identity is the right mapping.
    Removing whole KV groups and MLP channels never changes ``n_rep`` or ``head_dim``, so the
    mappings traced on the unpruned model stay valid. Call it before anything is pruned.
    """
    for node in graph.module2node.values():
        node.enable_index_mapping = False  # update_index_mapping skips disabled nodes
        if node.type == ops.OPTYPE.CONCAT:
            incoming = [dep for src in node.inputs for dep in src.dependencies if dep.target is node]
            for dep in list(node.dependencies) + incoming:
                dep.index_mapping[1] = INDEX_MAPPING_PLACEHOLDER


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor | dict | None = None) -> tp.DependencyGraph:
    """Trace ``model`` into a Torch-Pruning graph with the settings that work on transformers 5 (bugs 1, 2, 10, 11)."""
    with _tracing(model):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=tracing_inputs(model, example_inputs), output_transform=lambda out: out.logits)
    freeze_index_mappings(graph)
    return graph


# -- bugs 4–7: one Torch-Pruning "head" per KV group -----------------------------------------------------
def kv_group_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``num_heads`` for Torch-Pruning with one "head" per KV group: ``{q, k, v: n_kv}`` per layer
    (layers whose attention block was removed have none). Each Torch-Pruning head of ``q``/``o`` is
    then one whole KV group and the GQA mapping removes exactly its ``k``/``v`` rows (bugs 4–7)."""
    space = SearchSpace.from_model(model)
    heads: dict[nn.Module, int] = {}
    for layer, shape in zip(decoder_layers(model), space.layers):
        if shape.num_kv_groups == 0:
            continue
        attn = getattr(layer, space.spec.attention)
        for name in (space.spec.q, space.spec.k, space.spec.v):
            heads[getattr(attn, name)] = shape.num_kv_groups
    return heads


def use_kv_group_heads(pruner: tp.pruner.BasePruner) -> None:
    """Turn the stock per-head ``num_heads`` of a hand-built pruner (``{q: n_q, k: n_kv, v: n_kv}``, as
    Torch-Pruning's LLM example writes it) into one head per KV group (bugs 4–7), in place.

    ``head_pruning_ratio`` keeps its meaning as a fraction of the heads: a removed KV group takes its
    ``n_rep`` query heads with it. ``out_channel_groups`` (which ``BasePruner`` copied from ``num_heads``) and
    the head total of the global threshold follow.
    """
    wanted = kv_group_heads(pruner.model)
    changed = {m: n for m, n in wanted.items() if m in pruner.num_heads and pruner.num_heads[m] != n}
    if not changed:
        return
    logger.info("num_heads: one Torch-Pruning head per KV group for %d projections (whole KV groups are removed; "
                "Torch-Pruning's own GQA head pruning removes query heads only)", len(changed))
    for module, n in changed.items():
        pruner.num_heads[module] = n
        pruner.out_channel_groups[module] = n
    pruner.initial_total_heads = _count_heads(pruner)


# -- bugs 10, 13: building a BasePruner -----------------------------------------------------------------
def init_base_pruner(pruner: tp.pruner.BasePruner, model: nn.Module, example_inputs: torch.Tensor | dict | None,
                     importance: tp.importance.Importance, **kwargs) -> None:
    """Run ``BasePruner.__init__`` on ``pruner`` so that it traces and counts correctly.

    ``BasePruner.__init__`` walks every group, which loops forever on ``n_rep == 2`` before the graph
    can be repaired (bug 10): it walks none here, the graph is repaired, then the attention heads are
    counted as ``__init__`` counts them. Its mutable default dicts get fresh copies (bug 13).
    """
    root_types = kwargs.pop("root_module_types", [nn.Linear])
    kwargs.setdefault("output_transform", lambda out: out.logits)
    for name in ("num_heads", "in_channel_groups", "out_channel_groups"):
        kwargs[name] = dict(kwargs.get(name) or {})
    with _tracing(model):
        tp.pruner.BasePruner.__init__(pruner, model, tracing_inputs(model, example_inputs), importance,
                                      root_module_types=[], **kwargs)
    freeze_index_mappings(pruner.DG)
    pruner.root_module_types = root_types
    pruner.initial_total_heads = _count_heads(pruner)


def _count_heads(pruner: tp.pruner.BasePruner) -> int:
    """``BasePruner.__init__``'s count of attention heads over the prunable groups."""
    total = 0
    groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
    for group in groups:
        if pruner._is_atten_group(group)[0]:
            group = pruner._downstream_node_as_root_if_attention(group)
            if group is None:
                continue
        for dep, _ in group:
            if dep.target.module in pruner.num_heads and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                total += pruner.num_heads[dep.target.module]
                break
    return total


# -- bugs 3a, 8, 12: collecting a step's groups ---------------------------------------------------------
def _refusing_check(graph: tp.DependencyGraph, describe: Callable[[nn.Module], str]):
    """A ``check_pruning_group`` that counts unique indices (bug 3a) and refuses emptied layers (bug 8)."""

    def check(group) -> bool:
        for dep, idxs in group:
            module = dep.target.module
            if not isinstance(module, nn.Linear):
                continue
            width = graph.get_out_channels(module) if graph.is_out_channel_pruning_fn(dep.handler) \
                else graph.get_in_channels(module)
            if width is not None and len(set(idxs)) >= width:
                raise ValueError(
                    f"this step would remove all {width} channels of {describe(module)}, {dep.target.name}: lower "
                    f"the ratio (or round_to) so that every layer keeps at least one KV group and one MLP channel"
                )
        return True

    return check


def _head_removals(pruner: tp.pruner.BasePruner, query_projections: Iterable[nn.Module], step: int) -> int:
    """KV groups the global head threshold removes at ``step`` (Torch-Pruning's own formula)."""
    ignored = set(pruner.ignored_layers)
    current = sum(pruner.num_heads.get(q, 0) for q in query_projections if q not in ignored)
    return current - int(pruner.initial_total_heads * (1 - pruner.per_step_head_pruning_ratio[step]))


def step_groups(pruner: tp.pruner.BasePruner, step_fn: Callable, query_projections: list[nn.Module],
                describe: Callable[[nn.Module], str]) -> list:
    """Every group of the pruner's next step, collected before anything is pruned.

    ``step_fn`` is the pruner's own ``step`` (run with ``interactive=True``). Meanwhile the graph's
    ``check_pruning_group`` counts unique indices and raises ``ValueError`` naming the layer a step
    would empty (bugs 3a, 8), and a global head step that removes no head gets ratio 0, because
    Torch-Pruning fails on an empty head threshold (bug 12); both are restored afterwards.
    """
    freeze_index_mappings(pruner.DG)
    step = pruner.current_step + 1
    head_ratio = pruner.per_step_head_pruning_ratio[step] if step < len(pruner.per_step_head_pruning_ratio) else None
    global_heads = head_ratio and pruner.global_pruning and pruner.prune_num_heads
    if global_heads and _head_removals(pruner, query_projections, step) <= 0:
        pruner.per_step_head_pruning_ratio[step] = 0.0
    graph = pruner.DG
    own_check = graph.__dict__.get("check_pruning_group")
    graph.check_pruning_group = _refusing_check(graph, describe)
    try:
        return list(step_fn(pruner, interactive=True))
    finally:
        if own_check is None:
            del graph.check_pruning_group
        else:
            graph.check_pruning_group = own_check
        if head_ratio is not None:
            pruner.per_step_head_pruning_ratio[step] = head_ratio


# -- bug 15: a plain BasePruner.step() ---------------------------------------------------------------------
def calling_pruner() -> tp.pruner.BasePruner | None:
    """The ``BasePruner`` whose step (``_prune``) is running further up the call stack, if any.

    An importance is handed groups, never the pruner; a plain ``pruner.step()`` must be refused before it
    prunes (the importance is asked for every group before any is pruned), and its ``current_step`` put back.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if frame.f_code.co_name == "_prune" and isinstance(candidate, tp.pruner.BasePruner):
            return candidate
        frame = frame.f_back
    return None


# -- bug 16: the norm weights -----------------------------------------------------------------------------
def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """``unwrapped_parameters`` for ``BasePruner``/``DependencyGraph``: the parameters of modules Torch-Pruning
    has no pruner for (RMSNorm weights, per-head q/k norms), each with the dimension Torch-Pruning would
    choose itself (the last non-singleton one). Passing them explicitly silences "Unwrapped parameters
    detected"; the plugin never prunes them (the hidden size is frozen, whole heads keep ``head_dim``)."""
    prunable = set(tp.pruner.function.PrunerBox) - {ops.OPTYPE.ELEMENTWISE}  # as DependencyGraph decides
    wrapped = {id(p) for m in model.modules() if ops.module2type(m) in prunable for p in m.parameters()}
    found = []
    for p in model.parameters():
        dims = [i for i, size in enumerate(p.shape) if size > 1]
        if id(p) not in wrapped and dims:
            found.append((p, dims[-1]))
    return found


# -- bug 3b: pruning a validated group ------------------------------------------------------------------
def prune_linear_members(group) -> None:
    """Prune the Linear members of ``group`` with de-duplicated indices (bug 3b); other members, such as
    per-head q/k norm weights that sit in attention groups with query-space indices, stay untouched."""
    for dep, idxs in group:
        if isinstance(dep.target.module, nn.Linear):
            dep(sorted({int(i) for i in idxs}))


def resync_linear_features(model: nn.Module) -> None:
    """Reset every Linear's ``in/out_features`` from its weight (Torch-Pruning counts duplicates, bug 3b)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape


# -- bug 14: Torch-Pruning's counting ------------------------------------------------------------------
def keep_ratio(n: int, remove: int) -> float:
    """A ratio with which Torch-Pruning, keeping ``int(n·(1-r))``, removes exactly ``remove`` of ``n``.

    Passing the plain ratio loses one more unit to float error (``int(90·0.7) = 62``).
    """
    return 0.0 if remove <= 0 else 1.0 - (n - remove + 0.5) / n


def head_schedule(n: int, remove: int, steps: int) -> list[float]:
    """Per-step head ratios removing ``remove`` of ``n`` KV groups linearly over ``steps``.

    Torch-Pruning's per-layer head pruning removes ``ceil(r·n_now)`` at each step, relative to
    the current count, so the linear schedule of ratios over-prunes when ``steps > 1``.
    """
    schedule, done = [0.0], 0
    for k in range(1, steps + 1):
        target = remove * k // steps
        schedule.append((target - done - 0.5) / (n - done) if target > done else 0.0)
        done = target
    return schedule
