"""Where outputs may go: never onto, into or around the input model or the caches; an existing output only
with overwrite."""

import pytest

from pg_pruning_plugin.resources.assets import cache_dir
from pg_pruning_plugin.resources.models import gguf_cache_path, model_paths
from pg_pruning_plugin.resources.outputs import check_output


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace it"):
        check_output(tmp_path / "exists")
    with pytest.raises(FileExistsError, match="pass --overwrite to replace it"):
        check_output(tmp_path / "exists", overwrite_hint="--overwrite")
    assert check_output(tmp_path / "exists", overwrite=True) == (tmp_path / "exists").resolve()


def test_the_input_model_is_never_an_output(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for output in (model, model / "pruned", tmp_path):  # the input, inside it, or around it
        with pytest.raises(ValueError, match="input model"):
            check_output(output, overwrite=True, inputs=[model])
    assert check_output(tmp_path / "other", inputs=[model]) == (tmp_path / "other").resolve()


def test_a_single_file_input_protects_the_file_and_its_cache(tmp_path):
    gguf = tmp_path / "models" / "x.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    inputs = model_paths(gguf)
    assert inputs == [gguf, gguf_cache_path(gguf)]
    assert check_output(tmp_path / "models" / "x-pruned", inputs=inputs)  # beside the file: fine
    for output in (gguf, tmp_path / "models"):  # the file itself, or a directory holding it
        with pytest.raises(ValueError, match="input model"):
            check_output(output, overwrite=True, inputs=inputs)


def test_the_caches_are_never_outputs():
    for output in (cache_dir(), cache_dir() / "models" / "anything", cache_dir().parent):
        with pytest.raises(ValueError, match="cache"):
            check_output(output, overwrite=True)
