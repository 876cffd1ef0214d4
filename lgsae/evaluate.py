"""Evaluate trained SAEs on held-out contexts, as the field does (DESIGN §1).

One pass over the held-out contexts, a few at a time:
1. a clean forward keeps every needed block's output (model dtype) and the clean next-token
   distribution;
2. per layer v, two ablated forwards, shared by every method: the kept positions of block v's
   output set to zero, and to the layer's mean over the statistics prefix;
3. per (method, layer): the SAE reconstructs block v's output at the kept positions
   (reconstruction sums), and a forward with the reconstruction spliced in gives CE and KL.
Kept positions are those statistics and training use (not the sink, not a special token:
lgsae.capture.kept_positions); the others keep their clean activations in every forward.
Each ablated or spliced forward starts at block v (`Splicer.from_block`): blocks 0..v are
stand-ins that pass their input on (block v returns the given hidden state), so only the blocks
after v and the head run.

The pass returns per-context sums (`evaluate`'s tally); lgsae.stats turns them into metrics
with standard errors over contexts and paired differences.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lgsae.capture import find_blocks, kept_positions
from lgsae.sae import GroupSAE
from lgsae.sources import outlier_rows

_LOGIT_ELEMENTS = 1 << 26  # contexts per evaluation forward: logits of at most this many floats


class Splicer:
    """Forwards of `model` that start at a block. `clean` runs the whole model once and learns
    each block's output form; `from_block(ids, v, h)` then gives the logits of the model with
    block v's output replaced by h, running only the blocks after v and the head."""

    def __init__(self, model):
        self.model, self.blocks = model, find_blocks(model)
        self.forms: dict[int, int] = {}  # block -> length of its output tuple (0: a tensor)

    def _as_output(self, i: int, h: torch.Tensor):
        n = self.forms[i]
        return h if n == 0 else (h, *([None] * (n - 1)))

    @torch.no_grad()
    def clean(self, ids: torch.Tensor, layers: Sequence[int]
              ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(logits [B, T, V], {layer: block output [B, T, D]}) of the unmodified model."""
        out: dict[int, torch.Tensor] = {}
        wanted = set(layers)

        def hook(i):
            def keep(module, args, output):
                self.forms[i] = len(output) if isinstance(output, tuple) else 0
                if i in wanted:  # a copy: a later block may add to its input in place
                    out[i] = (output[0] if isinstance(output, tuple) else output).clone()
            return keep

        handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(self.blocks)]
        try:
            logits = self.model(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return logits, out

    @torch.no_grad()
    def from_block(self, ids: torch.Tensor, v: int, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] with block v's output replaced by h [B, T, D]."""
        if any(i not in self.forms for i in range(v + 1)):
            raise RuntimeError("Splicer.from_block needs one Splicer.clean forward first")

        def stand_in(i):
            def forward(*args, **kwargs):
                x = h if i == v else (args[0] if args else kwargs["hidden_states"])
                return self._as_output(i, x)
            return forward

        saved = [b.__dict__.get("forward") for b in self.blocks[:v + 1]]
        for i in range(v + 1):
            self.blocks[i].forward = stand_in(i)
        try:
            return self.model(input_ids=ids, use_cache=False).logits
        finally:
            for b, f in zip(self.blocks[:v + 1], saved):
                if f is None:
                    del b.forward
                else:  # e.g. accelerate's wrapper, set on the instance
                    b.forward = f


def _per_context(values: torch.Tensor, row_ctx: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """Sum of per-row values [rows, ...] into [n_ctx, ...] by each row's context."""
    out = values.new_zeros(n_ctx, *values.shape[1:])
    return out.index_add_(0, row_ctx, values)


def reconstruction_sums(sae: GroupSAE, x: torch.Tensor, layer: int, row_ctx: torch.Tensor,
                        n_ctx: int, centre: torch.Tensor | None = None
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor, object]:
    """Per-context sums of one SAE on rows x [N, D] of `layer` (raw), in the SAE's scaled space:
    sse, s1 (Σx, [C, D]), s2 (Σ‖x‖²), n, l0 and ev (Σ of SAELens's per-token explained variance
    1 − ‖x − x̂‖² / ‖x − x̄‖², x̄ = `centre` (raw; the statistics prefix's mean) or else these
    rows' mean); plus the firing count of every latent [M] and the forward's output."""
    with torch.no_grad():
        out = sae(x.to(sae.device), layer=layer)
    s = float(sae.scale_for(layer, 1))
    xs = x.double().to(sae.device) * s
    err = xs - out.recon.double() * s
    e2 = err.pow(2).sum(1)
    xbar = xs.mean(0) if centre is None else centre.to(xs.device, torch.float64) * s
    t2 = (xs - xbar).pow(2).sum(1)
    fired = out.top_acts > 0
    rows = {"sse": e2, "s1": xs, "s2": xs.pow(2).sum(1), "n": torch.ones_like(e2),
            "l0": fired.sum(1).double(), "ev": 1 - e2 / t2}
    sums = {k: _per_context(r.cpu(), row_ctx, n_ctx) for k, r in rows.items()}
    fires = torch.bincount(out.top_indices[fired].reshape(-1).cpu(), minlength=sae.num_latents)
    return sums, fires, out


def reconstruction_metrics(saes: dict[str, dict[int, GroupSAE]], sample
                           ) -> dict[str, dict[int, dict]]:
    """{method: {layer: {fvu, mse, explained_variance, l0}}} over the rows a cache-like sample's
    `iter_shards(skip_sink=True)` yields (an InMemoryActivations: the kept positions; an
    ActivationCache: all but the sink), without error bars (benchmarks)."""
    from lgsae.stats import layer_point_metrics

    layers = sorted({v for per in saes.values() for v in per})
    acc: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for shard in sample.iter_shards(layers, skip_sink=True):
        for method, per in saes.items():
            for v, sae in per.items():
                x = shard[v]
                sums, _, _ = reconstruction_sums(sae, x, v, torch.zeros(x.shape[0],
                                                                        dtype=torch.long), 1)
                a = acc.setdefault((method, v), {k: torch.zeros_like(t) for k, t in sums.items()})
                for k, t in sums.items():
                    a[k] += t
    out: dict[str, dict[int, dict]] = {}
    for (method, v), a in acc.items():
        m = layer_point_metrics(a, sample.d_model)
        out.setdefault(method, {})[v] = {k: m[k] for k in ("fvu", "mse", "explained_variance",
                                                          "l0")}
    return out


_T_CHUNK = 64  # positions per log-softmax slice: temporaries stay small beside the logits


def _ce_kl(logits: torch.Tensor, ids: torch.Tensor, clean: tuple | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per context [B] (fp64, CPU): Σ over next-token targets of −log p, and with `clean` =
    (log p, p) of the clean model, Σ KL(clean ‖ this) (None without)."""
    B, T = ids.shape
    ce = torch.zeros(B, dtype=torch.float64)
    kl = torch.zeros(B, dtype=torch.float64) if clean is not None else None
    for t in range(0, T - 1, _T_CHUNK):
        end = min(t + _T_CHUNK, T - 1)
        lp = F.log_softmax(_upcast(logits[:, t:end]), -1)
        ce -= lp.gather(-1, ids[:, t + 1:end + 1, None]).squeeze(-1).double().sum(1).cpu()
        if clean is not None:
            lpc, pc = clean[0][:, t:end], clean[1][:, t:end]
            term = torch.where(pc > 0, pc * (lpc - lp), torch.zeros((), device=lp.device))
            kl += term.sum(-1).double().sum(1).cpu()
    return ce, kl


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 logits are upcast; an fp64 model stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _vocab(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None else model.config.vocab_size


@torch.no_grad()
def evaluate(saes: dict[str, dict[int, GroupSAE]], model, batches: Iterable[torch.Tensor], *,
             special: Sequence[int] = (), means: dict[int, torch.Tensor] | None = None,
             medians: dict[int, float] | None = None, progress: bool = True,
             n_contexts: int | None = None) -> dict:
    """One pass over held-out id batches [B, T]; returns the tally (per-context sums):

    {"contexts": C, "ctx": T, "kept": kept positions, "targets": [C], "clean": [C] (Σ CE),
     "ablation": {v: {"zero", "mean"}},
     "sae": {method: {v: {sse, s1, s2, n, l0, ev, ce, kl: [C] (s1: [C, D]), "fires": [M]}}},
     "outliers": [...], "seconds": float}.
    `means`: {layer: [D]} for the mean ablation (the statistics prefix's); `medians`: {layer:
    median norm} for the norm-outlier guard."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    splicer = Splicer(model)
    layers = sorted({v for per in saes.values() for v in per})
    by_layer = {v: [(m, per[v]) for m, per in saes.items() if v in per] for v in layers}
    tally: dict = {"contexts": 0, "ctx": 0, "kept": 0, "targets": [], "clean": [],
                   "outliers": [],
                   "ablation": {v: {"zero": [], "mean": []} for v in layers},
                   "sae": {m: {v: {"fires": 0} for v in per} for m, per in saes.items()}}
    passes = len(layers) * (2 if means is not None else 1) + sum(map(len, by_layer.values()))
    bar = tqdm(total=None if n_contexts is None else n_contexts * passes, desc="evaluate",
               unit="fwd", disable=not progress)
    for ids_all in batches:
        per = max(1, _LOGIT_ELEMENTS // (ids_all.shape[1] * _vocab(model)))
        for b in range(0, ids_all.shape[0], per):
            ids = ids_all[b:b + per].to(device)
            C0, B = tally["contexts"], ids.shape[0]
            keep = kept_positions(ids.cpu(), special).to(device)
            at = keep.nonzero()
            row_ctx = at[:, 0].cpu()
            logits, hidden = splicer.clean(ids, layers)
            logp_clean = F.log_softmax(_upcast(logits[:, :-1]), -1)
            ce_clean = -logp_clean.gather(-1, ids[:, 1:, None]).squeeze(-1).double().sum(1).cpu()
            clean = (logp_clean, logp_clean.exp())
            del logits
            tally["clean"].append(ce_clean)
            tally["targets"].append(torch.full((B,), float(ids.shape[1] - 1), dtype=torch.float64))
            for v in layers:
                h = hidden[v]
                kh = keep.to(h.device)  # a model split over devices: block v's own
                if medians is not None:
                    norms = torch.linalg.vector_norm(h[kh].double(), dim=1).cpu()
                    for row in outlier_rows(norms, medians[v], at.cpu(), ids.cpu(), v,
                                            "held-out"):
                        tally["outliers"].append({**row, "context": row["context"] + C0})
                ablations = {"zero": torch.zeros((), dtype=h.dtype, device=h.device)}
                if means is not None:
                    ablations["mean"] = means[v].to(h.device, h.dtype)
                for name, fill in ablations.items():
                    hz = h.clone()
                    hz[kh] = fill
                    ce, _ = _ce_kl(splicer.from_block(ids, v, hz), ids)
                    tally["ablation"][v][name].append(ce)
                    bar.update(B)
                for method, sae in by_layer[v]:
                    sums, fires, out = reconstruction_sums(
                        sae, h[kh], v, row_ctx, B, None if means is None else means[v])
                    hs = h.clone()
                    hs[kh] = out.recon.to(h.device, h.dtype)
                    ce, kl = _ce_kl(splicer.from_block(ids, v, hs), ids, clean)
                    t = tally["sae"][method][v]
                    for k, val in {**sums, "ce": ce, "kl": kl}.items():
                        t.setdefault(k, []).append(val)
                    t["fires"] = t["fires"] + fires
                    bar.update(B)
            tally["contexts"] += B
            tally["ctx"], tally["kept"] = ids.shape[1], tally["kept"] + int(keep.sum())
    bar.close()
    cat = torch.cat
    tally["targets"], tally["clean"] = cat(tally["targets"]), cat(tally["clean"])
    for v, ab in tally["ablation"].items():
        tally["ablation"][v] = {k: cat(x) for k, x in ab.items() if x}
    for method, per in tally["sae"].items():
        for v, t in per.items():
            per[v] = {k: (x if k == "fires" else cat(x)) for k, x in t.items()}
    tally["seconds"] = time.perf_counter() - t0
    return tally
