"""Distributed runs on the CPU: two ``gloo`` processes compute what one process computes (search of both
policies, activation metrics, FLAP and Taylor statistics, block influence, the refit), a 2-rank search state
resumes on 1 rank, a rank that dies or raises ends every rank with a clear error and no result, and ranks
that disagree are refused before any work. The helpers themselves work without a process group."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig
from pg_pruning_plugin.core import distributed
from pg_pruning_plugin.core.distributed import StepSplit, split
from tests.distributed_workers import CALIB, failing_worker, run_scenarios, scenario_worker
from tests.helpers import tiny_model

WORLD = 2


@contextmanager
def one_thread():
    """The references run with one thread, as the ranks do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(two-rank results, one-process results, the two-rank directory)``: every scenario of
    tests/distributed_workers.py once each way."""
    spawned = tmp_path_factory.mktemp("two-ranks")
    mp.spawn(scenario_worker, args=(WORLD, str(spawned)), nprocs=WORLD, join=True)
    with one_thread():
        single = run_scenarios(tmp_path_factory.mktemp("one-rank"))
    return torch.load(spawned / "results.pt", weights_only=False), single, spawned


def _equal(a, b, path="") -> None:
    """Exactly equal nested results."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def _close(a, b, rtol, atol, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], rtol, atol, f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, rtol, atol, f"{path}[{i}]")
    else:
        torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{path}: {m}")


@pytest.mark.parametrize("name", ["units-samples", "units-kl-incumbent", "allocation-samples"])
def test_a_sample_parallel_search_equals_one_process_bit_for_bit(runs, name):
    two, one, _ = runs
    assert two[name]["split"]["data_shards"] == 1 and two[name]["split"]["world_size"] == WORLD
    assert one[name]["split"]["world_size"] == 1
    for key in ("probs", "masks", "history", "levels"):
        if key in one[name]:
            _equal(two[name][key], one[name][key], f"{name}/{key}")


@pytest.mark.parametrize("name", ["units-rows", "allocation-rows"])
def test_a_row_parallel_search_equals_one_process_up_to_rounding(runs, name):
    two, one, _ = runs
    assert two[name]["split"]["data_shards"] == WORLD and two[name]["split"]["sequences_per_rank"] == [2, 2]
    _equal(two[name]["masks"], one[name]["masks"], f"{name}/masks")
    if "levels" in one[name]:
        assert torch.equal(two[name]["levels"], one[name]["levels"])
    _close(two[name]["probs"], one[name]["probs"], rtol=1e-5, atol=1e-6, path=f"{name}/probs")
    _close(two[name]["history"]["loss"], one[name]["history"]["loss"], rtol=1e-5, atol=1e-6, path=f"{name}/loss")


def test_statistics_over_calibration_shards_equal_one_pass(runs):
    two, one, _ = runs
    stats2, stats1 = two["statistics"], one["statistics"]
    for key in ("metric wanda-sp", "metric wifv", "flap", "influence"):
        _close(stats2[key], stats1[key], rtol=1e-6, atol=1e-9, path=key)
    _close(stats2["taylor"], stats1["taylor"], rtol=1e-4, atol=1e-7, path="taylor")  # float32 gradient sums
    assert stats2["refit"]["tokens"] == stats1["refit"]["tokens"] == 24 * 16
    _close(stats2["refit"]["weights"], stats1["refit"]["weights"], rtol=1e-5, atol=1e-6, path="refit weights")
    _close(stats2["refit"]["errors"], stats1["refit"]["errors"], rtol=1e-6, atol=1e-9, path="refit errors")


def test_a_two_rank_search_state_resumes_on_one_rank(runs, tmp_path):
    _, one, spawned = runs
    saved = torch.load(spawned / "state.pt", weights_only=False)
    assert saved["state"]["step"] == 3 and saved["state"]["parallel"]["world_size"] == WORLD
    config = SearchConfig(preset="authors",
                          steps=6, batch_size=4, init_batches=4, checkpoint_every=3, execution="gather")
    with one_thread():
        resumed = PolicyGradientSearch(tiny_model("llama"), CALIB, config,
                                       checkpoint_path=spawned / "state.pt").run(progress=False)
    uninterrupted = one["units-samples"]  # the same configuration, no checkpoint
    for kind, value in uninterrupted["probs"].items():
        assert torch.equal(getattr(resumed.probs, kind), value), kind
    _equal(resumed.masks.as_dict(), uninterrupted["masks"])


def test_ranks_that_disagree_are_refused_before_any_work(runs):
    *_, spawned = runs
    for r in range(WORLD):
        message = torch.load(spawned / f"mismatch-{r}.pt", weights_only=False)["mismatch"]
        assert message is not None and "rank(s) [1] differ from rank 0 in config" in message


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_rank_that_dies_or_raises_ends_every_rank_with_a_clear_error(how, tmp_path):
    context = mp.get_context("spawn")
    ranks = [context.Process(target=failing_worker, args=(r, WORLD, str(tmp_path), how)) for r in range(WORLD)]
    start = time.monotonic()
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    assert all(p.exitcode not in (0, None) for p in ranks), [p.exitcode for p in ranks]
    assert time.monotonic() - start < 120
    survivor = (tmp_path / "error-0.txt").read_text()
    assert survivor.startswith("DistributedError: rank 0 of 2: the exchange of 2 losses failed: another rank stopped")
    assert not (tmp_path / "result.pt").exists()


# -- the helpers without a process group ---------------------------------------------------------------

def test_without_a_process_group_the_helpers_are_one_rank():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main(), distributed.is_distributed()) == (
        1, 0, True, False)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    values = torch.tensor([1.5, 2.5])
    assert torch.equal(distributed.gather_losses(values, range(2), 2), values.double())
    stats = torch.ones(3)
    distributed.all_reduce_stats([stats])
    assert torch.equal(stats, torch.ones(3))
    distributed.check_consistent("nothing", anything=object())
    distributed.barrier("nothing")
    assert distributed.from_main(lambda: 7, "a number") == 7
    assert distributed.init_from_environment() is False


def test_split_gives_contiguous_shares_differing_by_at_most_one():
    shares = [split(10, 4, i) for i in range(4)]
    assert [len(s) for s in shares] == [3, 3, 2, 2]
    assert [i for s in shares for i in s] == list(range(10))
    assert [len(split(1, 3, i)) for i in range(3)] == [1, 0, 0]


def test_step_split_uses_sample_groups_then_rows():
    assert StepSplit.of(2, 8, world=2, index=1).as_dict() == {
        "world_size": 2, "candidates_per_step": 2, "batch_size": 8, "sample_groups": 2, "data_shards": 1,
        "candidates_per_rank": [1, 1], "sequences_per_rank": [8, 8]}
    grid = StepSplit.of(2, 8, world=8, index=5)  # 2 groups of 4 ranks
    assert (grid.sample_groups, grid.data_shards, grid.samples(), grid.rows(8)) == (2, 4, range(1, 2), range(2, 4))
    odd = StepSplit.of(5, 8, world=3, index=2)
    assert odd.as_dict()["sequences_per_rank"] == [3, 3, 2] and "float rounding" in odd.describe()
    with pytest.raises(ValueError, match="Use at most 2 ranks"):
        StepSplit.of(3, 2, world=8)
