"""The search-state file read and checked without a model: corrupt files and mismatches are named, and a
resumed search reports the seconds of the whole run."""

import pytest
import torch

from pg_pruning_plugin import PolicyGradientSearch, ResumeError, SearchConfig, SearchSpace
from pg_pruning_plugin.search.state_file import check_signature, read_state, signature, write_state


def _blocks(n: int = 16) -> torch.Tensor:
    return torch.randint(0, 200, (n, 8), generator=torch.Generator().manual_seed(0))


def test_a_corrupt_file_is_one_sentence(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError) as info:
        read_state(path)
    message = str(info.value)
    assert f"cannot read search state {path}" in message and "Delete it to start over" in message
    assert ".." not in message


def test_a_mismatch_names_the_field(llama, tmp_path):
    space = SearchSpace.from_model(llama)
    path = tmp_path / "state.pt"
    write_state(path, signature(SearchConfig(preset="authors", steps=4), space, 8), {"step": 2}, seconds=3.0)
    saved = read_state(path)
    assert saved.step == 2 and saved.seconds == 3.0
    check_signature(saved, signature(SearchConfig(preset="authors",
                                                  steps=4, checkpoint_every=1), space, 8), path)  # not compared
    with pytest.raises(ResumeError, match="steps was 4, this run has 5"):
        check_signature(saved, signature(SearchConfig(preset="authors", steps=5), space, 8), path)
    with pytest.raises(ResumeError, match="number of calibration batches was 8, this run has 9"):
        check_signature(saved, signature(SearchConfig(preset="authors", steps=4), space, 9), path)
    with pytest.raises(ResumeError, match="number of decoder layers was 3, this run has 2"):
        check_signature(saved, signature(SearchConfig(preset="authors",
                                                      steps=4), space.with_layers(space.layers[:2]), 8), path)


def test_resumed_search_counts_the_seconds_before_the_interruption(llama, tmp_path):
    config = SearchConfig(preset="authors", steps=4, batch_size=4, init_batches=1, checkpoint_every=1)
    state = tmp_path / "state.pt"

    def stop_at_2(step, _state):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        PolicyGradientSearch(llama, _blocks(), config, checkpoint_path=state).run(progress=False, on_step=stop_at_2)
    saved = read_state(state)
    assert saved.step == 2 and saved.seconds > 0
    resumed = PolicyGradientSearch(llama, _blocks(), config, checkpoint_path=state).run(progress=False)
    assert resumed.seconds > saved.seconds
