"""``pg-prune recipe``: run an llmcompressor recipe on a model with calibration text (one ``oneshot``).

A thin layer over ``llmcompressor.oneshot``: the calibration set is ``--num-samples`` blocks of
``--seq-len`` tokens from the calib split of ``--text`` (``datasets.Dataset`` of input_ids and
attention_mask, in a fixed order), the model is the directory ``resolve_model_dir`` gives (the
embedded SmolLM2 default is a cached copy of its GGUF file), loaded in the project's per-device
default dtype (``resources.models.default_dtype``: float32 on the CPU) unless ``--precision`` says
otherwise, and the compressed-tensors output is written to a temporary directory and renamed to
``--output``. The recipe's fields, the output, the text source, the architecture and any cost budget
(``granularity``/``cost`` fields) are checked before weights load.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig

from ..core.architectures import SearchSpace, architecture_of
from ..resources.files import atomic_directory
from ..resources.models import (
    DEFAULT_MODEL,
    default_dtype,
    load_tokenizer,
    model_paths,
    resolve_model_dir,
    weightless_model,
)
from ..resources.outputs import check_output
from ..resources.text import DEFAULT_TEXT, calibration_blocks, check_text_source
from ..search.budget import Budget

NAME = "recipe"
HELP = "run an llmcompressor YAML recipe (e.g. recipes/pg_prune_gptq_w4a16_g64.yaml) on a model in one oneshot call"

logger = logging.getLogger(__name__)

MODIFIER = "PolicyGradientPruningModifier"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="llmcompressor recipe file (YAML with *_stage / *_modifiers levels)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF directory, .gguf file or Hub id ({DEFAULT_MODEL}: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help="calibration text: wiki-vital (embedded), wikitext2, c4, or a .txt/.jsonl file")
    p.add_argument("--output", required=True, help="directory for the compressed model (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--num-samples", type=int, default=256, help="calibration sequences given to oneshot")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--precision", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype the model is loaded in (None: float32 on the CPU, bfloat16 on an accelerator; auto: "
                        "the checkpoint's, oneshot's own default)")
    p.add_argument("--seed", type=int, default=0, help="which calibration blocks are drawn")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"override a {MODIFIER} field of the recipe, e.g. --set steps=40, --set granularity=depth, "
                        "--set cost=flops, --set 'custom_costs={attn: 1, mlp: 0.01}', --set cost=none (repeatable; "
                        "VALUE is read as YAML, none as null except for refit and loop_refit, whose option it is)")


def recipe_text(path: str | os.PathLike, overrides: list[str]) -> tuple[str, bool]:
    """The recipe as YAML text with ``FIELD=VALUE`` overrides applied to every pruning modifier.

    Returns ``(text, has_pruning_modifier)``. The text is parsed by llmcompressor here, so unknown
    fields, unknown modifiers and recipes without any modifier fail before a model is loaded.
    """
    from llmcompressor.recipe import Recipe

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist (shipped recipes are in recipes/)")
    recipe = yaml.safe_load(path.read_text())
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} is not a YAML mapping")
    targets = [args for stage, groups in recipe.items() if stage.endswith("_stage") and isinstance(groups, dict)
               for group, mods in groups.items() if group.endswith("_modifiers") and isinstance(mods, dict)
               for name, args in mods.items() if name == MODIFIER]
    if overrides and not targets:
        raise ValueError(f"--set given but {path} has no {MODIFIER}")
    for item in overrides:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        for args in targets:
            args[field.strip()] = override_value(value, field.strip())
    text = yaml.safe_dump(recipe, sort_keys=False)
    if not Recipe.create_instance(text).modifiers:
        raise ValueError(
            f"recipe {path} defines no modifier: llmcompressor only reads modifiers nested as "
            "`<name>_stage: <group>_modifiers: <ModifierType>: {...}`"
        )
    return text, bool(targets)


# Fields with an option named "none" (the refit methods): for them ``--set FIELD=none`` is that option, not null.
NONE_IS_AN_OPTION = ("refit", "loop_refit")


def override_value(text: str, field: str = ""):
    """A ``--set`` value read as YAML; ``none``/``None`` mean null as ``null`` and ``~`` do (e.g. ``cost=none``),
    except for the fields of ``NONE_IS_AN_OPTION``, where ``none`` is the option of that name."""
    if text.strip() in ("none", "None"):
        return "none" if field in NONE_IS_AN_OPTION else None
    return yaml.safe_load(text)


def check_budgets(model_dir: str | os.PathLike, text: str) -> None:
    """Refuse an unreachable budget of any pruning modifier in ``text`` from the model's config alone.

    The layer shapes come from a weightless (meta-device) model, so nothing is loaded; the modifier
    checks again on the real model with the recipe's group-size rounding.
    """
    from llmcompressor.recipe import Recipe

    from ..integrations.llmcompressor import PolicyGradientPruningModifier

    configs = [m.search_config() for m in Recipe.create_instance(text).modifiers
               if isinstance(m, PolicyGradientPruningModifier)]
    if not configs:
        return
    space = SearchSpace.from_model(weightless_model(model_dir))
    for config in configs:
        Budget.of(space, config)  # BudgetError names the reachable range


def calibration_dataset(tokenizer, text: str, num_samples: int, seq_len: int, seed: int):
    """``datasets.Dataset`` with ``input_ids`` / ``attention_mask`` of ``num_samples`` x ``seq_len`` tokens."""
    from datasets import Dataset

    blocks = calibration_blocks(tokenizer, text, seq_len, num_samples, seed=seed)
    return Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})


def precision(choice: str | None) -> str:
    """The ``precision`` given to ``oneshot``: ``choice``, or the per-device default for the device oneshot
    computes on (its first accelerator, else the CPU)."""
    if choice is not None:
        return choice
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    return str(default_dtype(device)).removeprefix("torch.")


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1 or args.seq_len < 2:
        raise ValueError("--num-samples must be >= 1 and --seq-len >= 2")
    text, prunes = recipe_text(args.recipe, args.overrides)
    output = check_output(args.output, args.overwrite, model_paths(args.model), overwrite_hint="--overwrite")
    check_text_source(args.text)
    model_dir = resolve_model_dir(args.model)
    if prunes:  # unsupported models and unreachable budgets fail on the config, before any weight is loaded
        architecture_of(AutoConfig.from_pretrained(model_dir))
        check_budgets(model_dir, text)
    tokenizer = load_tokenizer(model_dir)
    dataset = calibration_dataset(tokenizer, args.text, args.num_samples, args.seq_len, args.seed)

    from llmcompressor import oneshot

    with atomic_directory(output) as tmp:
        oneshot(model=model_dir, processor=tokenizer, dataset=dataset, recipe=text, precision=precision(args.precision),
                num_calibration_samples=args.num_samples, max_seq_length=args.seq_len,
                shuffle_calibration_samples=False, output_dir=str(tmp))
    print(f"{args.recipe} applied to {args.model}: written to {output}")
    return 0
