"""Layer-by-layer execution over cached calibration activations, and the input statistics of a projection.

:class:`LayerStream` runs a decoder-only LM one decoder layer at a time over a fixed set of
calibration batches: the hidden states entering layer 0 (and every layer's keyword arguments:
rotary embeddings, attention masks, which differ per layer under sliding windows) are captured with
one forward pass; afterwards ``stream.run(i)`` runs layer ``i`` on the current hidden states and
``stream.advance(i)`` replaces them by the layer's output. Whatever a caller changes in layer
``i`` before advancing (a mask, refitted weights) is what every later layer sees: the statistics of
layer ``i + 1`` are those of the model pruned up to layer ``i`` (sequential statistics).

:class:`InputStatistics` accumulates, for one ``nn.Linear``, the sum ``Σ x`` and the Gram matrix
``H = Σ x xᵀ`` of its input rows over all calibration tokens on the module's device: each forward call's
products in float32, their sum in float64.

Under a process group (core/distributed.py) every rank passes the same batches; a stream keeps only
this rank's contiguous shard of them, so the statistics a caller accumulates are its shard's until
:meth:`InputStatistics.all_reduce` (or :func:`all_reduce`) sums them over the ranks, one collective
per call. Under an accelerate dispatch each layer runs on its execution device and statistics live
there (core/offload.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

import torch
import torch.nn as nn

from ..core import distributed
from ..core.architectures import decoder_layers
from ..core.offload import execution_device

__all__ = ["InputStatistics", "LayerStream", "NonFiniteActivationError", "all_reduce"]


class NonFiniteActivationError(FloatingPointError):
    """A projection's calibration input contains NaN or inf values."""


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


class InputStatistics:
    """``Σ x``, ``H = Σ x xᵀ`` (float64) and the token count of the inputs of ``module``.

    With ``reference`` (one ``[..., n]`` tensor per forward call, in call order) it also accumulates
    the cross term ``C = Σ x_ref xᵀ`` and ``R = Σ x_ref x_refᵀ``, pairing token by token.
    Used as a context manager: the forward pre-hook is registered on entry and removed on exit.
    ``name`` is used in error messages.
    """

    def __init__(self, module: nn.Linear, name: str = "", reference: Sequence[torch.Tensor] | None = None):
        self.module, self.name, self.reference = module, name, reference
        device = execution_device(module)
        n = module.in_features
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)  # H, [n, n]
        self.cross = None if reference is None else torch.zeros_like(self.gram)  # C, [n, n]
        self.reference_gram = None if reference is None else torch.zeros_like(self.gram)  # R, [n, n]
        self.tokens = 0
        self._calls = 0
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple) -> None:
        # one call's products in float32 (a few thousand terms each), summed over calls in float64
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, n]
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteActivationError(f"non-finite calibration activations enter {self.name or 'a projection'}")
        self.sum += x.sum(0, dtype=torch.float64)
        self.gram += (x.T @ x).double()
        self.tokens += x.shape[0]
        if self.reference is not None:
            ref = self.reference[self._calls].reshape(-1, x.shape[-1]).to(x.device, torch.float32)
            self.cross += (ref.T @ x).double()
            self.reference_gram += (ref.T @ ref).double()
        self._calls += 1

    def __enter__(self) -> InputStatistics:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def mean(self) -> torch.Tensor:
        """``E[x]``, ``[n]``."""
        return self.sum / max(self.tokens, 1)

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of the default process group (no-op without one)."""
        all_reduce([self])


def all_reduce(stats: Sequence[InputStatistics]) -> None:
    """Sum every statistic of ``stats`` over the ranks in one collective (no-op without a process group)."""
    if not distributed.is_distributed():
        return
    counts = [torch.tensor([float(s.tokens)], dtype=torch.float64, device=s.gram.device) for s in stats]
    tensors = [t for s, count in zip(stats, counts)
               for t in (s.sum, s.gram, count, s.cross, s.reference_gram) if t is not None]
    names = ", ".join(s.name or "a projection" for s in stats)
    distributed.all_reduce_stats(tensors, f"the input statistics of {names}")
    for s, count in zip(stats, counts):
        s.tokens = int(count.item())


def _layer_device(layer: nn.Module) -> torch.device:
    return execution_device(layer)


class LayerStream:
    """Hidden states of calibration batches between decoder layers (see the module docstring).

    ``batches``: ``[B, T]`` token-id tensors (or dicts with ``input_ids`` and an optional
    ``attention_mask``), the same on every rank; the stream runs this rank's shard of them (module
    docstring). Memory: one ``[B, T, hidden]`` tensor per batch of the shard, on each layer's device.
    """

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor | dict[str, torch.Tensor]]):
        if not batches:
            raise ValueError("no calibration batches given")
        batches = [b if isinstance(b, dict) else {"input_ids": b} for b in batches]
        self.layers = decoder_layers(model)
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[list[tuple[tuple, dict]]] = []  # [batch][layer] -> (extra positional args, kwargs)
        self.total_tokens = sum(int(b["input_ids"].numel()) for b in batches)  # over all ranks' shards
        self._capture(model, distributed.shard(batches))

    def copy(self) -> LayerStream:
        """A stream at the same position that advances independently (the hidden states are shared until
        one of the two advances)."""
        other = object.__new__(LayerStream)
        other.layers, other.hidden, other.kwargs = self.layers, list(self.hidden), self.kwargs
        other.total_tokens = self.total_tokens
        return other

    @property
    def num_tokens(self) -> int:
        """Calibration tokens of all the batches (of every rank's shard)."""
        return self.total_tokens

    @torch.no_grad()
    def _capture(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        """Layer 0's input of every batch, and every layer's keyword arguments. The first batch runs the model
        up to its last decoder layer (never the head); later batches of its shape without an attention mask
        reuse its arguments and stop at layer 0."""
        per_layer: dict[int, tuple[tuple, dict]] = {}
        state = {"stop": False}
        last = len(self.layers) - 1

        def make_hook(i: int):
            def hook(module, args, kwargs):
                kw = dict(kwargs)
                hidden = args[0] if args else kw.pop("hidden_states")
                kw.pop("hidden_states", None)
                if i == 0:
                    self.hidden.append(hidden)
                per_layer[i] = (tuple(args[1:]), kw)
                if state["stop"] or i == last:
                    raise _StopForward
            return hook

        handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        device = _layer_device(self.layers[0])
        shared = None  # (shape, per-layer arguments) reusable by unmasked batches of that shape
        try:
            for batch in batches:
                ids = batch["input_ids"]
                reuse = shared is not None and "attention_mask" not in batch and ids.shape == shared[0]
                state["stop"] = reuse
                with suppress(_StopForward):
                    model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
                if reuse:
                    self.kwargs.append(shared[1])
                    continue
                arguments = [per_layer[i] for i in range(len(self.layers))]
                self.kwargs.append(arguments)
                if shared is None and "attention_mask" not in batch:
                    shared = (ids.shape, arguments)
        finally:
            for h in handles:
                h.remove()

    def _call(self, i: int, b: int) -> torch.Tensor:
        layer = self.layers[i]
        args, kwargs = self.kwargs[b][i]
        out = layer(self.hidden[b].to(_layer_device(layer)), *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run_until(self, i: int, module: nn.Module) -> None:
        """Run layer ``i`` on every batch up to ``module`` (its pre-hooks run, then the forward stops);
        the stream does not move. Statistics hooks registered on ``module`` before this call see its inputs."""
        def stop(mod, args):
            raise _StopForward

        with _hooked(module, stop):
            for b in range(len(self.hidden)):
                with suppress(_StopForward):
                    self._call(i, b)

    @torch.no_grad()
    def inputs_of(self, i: int, modules: Sequence[nn.Module]) -> list[list[torch.Tensor]]:
        """Run layer ``i`` on every batch and advance; return each module's input per batch (in batch order)."""
        seen: list[list[torch.Tensor]] = [[] for _ in modules]
        handles = [m.register_forward_pre_hook(lambda mod, args, j=j: seen[j].append(args[0].detach()))
                   for j, m in enumerate(modules)]
        try:
            self.advance(i)
        finally:
            for h in handles:
                h.remove()
        return seen

    @torch.no_grad()
    def advance(self, i: int) -> None:
        """Replace the hidden states by layer ``i``'s output (the input of layer ``i + 1``)."""
        self.hidden = [self._call(i, b) for b in range(len(self.hidden))]


@contextmanager
def _hooked(module: nn.Module, hook) -> Iterator[None]:
    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
