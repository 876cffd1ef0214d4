"""Where activations come from: the live model forward (the default) or the disk cache.

The token stream is laid out once per run, in contexts (`Layout`):

    [ statistics prefix | held-out evaluation | training stream: chunk 0, chunk 1, ... ]

The statistics prefix (layer scales, the distance matrix, hence the groups) and the held-out
contexts are disjoint from each other and from every training token; the training stream is cut
into chunks of `chunk_contexts` contexts, the unit of forward work and of the shuffle buffer's
refills (lgsae.buffer). A source yields, for chunk i, {layer: [tokens, D]} with the sink positions
already dropped:
- `StreamSource`: the model forward over that chunk's contexts, stopped after the last needed
  block; nothing is written to disk. Under torchrun the chunk's forward batches are split over the
  ranks and the activations all-gathered (each batch is the one a single process would run, so
  the bits are the single-process bits).
- `CacheSource`: the training stream harvested once into lgsae.harvest's disk cache (one shard
  per chunk, the same forward batches), then read back; its key covers the model's weights.
Both call `lgsae.capture.forward_layers` with the same batching, so a streamed and a cached run
see bit-identical activations.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lgsae.capture import (
    KEEP,
    OUTLIER_FACTOR,
    SINK_POSITIONS,
    LayerCapture,
    drop_sink,
    forward_layers,
    kept_positions,
    kept_rows,
)
from lgsae.data import iter_contexts
from lgsae.dist import Dist


@dataclass(frozen=True)
class Layout:
    """Positions in the token stream, in contexts of `ctx` tokens."""

    ctx: int
    stat_contexts: int
    eval_contexts: int
    train_contexts: int
    chunk_contexts: int

    @property
    def train_start(self) -> int:
        return self.stat_contexts + self.eval_contexts

    @property
    def total_contexts(self) -> int:
        return self.train_start + self.train_contexts

    @property
    def n_chunks(self) -> int:
        return -(-self.train_contexts // self.chunk_contexts)

    @property
    def tokens_per_context(self) -> int:
        """Training tokens per context: all but the sink positions."""
        return self.ctx - SINK_POSITIONS

    @property
    def train_tokens(self) -> int:
        return self.train_contexts * self.tokens_per_context

    def chunk_contexts_of(self, i: int) -> int:
        return min(self.chunk_contexts, self.train_contexts - i * self.chunk_contexts)

    def chunk_tokens(self, i: int) -> int:
        return self.chunk_contexts_of(i) * self.tokens_per_context


def make_layout(*, ctx: int, stat_tokens: int, eval_tokens: int, train_tokens: int,
                buffer_tokens: int, fwd_batch: int, batch: int) -> Layout:
    """Contexts for each part; a chunk is half the shuffle buffer, in whole forward batches,
    and holds at least two training batches (lgsae.buffer cuts its phases at batch
    boundaries)."""
    per = ctx - SINK_POSITIONS
    chunk = max(1, round(buffer_tokens / 2 / per / fwd_batch)) * fwd_batch
    chunk = max(chunk, -(-math.ceil(2 * batch / per) // fwd_batch) * fwd_batch)
    return Layout(ctx=ctx, stat_contexts=math.ceil(stat_tokens / ctx),
                  eval_contexts=math.ceil(eval_tokens / ctx),
                  train_contexts=math.ceil(train_tokens / per), chunk_contexts=chunk)


class Forward:
    """Token ids -> stored activations of `layers`, the same bits on one process or many.

    `forwarded` counts the contexts this process ran through the model (tests bound the work
    a resume re-does with it)."""

    def __init__(self, model, layers: list[int], *, batch_size: int, store: torch.dtype,
                 device: torch.device, dist: Dist | None = None):
        self.model, self.layers, self.batch_size = model, list(layers), batch_size
        self.store, self.device = store, torch.device(device)
        self.dist = dist or Dist(device=self.device)
        self.d_model = model.config.hidden_size
        self.forwarded = 0
        self.seconds = 0.0  # wall-clock in this process's forwards

    def __call__(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """{layer: [contexts * ctx, D]} (CPU, `store` dtype) for ids [contexts, ctx]."""
        if not self.dist.active:
            return self._run(ids)
        starts = list(range(0, ids.shape[0], self.batch_size))
        # rank r runs a contiguous run of the forward batches; the pieces are all-gathered
        mine = torch.tensor_split(torch.tensor(starts), self.dist.world)[self.dist.rank].tolist()
        lo = mine[0] if mine else ids.shape[0]
        hi = min(mine[-1] + self.batch_size, ids.shape[0]) if mine else ids.shape[0]
        part = self._run(ids[lo:hi]) if hi > lo else None
        return self._gather(part, ids.shape[0], ids.shape[1])

    def _run(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        t0 = time.perf_counter()
        with LayerCapture(self.model, self.layers) as cap:
            out = forward_layers(cap, ids, self.batch_size, self.device, self.store)
        self.forwarded += ids.shape[0]
        self.seconds += time.perf_counter() - t0
        return out

    def _gather(self, part, n_ctx: int, ctx: int) -> dict[int, torch.Tensor]:
        """All ranks' pieces, in rank order, as one {layer: [n_ctx * ctx, D]}."""
        L, D = len(self.layers), self.d_model
        n_batches = -(-n_ctx // self.batch_size)
        per_rank = -(-n_batches // self.dist.world) * self.batch_size  # the largest share
        buf = torch.zeros(per_rank * ctx, L, D, dtype=self.store)
        n_mine = 0 if part is None else part[self.layers[0]].shape[0]
        if part is not None:
            buf[:n_mine] = torch.stack([part[v] for v in self.layers], dim=1)
        counts = self.dist.gather(n_mine)
        dev = self.dist.device if self.dist.device.type == "cuda" else torch.device("cpu")
        send = buf.view(torch.uint8).to(dev)  # raw bytes: exact, and gloo has no bf16
        recv = [torch.empty_like(send) for _ in range(self.dist.world)]
        torch.distributed.all_gather(recv, send,
                                     group=None if dev.type == "cuda" else self.dist.cpu_group)
        full = torch.cat([r[:c].cpu().view(self.store) for r, c in zip(recv, counts)])
        assert full.shape[0] == n_ctx * ctx, (full.shape, n_ctx, ctx)
        return {v: full[:, j].contiguous() for j, v in enumerate(self.layers)}


def context_batches(tokenizer, text: dict, *, ctx: int, start: int, count: int,
                    per: int) -> Iterator[torch.Tensor]:
    """[<= per, ctx] id tensors covering contexts start .. start+count of the text, lazily.
    Raises if the text ends first (the pipeline checks the budget before writing anything)."""
    stream = iter_contexts(tokenizer, text.get("dataset"), ctx_len=ctx, start=start,
                           text_column=text.get("text_column", "text"), seed=text.get("seed", 0))
    left = count
    while left > 0:
        rows = [row for _, row in zip(range(min(per, left)), stream)]
        if len(rows) < min(per, left):
            raise ValueError(f"the text ended at context {start + count - left + len(rows)}, "
                             f"before the {start + count} this run needs")
        left -= len(rows)
        yield torch.stack(rows)


class InMemoryActivations:
    """A bounded sample (the statistics prefix) kept in memory, with the read interface of
    lgsae.harvest.ActivationCache (layers, scales, means, iter_shards, tokens), so
    lgsae.similarity takes either. Statistics use the kept positions only (not the sink, not a
    special token: lgsae.capture.kept_positions); `outliers` lists the kept positions whose norm
    exceeds OUTLIER_FACTOR x their layer's median, and `medians` the median norms."""

    def __init__(self, ids: torch.Tensor, acts: dict[int, torch.Tensor], ctx: int,
                 special: Sequence[int] = ()):
        self.ids, self.acts, self.ctx = ids, acts, ctx
        self.layers = sorted(acts)
        self.d_model = next(iter(acts.values())).shape[-1]
        self.n_tokens = ids.numel()
        self.keep = kept_rows(ids, special)
        self.n_stat_tokens = int(self.keep.sum())
        means, self.scales, self.medians = [], {}, {}
        at = kept_positions(ids, special).nonzero()  # (context, position), drop_sink order
        self.outliers: list[dict] = []
        for v in self.layers:  # one layer in fp64 at a time
            kept = drop_sink(acts[v], ctx)[self.keep].double()
            norms = torch.linalg.vector_norm(kept, dim=1)
            means.append(kept.mean(0))
            self.scales[v] = 1.0 / float(norms.mean())
            self.medians[v] = float(norms.median())
            self.outliers += outlier_rows(norms, self.medians[v], at, ids, v, "statistics")
        self._means = torch.stack(means)

    @classmethod
    def collect(cls, forward: Forward, batches: Iterator[torch.Tensor], ctx: int,
                special: Sequence[int] = ()) -> InMemoryActivations:
        ids, parts = [], {v: [] for v in forward.layers}
        for b in batches:
            ids.append(b)
            for v, x in forward(b).items():
                parts[v].append(x)
        return cls(torch.cat(ids), {v: torch.cat(p) for v, p in parts.items()}, ctx, special)

    def means(self) -> torch.Tensor:
        """[L, D] fp64 mean activation per layer (kept positions)."""
        return self._means

    def iter_shards(self, layers=None, verify: bool = True, skip_sink: bool = False):
        """{layer: [tokens, D]}; with `skip_sink`, the kept positions only."""
        layers = self.layers if layers is None else list(layers)
        missing = [v for v in layers if v not in self.acts]
        if missing:
            raise ValueError(f"layers {missing} are not in this sample (it has {self.layers})")
        yield {v: drop_sink(self.acts[v], self.ctx)[self.keep] if skip_sink else self.acts[v]
               for v in layers}

    def tokens(self) -> torch.Tensor:
        return self.ids


def outlier_rows(norms: torch.Tensor, median: float, at: torch.Tensor, ids: torch.Tensor,
                 layer: int, where: str) -> list[dict]:
    """The rows whose norm exceeds OUTLIER_FACTOR x `median` (`at`: [rows, 2] their context and
    position), as {where, layer, context, position, token_id, norm, ratio}."""
    out = []
    for j in torch.nonzero(norms > OUTLIER_FACTOR * median).squeeze(1).tolist():
        c, pos = (int(i) for i in at[j])
        out.append({"where": where, "layer": layer, "context": c, "position": pos,
                    "token_id": int(ids[c, pos]), "norm": round(float(norms[j]), 1),
                    "ratio": round(float(norms[j]) / median, 1)})
    return out


class StreamSource:
    """Training chunks straight from the model forward; nothing is written."""

    def __init__(self, forward: Forward, layout: Layout, tokenizer, text: dict,
                 special: Sequence[int] = ()):
        self.forward, self.layout, self.tokenizer, self.text = forward, layout, tokenizer, text
        self.special = list(special)

    def chunks(self, start: int = 0) -> Iterator[dict]:
        """{layer: [chunk tokens, D], KEEP: [chunk tokens] bool} for chunks start, start+1, ...
        (sink rows dropped; KEEP marks the rows that are not special tokens)."""
        lay = self.layout
        ids = context_batches(self.tokenizer, self.text, ctx=lay.ctx,
                              start=lay.train_start + start * lay.chunk_contexts,
                              count=lay.train_contexts - start * lay.chunk_contexts,
                              per=lay.chunk_contexts)
        for b in ids:
            out = {v: drop_sink(x, lay.ctx) for v, x in self.forward(b).items()}
            yield {**out, KEEP: kept_rows(b, self.special)}


class CacheSource:
    """The training stream harvested once to disk (lgsae.harvest, one shard per chunk), then
    read back; a second run with the same key reuses it."""

    def __init__(self, cache, special: Sequence[int] = ()):
        self.cache, self.special = cache, list(special)

    def chunks(self, start: int = 0) -> Iterator[dict]:
        """As StreamSource.chunks, read back from the cache."""
        ids = self.cache.iter_tokens(start=start)
        for shard in self.cache.iter_shards(skip_sink=True, start=start):
            yield {**shard, KEEP: kept_rows(next(ids), self.special)}


def weights_fingerprint(model) -> str:
    """sha256 over every parameter and buffer's bytes: the cache key's notion of 'this model'
    (a revision string can name a moving branch; the weights cannot lie)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        t = t.detach().contiguous().cpu()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]
