"""The allocation policy: how many units each layer keeps, learned by policy gradient over level transfers.

The search space is one integer per layer and unit type, the *level* ``a[l, t]``: kept KV groups
(``t = 0``) and kept MLP blocks of ``block`` channels (``t = 1``); inside a layer the units are
ranked once (search/levels.py), so a level names a sub-network. A state is *feasible* when every
level lies in its band ``[low[l, t], high[l, t]]`` (the levels with weights in the level table, all
``≥ 1``) and the prunable parameters it keeps fit the budget.

The policy proposes *transfers*: a donor ``(l, t)`` gives one level, a receiver ``(l', t')`` takes
as many levels as the freed parameters pay for (one, for the same unit type). Donor and receiver
are drawn from two categorical distributions, ``softmax(θ_give)`` and ``softmax(θ_take)`` over the
60 (layer, type) cells of SmolLM2, restricted to the cells where the transfer is feasible, so every
sampled candidate is a model the user could ship. One step (``K`` candidates on one batch ``x``)::

    c_j    = transfer(a, donor_j, receiver_j)        j = 1..K,   donor_j ~ π_give, receiver_j ~ π_take
    A_j    = L(c_j; x) − L(a; x)                     same-batch baseline: the current state's own loss
    θ     <- θ − lr · 1/K Σ_j (A_j − Ā) ∇ log π(donor_j, receiver_j)
    a     <- c_j*  if  A_j* < 0  (j* = argmin A)     greedy acceptance, validated by the incumbent

REINFORCE with the leave-the-mean-out baseline ``Ā`` makes ``θ`` learn *where* levels are cheap to
take from and valuable to give to; the same-batch loss of the current state removes the batch
difficulty from every advantage. Everything here is tensor math on ``[L, 2]`` integers; the model
never appears.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AllocationSpace", "Transfer", "TransferPolicy", "transfer"]


@dataclass(frozen=True)
class AllocationSpace:
    """Levels and their prices: cell ``(l, t)`` may take levels ``low[l, t] … high[l, t]``, each level costs
    ``price[l, t]`` (for the parameter currency: one KV group's or one MLP block's weights); a state may
    keep at most ``budget``."""

    low: torch.Tensor  # [L, 2] long, >= 1
    high: torch.Tensor  # [L, 2] long
    price: torch.Tensor  # [L, 2] long
    budget: int

    def cost(self, levels: torch.Tensor) -> int:
        return int((levels * self.price).sum())

    def feasible(self, levels: torch.Tensor) -> bool:
        return bool(((levels >= self.low) & (levels <= self.high)).all()) and self.cost(levels) <= self.budget


@dataclass(frozen=True)
class Transfer:
    donor: tuple[int, int]  # (layer, type) giving one level
    receiver: tuple[int, int]  # (layer, type) taking levels
    levels: torch.Tensor  # [L, 2] the resulting state


def transfer(space: AllocationSpace, levels: torch.Tensor, donor: tuple[int, int],
             receiver: tuple[int, int]) -> torch.Tensor | None:
    """``levels`` after ``donor`` gives one level and ``receiver`` takes as many as the freed budget pays for
    (at least one; exactly one of the same type); ``None`` when no such state is feasible."""
    if donor == receiver or levels[donor] <= space.low[donor] or levels[receiver] >= space.high[receiver]:
        return None
    new = levels.clone()
    new[donor] -= 1
    free = space.budget - space.cost(new)
    gained = 0
    while new[receiver] < space.high[receiver] and free >= space.price[receiver]:
        new[receiver] += 1
        free -= int(space.price[receiver])
        gained += 1
        if donor[1] == receiver[1]:
            break
    return new if gained else None


class TransferPolicy:
    """``θ_give``, ``θ_take`` (``[L, 2]`` logits, float64) and their REINFORCE update (module docstring)."""

    def __init__(self, num_layers: int):
        self.give = torch.zeros(num_layers, 2, dtype=torch.float64)
        self.take = torch.zeros(num_layers, 2, dtype=torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"give": self.give.clone(), "take": self.take.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.give, self.take = state["give"].clone(), state["take"].clone()

    def sample(self, space: AllocationSpace, levels: torch.Tensor, k: int, generator: torch.Generator,
               max_tries: int = 50) -> list[Transfer]:
        """Up to ``k`` feasible transfers from ``levels`` (donor and receiver drawn independently; draws
        that give an infeasible state are redrawn, at most ``max_tries`` times per sample)."""
        give, take = torch.softmax(self.give.flatten(), 0), torch.softmax(self.take.flatten(), 0)
        out: list[Transfer] = []
        for _ in range(k * max_tries):
            if len(out) == k:
                break
            d = divmod(int(torch.multinomial(give, 1, generator=generator)), 2)
            r = divmod(int(torch.multinomial(take, 1, generator=generator)), 2)
            new = transfer(space, levels, d, r)
            if new is not None:
                out.append(Transfer(d, r, new))
        return out

    def update(self, transfers: list[Transfer], advantages: torch.Tensor, lr: float) -> None:
        """``θ <- θ − lr · 1/K Σ_j (A_j − Ā) ∇ log π(transfer_j)`` for both distributions."""
        if len(transfers) < 2:
            return
        centred = (advantages - advantages.mean()).to(torch.float64)  # [K]
        for logits, cells in ((self.give, [t.donor for t in transfers]), (self.take, [t.receiver for t in transfers])):
            probs = torch.softmax(logits.flatten(), 0)  # [2L]
            chosen = torch.zeros(len(cells), probs.numel(), dtype=torch.float64)
            chosen[torch.arange(len(cells)), torch.tensor([2 * c[0] + c[1] for c in cells])] = 1.0
            grad = centred @ (chosen - probs)  # Σ_j A_j ∇ log π_j, [2L]
            logits -= lr * grad.view_as(logits) / len(cells)
