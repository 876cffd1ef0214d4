"""Evaluate trained SAEs on held-out tokens: reconstruction from the held-out activations, and the
language-model cost of splicing each reconstruction into the model.

Per (method, layer): FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over all held-out tokens, MSE per element
and explained variance in the SAE's scaled space (unit mean norm), L0 (latents with a non-zero
activation per token), and, with the reconstruction replacing block l's output through a forward
hook, ΔCE% = (CE_spliced − CE_clean) / CE_clean · 100 and KL(clean ‖ spliced) per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lgsae.capture import SINK_POSITIONS, find_blocks
from lgsae.sae import GroupSAE


def reconstruction_metrics(saes: dict[str, dict[int, GroupSAE]], cache
                           ) -> dict[str, dict[int, dict]]:
    """{method: {layer: {fvu, mse, explained_variance, l0}}} from the held-out cache."""
    means = cache.means()
    acc: dict[tuple[str, int], dict[str, float]] = {}
    layers = sorted({v for per in saes.values() for v in per})
    for shard in cache.iter_shards(layers, skip_sink=True):
        for method, per in saes.items():
            for v, sae in per.items():
                x = shard[v].to(sae.device, torch.float32)
                s = sae.scale_for(v, x.shape[0]).float()
                with torch.no_grad():
                    out = sae(x, layer=v)
                err = ((x - out.recon.float()) * s).double()
                cen = ((x - means[cache.layers.index(v)].to(x.device)) * s).double()
                a = acc.setdefault((method, v), {"sse": 0.0, "sst": 0.0, "n": 0, "l0": 0.0,
                                                 "err_sum": torch.zeros_like(err[0])})
                a["sse"] += float(err.pow(2).sum())
                a["sst"] += float(cen.pow(2).sum())
                a["n"] += x.shape[0]
                a["l0"] += float((out.top_acts > 0).sum())
                a["err_sum"] += err.sum(0)
    out: dict[str, dict[int, dict]] = {}
    D = cache.d_model
    for (method, v), a in acc.items():
        n = a["n"]
        var_err = (a["sse"] - float(a["err_sum"].pow(2).sum()) / n) / n  # Σ_d Var(x_d − x̂_d)
        out.setdefault(method, {})[v] = {
            "fvu": a["sse"] / a["sst"],
            "mse": a["sse"] / (n * D),
            "explained_variance": 1 - var_err / (a["sst"] / n),
            "l0": a["l0"] / n,
        }
    return out


class _Splice:
    """Forward hook that replaces block `layer`'s output with `sae`'s reconstruction."""

    def __init__(self, block, sae: GroupSAE, layer: int):
        self.block, self.sae, self.layer, self.handle = block, sae, layer, None

    def hook(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        rest = h[:, SINK_POSITIONS:]  # the sink positions keep their activations (not trained on)
        recon = self.sae(rest.reshape(-1, h.shape[-1]), layer=self.layer).recon
        recon = torch.cat([h[:, :SINK_POSITIONS], recon.view_as(rest).to(h.dtype)], dim=1)
        return (recon, *output[1:]) if isinstance(output, tuple) else recon

    def __enter__(self):
        self.handle = self.block.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


@torch.no_grad()
def spliced_metrics(model, tokens: torch.Tensor, saes: dict[str, dict[int, GroupSAE]],
                    batch_size: int = 2, progress: bool = True) -> dict[str, dict[int, dict]]:
    """{method: {layer: {delta_ce_pct, kl, ce}}} plus the clean CE under key 'clean'."""
    device = next(model.parameters()).device
    blocks = find_blocks(model)
    sums: dict[tuple[str, int], list[float]] = {}
    clean_sum, count = 0.0, 0
    jobs = [(m, v, sae) for m, per in saes.items() for v, sae in per.items()]
    bar = tqdm(total=len(jobs) * -(-tokens.shape[0] // batch_size), desc="evaluate",
               unit="fwd", disable=not progress)
    for b in range(0, tokens.shape[0], batch_size):
        ids = tokens[b:b + batch_size].to(device)
        logp_clean = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        target = ids[:, 1:]
        clean_sum += float(-logp_clean.gather(-1, target[..., None]).sum())
        count += target.numel()
        for method, v, sae in jobs:
            with _Splice(blocks[v], sae, v):
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            logp = F.log_softmax(logits, -1)
            ce = float(-logp.gather(-1, target[..., None]).sum())
            kl = float((logp_clean.exp() * (logp_clean - logp)).sum())
            s = sums.setdefault((method, v), [0.0, 0.0])
            s[0] += ce
            s[1] += kl
            bar.update(1)
    bar.close()
    clean = clean_sum / count
    out: dict[str, dict[int, dict]] = {"clean": {"ce": clean}}
    for (method, v), (ce, kl) in sums.items():
        out.setdefault(method, {})[v] = {"ce": ce / count, "kl": kl / count,
                                         "delta_ce_pct": 100 * (ce / count - clean) / clean}
    return out


def evaluate(saes: dict[str, dict[int, GroupSAE]], cache, model,
             batch_size: int = 2, progress: bool = True) -> dict:
    """Per-layer metrics for every method, merged: {method: {layer: {...}}, 'clean_ce': float}."""
    rec = reconstruction_metrics(saes, cache)
    lm = spliced_metrics(model, cache.tokens(), saes, batch_size, progress)
    merged = {m: {v: {**rec[m][v], **lm[m][v]} for v in rec[m]} for m in rec}
    return {"per_layer": merged, "clean_ce": lm["clean"]["ce"]}
