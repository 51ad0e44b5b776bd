"""Running a causal LM: evaluation mode for the duration of a block, and the next-token loss."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .offload import execution_device

__all__ = ["IGNORE_INDEX", "eval_mode", "model_device", "next_token_losses"]

IGNORE_INDEX = -100  # label of a position that is not scored (padding)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; the previous training flag is restored afterwards, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """The device the model's inputs go to: the main device of an accelerate dispatch, else the device of the
    model's first parameter (CPU for a model without parameters)."""
    return execution_device(model)


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` float32 cross-entropy of predicting ``labels[:, t+1]`` from ``logits[:, t]``.

    Positions labelled :data:`IGNORE_INDEX` get 0. Rows are computed one at a time, so no float copy
    or log-softmax of all ``B·T·V`` logits exists at once.
    """
    return torch.stack([
        F.cross_entropy(logits[i, :-1].float(), labels[i, 1:], reduction="none", ignore_index=IGNORE_INDEX)
        for i in range(logits.shape[0])
    ])
