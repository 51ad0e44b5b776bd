"""Human-readable summaries of a pruning run: a text report and a per-layer width plot."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch.nn as nn

from .core.architectures import SearchSpace

__all__ = ["count_parameters", "layer_table", "plot_layer_widths"]


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, tied tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def layer_table(before: SearchSpace, after: SearchSpace) -> str:
    """One line per layer: query heads, KV heads and MLP channels before -> after."""
    lines = ["layer  q heads   kv heads  mlp channels"]
    for i, (a, b) in enumerate(zip(before.layers, after.layers)):
        lines.append(
            f"{i:>5}  {a.num_attention_heads:>2} -> {b.num_attention_heads:<3} {a.num_kv_groups:>2} -> "
            f"{b.num_kv_groups:<3}  {a.intermediate_size:>5} -> {b.intermediate_size}"
        )
    return "\n".join(lines)


def plot_layer_widths(before: SearchSpace, after: SearchSpace, path: str | os.PathLike,
                      title: str = "") -> None:
    """Bar chart of the kept fraction of KV groups and MLP channels per layer (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(before.num_layers)
    attn = [b.num_kv_groups / a.num_kv_groups for a, b in zip(before.layers, after.layers)]
    mlp = [b.intermediate_size / a.intermediate_size for a, b in zip(before.layers, after.layers)]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * before.num_layers), 3.5))
    width = 0.4
    ax.bar([i - width / 2 for i in layers], attn, width, label="KV groups kept")
    ax.bar([i + width / 2 for i in layers], mlp, width, label="MLP channels kept")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, Sequence[float]], path: str | os.PathLike, ylabel: str, title: str = "") -> None:
    """Line plot of named series against the step index (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
