"""The package as a user imports it: the public names, and what ``import pg_pruning_plugin`` (and the
command line) does not import; a YAML recipe naming the modifier parses after ``import pg_pruning_plugin``."""

import subprocess
import sys

import pg_pruning_plugin
from tests.helpers import RECIPES

PUBLIC = ("ARCHITECTURES", "METRICS", "PolicyGradientSearch", "ResumeError", "SearchConfig", "SearchResult",
          "SearchSpace", "UnitMasks", "UnitScores", "UnsupportedArchitectureError", "compute_metric", "hard_masks",
          "load_pruned", "masked", "prune_model", "save_pruned")


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_public_names():
    assert set(PUBLIC) <= set(pg_pruning_plugin.__all__) == set(pg_pruning_plugin._PUBLIC)
    assert all(hasattr(pg_pruning_plugin, name) for name in pg_pruning_plugin.__all__)


def test_import_is_fast_and_quiet():
    proc = subprocess.run([sys.executable, "-c", "import sys, pg_pruning_plugin\n"
                           "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
                          capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip() == "[]" and proc.stderr == ""


def test_a_public_name_shared_with_a_subpackage_stays_the_public_object():
    out = _python("import pg_pruning_plugin.refit.lstsq\n"  # the subpackage first, then the name
                  "from pg_pruning_plugin import refit\n"
                  "print(callable(refit), refit.__module__)\n")
    assert out.split()[0] == "True" and out.split()[1].startswith("pg_pruning_plugin.refit")


def test_import_and_command_line_do_not_import_the_integrations():
    out = _python(
        "import sys, pg_pruning_plugin\n"
        "from pg_pruning_plugin.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in ('llmcompressor', 'torch_pruning', 'lm_eval') if m in sys.modules))\n")
    assert out.strip() == "[]"


def test_recipe_names_the_modifier_after_importing_the_package():
    out = _python(
        "import pg_pruning_plugin\n"
        "from llmcompressor.recipe import Recipe\n"
        f"recipe = Recipe.create_instance(open({str(RECIPES / 'pg_prune.yaml')!r}).read())\n"
        "print(type(recipe.modifiers[0]).__module__)\n")
    assert out.strip().splitlines()[-1] == "pg_pruning_plugin.integrations.llmcompressor.modifier"
