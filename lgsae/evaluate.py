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
                if i in wanted:
                    out[i] = output[0] if isinstance(output, tuple) else output
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
                        n_ctx: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, object]:
    """Per-context sums of one SAE on rows x [N, D] of `layer` (raw), in the SAE's scaled space:
    sse, s1 (Σx, [C, D]), s2 (Σ‖x‖²), n, l0 and ev (Σ of SAELens's per-token explained variance
    1 − ‖x − x̂‖² / ‖x − mean(x)‖², the mean over these rows); plus the firing count of every
    latent [M] and the forward's output."""
    with torch.no_grad():
        out = sae(x.to(sae.device), layer=layer)
    s = float(sae.scale_for(layer, 1))
    xs = x.double().to(sae.device) * s
    err = xs - out.recon.double() * s
    e2 = err.pow(2).sum(1)
    t2 = (xs - xs.mean(0)).pow(2).sum(1)
    fired = out.top_acts > 0
    rows = {"sse": e2, "s1": xs, "s2": xs.pow(2).sum(1), "n": torch.ones_like(e2),
            "l0": fired.sum(1).double(), "ev": 1 - e2 / t2}
    sums = {k: _per_context(r.cpu(), row_ctx, n_ctx) for k, r in rows.items()}
    fires = torch.bincount(out.top_indices[fired].reshape(-1).cpu(), minlength=sae.num_latents)
    return sums, fires, out


def reconstruction_metrics(saes: dict[str, dict[int, GroupSAE]], sample
                           ) -> dict[str, dict[int, dict]]:
    """{method: {layer: {fvu, mse, explained_variance, l0}}} over all rows of a cache-like
    sample's kept positions (`iter_shards(skip_sink=True)`), without error bars (benchmarks)."""
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


def _ce_per_context(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over next-token targets of −log p, log p [B, T-1, V]) per context."""
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)
    return ce.double().cpu(), logp


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
        per = max(1, _LOGIT_ELEMENTS // (ids_all.shape[1] * model.config.vocab_size))
        for b in range(0, ids_all.shape[0], per):
            ids = ids_all[b:b + per].to(device)
            C0, B = tally["contexts"], ids.shape[0]
            keep = kept_positions(ids.cpu(), special).to(device)
            at = keep.nonzero()
            row_ctx = at[:, 0].cpu()
            logits, hidden = splicer.clean(ids, layers)
            ce_clean, logp_clean = _ce_per_context(logits, ids)
            del logits
            p_clean = logp_clean.exp()
            tally["clean"].append(ce_clean)
            tally["targets"].append(torch.full((B,), float(ids.shape[1] - 1), dtype=torch.float64))
            for v in layers:
                h = hidden[v]
                if medians is not None:
                    norms = torch.linalg.vector_norm(h[keep].double(), dim=1).cpu()
                    for row in outlier_rows(norms, medians[v], at.cpu(), ids.cpu(), v,
                                            "held-out"):
                        tally["outliers"].append({**row, "context": row["context"] + C0})
                ablations = {"zero": torch.zeros((), dtype=h.dtype, device=device)}
                if means is not None:
                    ablations["mean"] = means[v].to(device, h.dtype)
                for name, fill in ablations.items():
                    hz = h.clone()
                    hz[keep] = fill
                    ce, _ = _ce_per_context(splicer.from_block(ids, v, hz), ids)
                    tally["ablation"][v][name].append(ce)
                    bar.update(B)
                for method, sae in by_layer[v]:
                    sums, fires, out = reconstruction_sums(sae, h[keep], v, row_ctx, B)
                    hs = h.clone()
                    hs[keep] = out.recon.to(device, h.dtype)
                    ce, logp = _ce_per_context(splicer.from_block(ids, v, hs), ids)
                    kl = (p_clean * (logp_clean - logp)).sum(-1).sum(1).double().cpu()
                    del logp
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
