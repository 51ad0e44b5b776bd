"""Running a GGUF file in llama.cpp and checking it against transformers.

:func:`llama_cpp_greedy` runs a GGUF through the ``node-llama-cpp`` npm package (prebuilt CPU binaries;
no compiler) with the JavaScript driver shipped as package data (``driver.mjs``), and
:func:`compare_with_llama_cpp` checks greedy tokens and logits against transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path

import torch
import torch.nn as nn

from ..resources.assets import cache_dir

__all__ = ["NODE_LLAMA_CPP_ENV", "NODE_LLAMA_CPP_VERSION", "Comparison", "LlamaCppUnavailable",
           "compare_with_llama_cpp", "find_node_llama_cpp", "llama_cpp_greedy"]

NODE_LLAMA_CPP_ENV = "PG_PRUNING_NODE_LLAMA_CPP"
NODE_LLAMA_CPP_VERSION = "3.22.1"  # the version the export was verified with (llama.cpp tag v0.5.0)


class LlamaCppUnavailable(RuntimeError):
    """node and the ``node-llama-cpp`` package were not found."""


def find_node_llama_cpp() -> Path | None:
    """Folder whose ``node_modules/node-llama-cpp`` holds the runtime: ``$PG_PRUNING_NODE_LLAMA_CPP``, else
    ``<cache>/node-llama-cpp``; ``None`` when absent or when ``node`` is not on PATH."""
    env = os.environ.get(NODE_LLAMA_CPP_ENV)
    candidates = [Path(env).expanduser()] if env else [cache_dir() / "node-llama-cpp"]
    if shutil.which("node") is None:
        return None
    for folder in candidates:
        if (folder / "node_modules" / "node-llama-cpp" / "dist" / "index.js").is_file():
            return folder
    return None


def llama_cpp_greedy(gguf_path: str | os.PathLike, prompts: list[list[int]], n_predict: int = 16,
                     return_logits: bool = False, threads: int = 1, kv_cache: str = "f16",
                     flash_attention: bool | str = "auto", runtime: Path | None = None,
                     timeout: float = 600) -> list[dict]:
    """Greedy (argmax) continuation of token-id ``prompts`` by llama.cpp on CPU, via node-llama-cpp.

    ``kv_cache``: ``"f16"`` (llama.cpp's default) or ``"f32"``; ``flash_attention``: ``"auto"`` (default),
    True or False. On CPU, flash attention rounds K/V to f16 even with an f32 cache, so exact
    comparisons need ``kv_cache="f32", flash_attention=False``.
    Returns one ``{"generated": [ids], "logits": [[vocab floats] per step] | None}`` per prompt. Raises
    :class:`LlamaCppUnavailable` when the runtime is missing, ``RuntimeError`` when llama.cpp fails.
    """
    if kv_cache not in ("f16", "f32"):
        raise ValueError(f"kv_cache must be 'f16' or 'f32', got {kv_cache!r}")
    runtime = runtime or find_node_llama_cpp()
    if runtime is None:
        raise LlamaCppUnavailable(
            f"llama.cpp runtime not found: run `npm install --prefix DIR node-llama-cpp@{NODE_LLAMA_CPP_VERSION}` "
            f"and set {NODE_LLAMA_CPP_ENV}=DIR (node >= 20 on PATH)")
    longest = max(len(p) for p in prompts)
    request = {"model": str(Path(gguf_path).resolve()), "prompts": prompts, "n_predict": n_predict,
               "return_logits": return_logits, "threads": threads, "kv_cache": kv_cache.upper(),
               "flash_attention": flash_attention,
               "context_size": max(64, longest + n_predict + 8)}
    driver_file = files(__package__) / "driver.mjs"
    with tempfile.TemporaryDirectory(prefix="pg-llama-cpp-") as tmp, as_file(driver_file) as driver:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps(request))
        proc = subprocess.run(["node", str(driver), str(runtime), str(req)], capture_output=True, text=True,
                              timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp (node-llama-cpp) failed on {gguf_path}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)["results"]


@dataclass
class Comparison:
    """Greedy tokens of transformers and llama.cpp for one prompt, and their logit difference."""

    prompt: list[int]
    transformers: list[int]
    llama_cpp: list[int]
    max_abs_logit_diff: float  # over the steps where both saw the same prefix
    max_abs_logit: float
    steps_compared: int

    @property
    def tokens_equal(self) -> bool:
        return self.transformers == self.llama_cpp


@torch.no_grad()
def _hf_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        nxt = model(ids, use_cache=False).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@torch.no_grad()
def compare_with_llama_cpp(model: nn.Module, gguf_path: str | os.PathLike, prompts: list[list[int]],
                           n_predict: int = 16, threads: int = 1, exact: bool = True,
                           runtime: Path | None = None) -> list[Comparison]:
    """Greedy ``n_predict`` tokens of ``model`` (transformers; converted to float32 in place) and of
    ``gguf_path`` (llama.cpp) per prompt, plus the largest logit difference over the steps where both had
    generated the same prefix. ``exact``: run llama.cpp with an f32 KV cache and without flash attention
    (its defaults, f16 K/V, round the logits at about 1e-3 relative)."""
    model = model.float().eval()
    results = llama_cpp_greedy(gguf_path, prompts, n_predict, return_logits=True, threads=threads,
                               kv_cache="f32" if exact else "f16", flash_attention=False if exact else "auto",
                               runtime=runtime)
    comparisons = []
    for prompt, res in zip(prompts, results):
        ours = _hf_greedy(model, prompt, n_predict)
        theirs = res["generated"]
        same = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), n_predict)
        steps = min(same + 1, n_predict)  # step `same` still has the same prefix
        full = torch.tensor([prompt + theirs])
        hf_logits = model(full, use_cache=False).logits[0, len(prompt) - 1: len(prompt) - 1 + steps]
        cpp_logits = torch.tensor(res["logits"][:steps], dtype=torch.float32)
        diff = float((hf_logits - cpp_logits).abs().max())
        comparisons.append(Comparison(prompt, ours, theirs, diff, float(hf_logits.abs().max()), steps))
    return comparisons
