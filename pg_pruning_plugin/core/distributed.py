"""Several processes, one run: every ``torch.distributed`` call of the package lives here.

A distributed run is ``N`` processes (ranks), started by ``torchrun`` (or any launcher that
initialises the default process group before the package is called), each holding the whole model
(or its ``accelerate`` dispatch over that rank's own devices) and the same calibration blocks. The
package then uses two kinds of parallelism:

* **statistics over calibration shards** (activation metrics, Taylor gradients, FLAP statistics,
  block influence, the refit's and the level table's ``H = XXᵀ``): each rank runs its contiguous
  :func:`shard` of the calibration batches and the sums are added with :func:`all_reduce_stats`,
  one collective per layer, so every rank ends with the statistics of all the text;
* **search steps** (:class:`StepSplit`): the ``C`` candidates of a step (the ``K`` mask samples, or
  the allocation policy's current allocation and its ``K`` transfers) are drawn on every rank from
  the same seeded generator and split over ``gcd(C, N)`` sample groups; the ``N / gcd(C, N)`` ranks
  of a group split the step's batch by rows. One :func:`gather_losses` per step gives every rank
  all ``C`` losses, and every rank applies the same update, so the search state stays identical
  on every rank without being broadcast.

Every helper works without a process group (one process is rank 0 of 1, and reductions are
no-ops), so single-process runs do exactly what they did before. A collective that fails because
another rank died, raised or stopped responding (the process group's timeout) raises
:class:`DistributedError` naming what was being exchanged; :func:`check_consistent` refuses ranks
that disagree on the model, the configuration or the data before any work. Control messages
(consistency checks, barriers, broadcasts) go through a CPU ``gloo`` group, also under ``nccl``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistributedError", "StepSplit", "all_reduce_stats", "barrier", "check_consistent", "from_main",
           "gather_losses", "init_from_environment", "is_distributed", "is_main", "launch_local", "local_device",
           "rank", "shard", "shutdown", "split", "weight_shapes", "world_size"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Tensors packed into one buffer per collective up to this many bytes; a larger one is reduced in place on its own
# (packing would copy it).
PACK_BYTES = 256 * 2**20


class DistributedError(RuntimeError):
    """Another rank failed, stopped responding or disagrees with this one: the run cannot go on."""


# -- where this process stands ---------------------------------------------------------------------

def is_distributed() -> bool:
    """Whether a default process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes checkpoints, results, logs and progress bars."""
    return rank() == 0


def local_device() -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` under ``nccl``, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_environment(timeout: float = 1800.0) -> bool:
    """Initialise the default process group from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): ``nccl`` with one GPU per rank when CUDA is
    available, ``gloo`` on the CPU otherwise; ``timeout`` seconds bound every collective, so a rank that
    stops responding ends the run. One rank (``torchrun --nproc-per-node 1``) is a group too: it puts the
    run on the GPU. Returns whether a process group is initialised (an existing one is kept; outside
    ``torchrun`` nothing is done)."""
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout={timeout}: a positive number of seconds")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    logger.info("rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def shutdown() -> None:
    """Destroy the default process group, if one is initialised (the end of a run started by
    :func:`init_from_environment`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_local(fn: Callable[..., T], world: int, *args: object, timeout: float = 600.0, threads: int = 1) -> list[T]:
    """Run ``fn(*args)`` in ``world`` fresh local processes that form one ``gloo`` group (``world == 1``: one
    process without a group), each with ``threads`` torch threads; returns every rank's result, in rank order.

    ``fn`` must be importable (a module-level function) and its result picklable. A rank that fails makes
    the others fail too (:class:`DistributedError` within ``timeout`` seconds), and this raises with the
    first failure's traceback.
    """
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="pg-prune-ranks-") as tmp:
        mp.spawn(_local_rank, args=(world, tmp, timeout, threads, fn, args), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"result-{r}.pt"), weights_only=False) for r in range(world)]


def _local_rank(index: int, world: int, tmp: str, timeout: float, threads: int, fn: Callable, args: tuple) -> None:
    """The body of one :func:`launch_local` process."""
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=index,
                                world_size=world, timeout=timedelta(seconds=timeout))
    try:
        torch.save(fn(*args), os.path.join(tmp, f"result-{index}.pt"))
    finally:
        shutdown()


# -- dividing work -----------------------------------------------------------------------------------

def split(n: int, parts: int | None = None, index: int | None = None) -> range:
    """The contiguous share of ``n`` items that part ``index`` of ``parts`` takes (default: this rank of
    all ranks): sizes differ by at most one, the first ``n % parts`` parts take one more."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def shard(items: Sequence[T]) -> list[T]:
    """This rank's :func:`split` of ``items`` (all of them without a process group): the calibration
    batches a statistics pass runs on when every rank holds the same batches."""
    share = split(len(items))
    return list(items[share.start:share.stop])


@dataclass(frozen=True)
class StepSplit:
    """How the ``candidates`` of a search step and its ``batch_size`` sequences are divided over the ranks.

    The ranks form a grid of ``sample_groups = gcd(candidates, world_size)`` groups of ``data_shards``
    ranks: group ``g`` scores an equal share of the candidates, and within a group each rank scores
    them on a contiguous share of the batch's rows (shares differ by at most one row). With
    ``data_shards == 1`` every candidate's loss is computed by one rank exactly as one process computes
    it, so an ``N``-rank search is bit-identical to a one-process one; with several shards a loss is the
    token-weighted mean of the shards' losses, equal up to float rounding.
    """

    world_size: int = 1
    rank: int = 0
    candidates: int = 1
    batch_size: int = 1
    sample_groups: int = 1
    data_shards: int = 1

    @classmethod
    def of(cls, candidates: int, batch_size: int, world: int | None = None, index: int | None = None) -> StepSplit:
        """The split of ``candidates`` and ``batch_size`` rows over ``world`` ranks (default: the process
        group's); ``ValueError`` if some rank would have no row to score."""
        world = world_size() if world is None else world
        index = rank() if index is None else index
        groups = math.gcd(candidates, world)
        shards = world // groups
        if shards > batch_size:
            raise ValueError(
                f"{world} ranks split a step's {candidates} candidates into {groups} group(s) of {shards} ranks, "
                f"each rank taking a share of the batch's {batch_size} sequences: {shards - batch_size} rank(s) of "
                f"every group would have none. Use at most {groups * batch_size} ranks, a larger batch_size, or a "
                f"number of candidates per step that shares more factors with the world size")
        return cls(world, index, candidates, batch_size, groups, shards)

    @property
    def sample_group(self) -> int:
        return self.rank // self.data_shards

    @property
    def data_shard(self) -> int:
        return self.rank % self.data_shards

    def samples(self, count: int | None = None) -> range:
        """The candidate indices this rank scores among ``count`` (default: ``candidates``; a step may have
        fewer)."""
        return split(self.candidates if count is None else count, self.sample_groups, self.sample_group)

    def rows(self, n: int) -> range:
        """The rows of an ``n``-row batch this rank scores."""
        return split(n, self.data_shards, self.data_shard)

    def as_dict(self) -> dict:
        """What the pruning report and the search-state file record."""
        return {"world_size": self.world_size, "candidates_per_step": self.candidates,
                "batch_size": self.batch_size, "sample_groups": self.sample_groups, "data_shards": self.data_shards,
                "candidates_per_rank": [len(split(self.candidates, self.sample_groups, r // self.data_shards))
                                        for r in range(self.world_size)],
                "sequences_per_rank": [len(split(self.batch_size, self.data_shards, r % self.data_shards))
                                       for r in range(self.world_size)]}

    def describe(self) -> str:
        """One line for the log."""
        d = self.as_dict()
        line = (f"{self.world_size} ranks: {self.candidates} candidates per step in {self.sample_groups} group(s) "
                f"({'/'.join(map(str, sorted(set(d['candidates_per_rank']), reverse=True)))} per rank), each "
                f"batch of {self.batch_size} sequences in {self.data_shards} shard(s) "
                f"({'/'.join(map(str, sorted(set(d['sequences_per_rank']), reverse=True)))} per rank)")
        if self.data_shards > 1:
            line += "; losses are token-weighted means over the shards (equal to one process up to float rounding)"
        return line


# -- collectives ------------------------------------------------------------------------------------

@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn the failure of a collective into a :class:`DistributedError` that says what was exchanged."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:  # torch.distributed's errors (DistBackendError, timeouts) are RuntimeErrors
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed: another rank stopped, raised or did not answer within "
            f"the process group's timeout ({type(exc).__name__}: {first}). Every rank stops; nothing more is "
            f"written") from exc


_control: dict[str, object] = {}


def _control_group():
    """A ``gloo`` group over all ranks for control messages (the default group when it is ``gloo``)."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if _control.get("world") is not world:
        _control["world"], _control["group"] = world, dist.new_group(backend="gloo")
    return _control["group"]


def gather_losses(values: torch.Tensor, own: range, total: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """All ``total`` losses of a step on every rank: ``[total]`` float64.

    This rank computed ``values[i]`` for candidate ``own[i]`` (on its rows, with ``weights[i]``
    tokens or sequences; default 1). Each candidate's loss is ``Σ value·weight / Σ weight`` over the
    ranks that scored it: the value itself when one rank scored it (exactly: a float32 value times an
    integer weight is exact in float64), the weighted mean of its shards otherwise. One all-reduce of
    ``2 × total`` numbers; without a process group ``values`` are returned as they are.
    """
    if not is_distributed():
        return values.double()
    buffer = torch.zeros(2, total, dtype=torch.float64)
    w = torch.ones(len(own), dtype=torch.float64) if weights is None else weights.double().cpu()
    buffer[0, own.start:own.stop] = values.double().cpu() * w
    buffer[1, own.start:own.stop] = w
    device = local_device()
    buffer = buffer.to(device)
    with _collective(f"the exchange of {total} losses"):
        dist.all_reduce(buffer)
    buffer = buffer.cpu()
    return torch.where(buffer[1] > 0, buffer[0] / buffer[1].clamp_min(1e-300), buffer[0])


def all_reduce_stats(tensors: Sequence[torch.Tensor], what: str = "statistics") -> None:
    """Sum ``tensors`` over all ranks, in place (a no-op without a process group).

    Tensors are packed per dtype into one buffer on the communication device (one collective for
    the usual case of float64 statistics); a tensor larger than :data:`PACK_BYTES` is reduced in
    place by itself, so a large Gram matrix is never copied. Counts travel as float64 tensors (exact
    up to 2^53).
    """
    if not is_distributed() or not tensors:
        return
    device = local_device()
    with _collective(f"the reduction of {what}"):
        small: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            if t.numel() * t.element_size() > PACK_BYTES and t.device == device and t.is_contiguous():
                dist.all_reduce(t)
            else:
                small.setdefault(t.dtype, []).append(t)
        for group in small.values():
            buffer = torch.cat([t.detach().reshape(-1).to(device) for t in group])
            dist.all_reduce(buffer)
            offset = 0
            for t in group:
                t.copy_(buffer[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()


# -- control --------------------------------------------------------------------------------------------

def weight_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """Name, shape and dtype of every parameter (what :func:`check_consistent` compares of a model; the
    values are not read, so offloaded weights stay where they are)."""
    return [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]


def _digest(value: object) -> str:
    """A hash of ``value``: tensors by dtype, shape and bytes (meta tensors by dtype and shape), containers
    element by element, everything else by ``repr``."""
    h = hashlib.sha256()

    def feed(v: object) -> None:
        if isinstance(v, torch.Tensor):
            h.update(f"tensor {v.dtype} {tuple(v.shape)}".encode())
            if v.device.type != "meta":
                h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            h.update(b"{")
            for key in sorted(v, key=repr):
                feed(key)
                feed(v[key])
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for item in v:
                feed(item)
            h.update(b"]")
        else:
            h.update(repr(v).encode())
        h.update(b";")

    feed(value)
    return h.hexdigest()


def check_consistent(what: str, **fields: object) -> None:
    """Refuse to go on unless every rank passes equal ``fields`` (compared by :func:`_digest`); the error
    names the fields and the ranks that differ from rank 0. One small all-gather; nothing without a
    process group."""
    if not is_distributed():
        return
    mine = {name: _digest(value) for name, value in fields.items()}
    gathered: list[dict[str, str] | None] = [None] * world_size()
    with _collective(f"the consistency check of {what}"):
        dist.all_gather_object(gathered, mine, group=_control_group())
    differing = sorted({name for other in gathered for name in mine if other.get(name) != gathered[0].get(name)})
    if differing:
        ranks = [r for r, other in enumerate(gathered) if other != gathered[0]]
        raise DistributedError(
            f"{what}: rank(s) {ranks} differ from rank 0 in {', '.join(differing)}; every rank must run the same "
            f"model, configuration, seed and calibration data")


def barrier(what: str, timeout: float | None = None) -> None:
    """Wait until every rank reaches this point, at most ``timeout`` seconds (default: the process group's
    timeout); :class:`DistributedError` naming the ranks that did not arrive. Nothing without a group."""
    if not is_distributed():
        return
    with _collective(f"the barrier before {what}"):
        dist.monitored_barrier(group=_control_group(), wait_all_ranks=True,
                               timeout=None if timeout is None else timedelta(seconds=timeout))


def from_main(fn: Callable[[], T], what: str) -> T:
    """``fn()`` run on rank 0 alone, its result (or the exception it raised) handed to every rank: for
    what only rank 0 may read, such as a search-state file on a disk the other nodes do not see."""
    if not is_distributed():
        return fn()
    payload: list[object] = [None]
    if is_main():
        try:
            payload[0] = ("value", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            payload[0] = ("error", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))
    with _collective(f"rank 0's {what}"):
        dist.broadcast_object_list(payload, src=0, group=_control_group())
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - anything that does not pickle is sent as text
        return False
    return True
