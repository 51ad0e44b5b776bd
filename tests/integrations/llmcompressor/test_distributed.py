"""PolicyGradientPruningModifier under oneshot's distributed mode (two gloo ranks): refused on every rank,
before any search, with what to run instead."""

from __future__ import annotations

import torch.multiprocessing as mp

from tests.distributed_workers import oneshot_worker


def test_oneshot_under_a_process_group_is_refused_with_the_alternative(llmc_dir, tmp_path):
    mp.spawn(oneshot_worker, args=(2, str(tmp_path), str(llmc_dir)), nprocs=2, join=True)
    for rank in range(2):
        error = (tmp_path / f"error-{rank}.txt").read_text()
        assert error.startswith("ValueError: PolicyGradientPruningModifier does not run under oneshot's distributed "
                                "mode (2 ranks)"), error
        assert "torchrun --nproc-per-node N pg-prune prune" in error
