"""Cross-context shuffle buffer: batches that mix many documents, resumable from a step number.

Llama Scope's scheme (fill, train, refill when half consumed, shuffle on refill), with the
survivors fixed so that a token lives in the buffer for at most two refills: the buffer holds two
chunks of the training stream (`--buffer-tokens` in all). Each chunk c is permuted once (seeded by
c); the first half of that permutation is consumed in phase c, the rest in phase c + 1. Phase p
thus draws, in a fresh seeded order, from chunks p - 1 and p: half the buffer is consumed, then
chunk p - 1 is dropped and chunk p + 1 loaded. Every token is used exactly once per pass, and a
batch mixes the contexts of a whole buffer.

Why not Llama Scope's random survivors: there a token can stay for any number of refills, so
rebuilding the buffer after a crash means replaying the stream from the start (or saving the
buffer, gigabytes). Here the state at step s is a pure function of (seed, s, chunk sizes):
`batches(start_step=s)` re-runs the forward for at most the two chunks of s's phase, one buffer.
Phases are cut at batch boundaries (chunk c gives phase c about half its tokens, so that the
phase ends on a whole batch; a chunk holds at least two batches), so no batch spans two phases.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lgsae.sources import Layout


def _perm(n: int, seed: int, kind: int, index: int) -> torch.Tensor:
    """A permutation of n fixed by (seed, kind, index): kind 0 = a chunk's, 1 = a phase's."""
    mixed = ((seed * 1_000_003 + kind) * 1_000_033 + index) % (2**63 - 1)  # any seed fits
    return torch.randperm(n, generator=torch.Generator().manual_seed(mixed))


class ShuffleBuffer:
    """Batches {layer: [batch, D]} (and the source's KEEP mask, [batch] bool, when it gives one)
    from a source's chunks (see the module docstring)."""

    def __init__(self, source, layout: Layout, batch: int, seed: int,
                 steps: int | None = None):
        self.source, self.layout, self.batch, self.seed = source, layout, batch, seed
        n = [layout.chunk_tokens(c) for c in range(layout.n_chunks)]
        # tokens of chunk c consumed in phase c: about half, so that the phase ends on a batch
        # boundary (no batch straddles two phases: resuming at any step needs two chunks)
        self.first, before = [], 0
        for k in n:
            end = -(-(before + k // 2) // batch) * batch
            self.first.append(min(max(end - before, 0), k))
            before += k
        # phase p: the second half of chunk p-1 and the first half of chunk p
        self.phase_sizes = [(n[p - 1] - self.first[p - 1] if p else 0)
                            + (self.first[p] if p < len(n) else 0) for p in range(len(n) + 1)]
        self.total_steps = sum(n) // batch if steps is None else min(steps, sum(n) // batch)
        self.chunks_loaded = 0  # chunks fetched from the source (tests count resume work)

    def _phase_order(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chunk id, row) of every token of phase p, in the order it is consumed."""
        cid, rows = [], []
        if p > 0:
            perm = _perm(self.layout.chunk_tokens(p - 1), self.seed, 0, p - 1)
            rows.append(perm[self.first[p - 1]:])
            cid.append(torch.full((rows[-1].numel(),), p - 1))
        if p < self.layout.n_chunks:
            perm = _perm(self.layout.chunk_tokens(p), self.seed, 0, p)
            rows.append(perm[:self.first[p]])
            cid.append(torch.full((rows[-1].numel(),), p))
        cid_t, rows_t = torch.cat(cid), torch.cat(rows)
        order = _perm(cid_t.numel(), self.seed, 1, p)
        return cid_t[order], rows_t[order]

    def batches(self, start_step: int = 0) -> Iterator[dict[int, torch.Tensor]]:
        """Batches start_step, start_step + 1, ... to the end of the pass (the last partial batch
        is dropped)."""
        if start_step >= self.total_steps:
            return
        pos, p = start_step * self.batch, 0
        while pos >= self.phase_sizes[p]:  # find the phase holding the first token wanted
            pos -= self.phase_sizes[p]
            p += 1
        chunks = self.source.chunks(max(p - 1, 0))
        held: dict[int, dict[int, torch.Tensor]] = {}
        pending: list[dict[int, torch.Tensor]] = []
        have, step = 0, start_step
        for phase in range(p, len(self.phase_sizes)):
            held.pop(phase - 2, None)
            for c in range(max(phase - 1, 0), min(phase + 1, self.layout.n_chunks)):
                if c not in held:
                    held[c] = next(chunks, None)
                    got = None if held[c] is None else len(next(iter(held[c].values())))
                    if got != self.layout.chunk_tokens(c):
                        raise ValueError(f"the activation source gave {got} tokens for chunk {c}"
                                         f", the layout expects {self.layout.chunk_tokens(c)}")
                    self.chunks_loaded += 1
            cid, rows = self._phase_order(phase)
            cid, rows = cid[pos:], rows[pos:]
            pos = 0
            while cid.numel():
                take = min(self.batch - have, cid.numel())
                pending.append(_gather(held, cid[:take], rows[:take]))
                have += take
                cid, rows = cid[take:], rows[take:]
                if have == self.batch:
                    yield _concat(pending)
                    pending, have, step = [], 0, step + 1
                    if step >= self.total_steps:
                        return


def _gather(held: dict[int, dict[int, torch.Tensor]], cid: torch.Tensor, rows: torch.Tensor
            ) -> dict[int, torch.Tensor]:
    keys = next(iter(held.values())).keys()  # the layers and the KEEP mask
    out = {}
    for v in keys:
        ref = next(iter(held.values()))[v]
        x = torch.empty(cid.numel(), *ref.shape[1:], dtype=ref.dtype)
        for c in cid.unique().tolist():
            sel = cid == c
            x[sel] = held[c][v][rows[sel]]
        out[v] = x
    return out


def _concat(parts: list[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    return {v: torch.cat([p[v] for p in parts]) for v in parts[0]}
