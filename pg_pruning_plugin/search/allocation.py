"""The allocation policy: how many units each layer keeps, learned by policy gradient over level transfers.

The search space is one integer per layer and unit type, the *level* ``a[l, t]``: kept KV groups
(``t = 0``) and kept MLP blocks of ``block`` channels (``t = 1``); inside a layer the units are
ranked once (search/levels.py), so a level names a sub-network. A state is *feasible* when every
level lies in its band ``[low[l, t], high[l, t]]`` (the levels with weights in the level table, all
``≥ 1``) and the prunable parameters it keeps fit the budget.

The policy proposes *transfers*: a donor ``(l, t)`` gives one level and receivers take one level each,
drawn one after another, as long as the free budget (the freed level and any slack) pays for one
more. Donor and receivers come from two categorical distributions, ``softmax(θ_give)`` and
``softmax(θ_take)`` over the ``2L`` (layer, type) cells, each draw restricted to the cells where it
is feasible, so every sampled candidate is a model the user could ship. One step (``K`` candidates
on one batch ``x``)::

    c_j    = transfer_j(a),  transfer_j ~ π_θ      j = 1..K
    A_j    = L(c_j; x) − L(a; x)                   same-batch baseline: the current state's own loss
    θ     <- θ − lr · 1/K Σ_j (A_j − Ā) ∇ log π_θ(transfer_j)
    a     <- c_j*  if  A_j* < 0  (j* = argmin A)   greedy acceptance, validated by the incumbent

REINFORCE with mean-centred advantages (``Ā``: their mean over the ``K`` candidates) makes ``θ_give``
learn where a level is cheap to give up and ``θ_take`` where one is worth taking; the same-batch
loss of the current state removes the batch difficulty from every advantage. Everything here is
tensor math on ``[L, 2]`` integers; the model never appears.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AllocationSpace", "Transfer", "TransferPolicy", "can_give", "can_take"]


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
    """One sampled move: ``donor`` gave one level, ``receivers`` took one level each, in order; the feasible
    cells each draw was restricted to (``[2L]`` bool, flat ``2·layer + type``) are kept for the gradient."""

    donor: tuple[int, int]
    receivers: tuple[tuple[int, int], ...]
    levels: torch.Tensor  # [L, 2] the resulting state
    donor_options: torch.Tensor  # [2L] bool
    receiver_options: tuple[torch.Tensor, ...]  # one [2L] bool per receiver


def _flat(cell: tuple[int, int]) -> int:
    return 2 * cell[0] + cell[1]


def _cell(index: int) -> tuple[int, int]:
    return divmod(index, 2)


def can_give(space: AllocationSpace, levels: torch.Tensor) -> torch.Tensor:
    """``[2L]`` cells that may give a level."""
    return (levels > space.low).flatten()


def can_take(space: AllocationSpace, levels: torch.Tensor, free: int, exclude: int | None = None) -> torch.Tensor:
    """``[2L]`` cells that may take one more level with ``free`` budget left (``exclude``: the donor)."""
    options = ((levels < space.high) & (space.price <= free)).flatten()
    if exclude is not None:
        options[exclude] = False
    return options


def _draw(logits: torch.Tensor, options: torch.Tensor, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.flatten().masked_fill(~options, float("-inf")), 0)
    return int(torch.multinomial(probs, 1, generator=generator))


def _restricted_probs(logits: torch.Tensor, options: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.flatten().masked_fill(~options, float("-inf")), 0)


class TransferPolicy:
    """``θ_give``, ``θ_take`` (``[L, 2]`` logits, float64) and their REINFORCE update (module docstring).

    A transfer is drawn as a sequence: the donor from ``softmax(θ_give)`` over the cells that can give,
    then receivers one level at a time from ``softmax(θ_take)`` over the cells the remaining free budget
    can pay (never the donor), until none can. Its log-probability is the sum of these restricted
    categorical log-probabilities, so ``∇ log π`` is exact: ``e_choice − p_restricted`` per draw.
    """

    def __init__(self, num_layers: int):
        self.give = torch.zeros(num_layers, 2, dtype=torch.float64)
        self.take = torch.zeros(num_layers, 2, dtype=torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"give": self.give.clone(), "take": self.take.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.give, self.take = state["give"].clone(), state["take"].clone()

    def sample_one(self, space: AllocationSpace, levels: torch.Tensor, generator: torch.Generator) -> Transfer | None:
        """One transfer from ``levels``, or ``None`` when the drawn donor frees nothing any cell can use."""
        donor_options = can_give(space, levels)
        if not bool(donor_options.any()):
            return None
        donor = _draw(self.give, donor_options, generator)
        new = levels.clone()
        new[_cell(donor)] -= 1
        receivers, receiver_options = [], []
        while True:
            options = can_take(space, new, space.budget - space.cost(new), exclude=donor)
            if not bool(options.any()):
                break
            receiver = _draw(self.take, options, generator)
            new[_cell(receiver)] += 1
            receivers.append(_cell(receiver))
            receiver_options.append(options)
        if not receivers:
            return None
        return Transfer(_cell(donor), tuple(receivers), new, donor_options, tuple(receiver_options))

    def sample(self, space: AllocationSpace, levels: torch.Tensor, k: int, generator: torch.Generator,
               max_tries: int = 50) -> list[Transfer]:
        """Up to ``k`` transfers from ``levels`` (a draw that frees nothing usable is drawn again, at most
        ``max_tries`` times per transfer)."""
        out: list[Transfer] = []
        for _ in range(k * max_tries):
            if len(out) == k:
                break
            move = self.sample_one(space, levels, generator)
            if move is not None:
                out.append(move)
        return out

    def update(self, transfers: list[Transfer], advantages: torch.Tensor, lr: float) -> None:
        """``θ <- θ − lr · 1/K Σ_j (A_j − Ā) ∇ log π(transfer_j)`` for both distributions."""
        if len(transfers) < 2:
            return
        centred = (advantages - advantages.mean()).to(torch.float64)  # [K]
        give = torch.zeros_like(self.give).flatten()
        take = torch.zeros_like(self.take).flatten()
        for move, a in zip(transfers, centred.tolist()):
            give -= a * _restricted_probs(self.give, move.donor_options)
            give[_flat(move.donor)] += a
            for receiver, options in zip(move.receivers, move.receiver_options):
                take -= a * _restricted_probs(self.take, options)
                take[_flat(receiver)] += a
        self.give -= lr * give.view_as(self.give) / len(transfers)
        self.take -= lr * take.view_as(self.take) / len(transfers)
