"""Models dispatched by ``accelerate``: each layer's device, and offloaded weights read and written through
accelerate's own hooks.

A model dispatched by accelerate (``dispatch_model``, ``from_pretrained(device_map=...)``) keeps every
module on its device; an *offloaded* module (``"cpu"`` in a device map whose main device is a GPU, or
``"disk"``) holds meta tensors and an ``AlignDevicesHook`` that loads the real values from its weights
map for each forward and drops them afterwards. Code that reads or replaces weights outside a forward
(sub-network execution, the metrics, the refit, the level table, removal) does so inside
:func:`onloaded`: the hook's own ``pre_forward`` loads the module's tensors onto its execution device
(what ``accelerate.utils.align_module_device`` does) and the hook is told to leave them there for
forwards inside the block; with ``write=True`` the tensors that changed (new values, new shapes, a
new bias) go back into the weights map when the block ends (the CPU state dict, or the offload folder
through ``accelerate.utils.offload_weight``), so later forwards, ``save_pretrained`` and reloading see
them. Modules without an offload hook are not touched, so an undispatched model runs as before; accelerate
is imported only for a model that carries its hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn as nn

__all__ = ["execution_device", "is_offloaded", "onloaded", "onloaded_modules"]


def _align_hook(module: nn.Module):
    """The module's ``AlignDevicesHook`` (also inside a ``SequentialHook``), or None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    for h in hook.hooks if isinstance(hook, SequentialHook) else (hook,):
        if isinstance(h, AlignDevicesHook):
            return h
    return None


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s own tensors off-device between forwards (meta tensors here)."""
    hook = _align_hook(module)
    return hook is not None and bool(hook.offload)


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else the device of its first
    parameter, else the CPU."""
    hook = _align_hook(module)
    if hook is not None and hook.execution_device is not None:
        device = hook.execution_device
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _tensors(module: nn.Module, hook) -> dict[str, torch.Tensor]:
    from accelerate.utils import named_module_tensors

    return dict(named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                     remove_non_persistent=True))


def _store(module: nn.Module, hook, changed: dict[str, torch.Tensor]) -> None:
    """Write ``changed`` tensors of ``module`` into its hook's weights map."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    weights = hook.weights_map
    if not isinstance(weights, PrefixedDataset):
        raise TypeError(f"cannot write the offloaded weights of a {type(module).__name__}: accelerate's weights map is "
                        f"a {type(weights).__name__}, not a PrefixedDataset")
    store, prefix = weights.dataset, weights.prefix
    for name, tensor in changed.items():
        key, value = prefix + name, tensor.detach().cpu()
        if isinstance(store, OffloadedWeightsLoader):
            if key in store.state_dict or store.save_folder is None:
                store.state_dict[key] = value
            else:  # a disk-offloaded tensor: rewritten in the offload folder, the index records its new shape
                offload_weight(value, key, store.save_folder, index=store.index)
            if key not in store.all_keys:
                store.all_keys.append(key)
        else:  # cpu_offload's plain state dict
            store[key] = value


@contextmanager
def onloaded(module: nn.Module, write: bool = False) -> Iterator[nn.Module]:
    """``module``'s own tensors on its execution device for the duration of the block (module docstring).

    Forwards inside the block use them as they are. With ``write`` the tensors that were replaced,
    modified in place or added inside the block are written back to accelerate's weights map when the
    block ends without error. A module that is not offloaded, or is already onloaded by an enclosing
    block, is left as it is.
    """
    hook = _align_hook(module)
    if hook is None or not hook.offload:
        yield module
        return
    hook.pre_forward(module)
    hook.offload = False
    before = {name: (id(t), t._version) for name, t in _tensors(module, hook).items()}
    try:
        yield module
        if write:
            _store(module, hook, {name: t for name, t in _tensors(module, hook).items()
                                  if before.get(name) != (id(t), t._version)})
    finally:
        hook.offload = True
        hook.post_forward(module, None)


@contextmanager
def onloaded_modules(root: nn.Module, write: bool = False) -> Iterator[nn.Module]:
    """:func:`onloaded` for every offloaded module inside ``root`` (a decoder layer, say) at once."""
    with ExitStack() as stack:
        for module in root.modules():
            if is_offloaded(module):
                stack.enter_context(onloaded(module, write))
        yield root
