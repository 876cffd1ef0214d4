"""Metrics with standard errors over held-out contexts, from lgsae.evaluate's tally; and how a
group SAE's features spread over its member layers.

Contexts are the sampling unit (the tokens of one context are not independent). Every metric is a
function of per-context sums, and its standard error is the delete-one jackknife over contexts:
θ₍ᵢ₎ = the metric with context i left out, SE = √((C−1)/C · Σᵢ (θ₍ᵢ₎ − θ̄)²). For a mean of
per-context values this is exactly the textbook s/√C; for a ratio of sums (FVU, loss recovered)
it is the delta-method SE. A method's mean over layers and a paired difference (method −
per-layer on the same contexts) are functions of the same sums, so they get their SE the same
way; the 95 % interval of a difference is diff ± t₀.₉₇₅,C−1 · SE.

Estimators (per layer, over the kept held-out positions):
- fvu: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² (the training loss's FVU; mean over all held-out tokens);
- explained_variance: SAELens's form, the mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄‖², with x̄
  the layer's mean over the statistics prefix (SAELens: the evaluation batch's mean; a fixed x̄
  keeps the number independent of how the held-out contexts are batched);
- mse: Σ‖x − x̂‖² / (tokens · D) in the SAE's scaled space (unit mean norm per layer);
- l0: active latents per token;
- delta_ce_pct: 100 · (CE_spliced − CE_clean) / CE_clean (the paper's ΔCE %);
- loss_recovered: (CE_zero − CE_spliced) / (CE_zero − CE_clean), zero ablation of the kept
  positions; loss_recovered_mean: the same with the layer's mean (statistics prefix) instead;
- kl: KL(clean ‖ spliced) per next-token prediction, nats.
CE is over every next-token target of a context; the sink and special positions keep their
clean activations in the spliced and ablated forwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

KEYS = ("fvu", "explained_variance", "mse", "l0", "delta_ce_pct", "loss_recovered",
        "loss_recovered_mean", "kl")
MIN_FIRES = 10  # a latent enters the spread statistics with at least this many held-out firings


def _recon(S: dict[str, torch.Tensor], D: int, sst: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"fvu": S["sse"] / sst, "mse": S["sse"] / (S["n"] * D),
            "explained_variance": S["ev"] / S["n"], "l0": S["l0"] / S["n"]}


def layer_point_metrics(S: dict[str, torch.Tensor], D: int) -> dict[str, float]:
    """fvu, mse, explained_variance, l0 from reconstruction sums over all rows (one group)."""
    sums = {k: v.sum(0) for k, v in S.items()}
    sst = sums["s2"] - sums["s1"].pow(2).sum() / sums["n"]
    return {k: float(v) for k, v in _recon(sums, D, sst).items()}


def _context_sums(t: dict, ablation: dict, clean: torch.Tensor, targets: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """[C] per-context sums of one (method, layer); sst around the mean of all contexts."""
    n, s1 = t["n"], t["s1"]
    mu = s1.sum(0) / n.sum()
    S = {"sse": t["sse"], "sst": t["s2"] - 2 * s1 @ mu + n * mu.dot(mu), "n": n, "l0": t["l0"],
         "ev": t["ev"], "ce": t["ce"], "kl": t["kl"], "clean": clean, "targets": targets,
         "zero": ablation["zero"]}
    if "mean" in ablation:
        S["mean"] = ablation["mean"]
    return S


def _metrics(S: dict[str, torch.Tensor], D: int) -> dict[str, torch.Tensor]:
    """Every metric of sums S (each tensor of one shape: totals [] or leave-one-out [C])."""
    out = _recon(S, D, S["sst"])
    out["delta_ce_pct"] = 100 * (S["ce"] - S["clean"]) / S["clean"]
    out["loss_recovered"] = (S["zero"] - S["ce"]) / (S["zero"] - S["clean"])
    if "mean" in S:
        out["loss_recovered_mean"] = (S["mean"] - S["ce"]) / (S["mean"] - S["clean"])
    out["kl"] = S["kl"] / S["targets"]
    return out


def jackknife_se(loo: torch.Tensor) -> float:
    """SE from the C leave-one-out values of a statistic (nan for fewer than 2 contexts)."""
    C = loo.numel()
    if C < 2:
        return float("nan")
    loo = loo.double()
    return math.sqrt((C - 1) / C * float((loo - loo.mean()).pow(2).sum()))


def t_interval(diff: float, se: float, contexts: int, level: float = 0.95) -> list[float]:
    """Two-sided interval diff ± t · se with contexts − 1 degrees of freedom."""
    from scipy.stats import t

    if contexts < 2 or not math.isfinite(se):
        return [float("nan"), float("nan")]
    q = float(t.ppf(0.5 + level / 2, contexts - 1))
    return [diff - q * se, diff + q * se]


def summarize_eval(tally: dict, d_model: int, last: int | None = None,
                   base: str = "per-layer") -> dict:
    """From an evaluation tally: {"per_layer": {method: {layer: {key, key_se}}},
    "means": {method: {key, key_se}} (over layers except `last`), "paired": {method: {key:
    {diff, se, ci95}}} (method − `base`, same layers, same contexts), "contexts": C}."""
    C = tally["contexts"]
    point: dict[tuple[str, int], dict] = {}
    loo: dict[tuple[str, int], dict] = {}
    per_layer: dict[str, dict[int, dict]] = {}
    for method, rows in tally["sae"].items():
        for v, t in rows.items():
            S = _context_sums(t, tally["ablation"][v], tally["clean"], tally["targets"])
            point[method, v] = _metrics({k: x.sum(0) for k, x in S.items()}, d_model)
            loo[method, v] = _metrics({k: x.sum(0) - x for k, x in S.items()}, d_model)
            per_layer.setdefault(method, {})[v] = {
                **{k: float(x) for k, x in point[method, v].items()},
                **{f"{k}_se": jackknife_se(x) for k, x in loo[method, v].items()}}

    def mean_over(method: str, layers: list[int]) -> tuple[dict, dict]:
        keys = point[method, layers[0]].keys()
        return ({k: sum(float(point[method, v][k]) for v in layers) / len(layers) for k in keys},
                {k: torch.stack([loo[method, v][k] for v in layers]).mean(0) for k in keys})

    def inner(method: str) -> list[int]:
        layers = sorted(tally["sae"][method])
        return [v for v in layers if v != last] or layers

    means, paired = {}, {}
    for method in tally["sae"]:
        p, lo = mean_over(method, inner(method))
        means[method] = {**p, **{f"{k}_se": jackknife_se(x) for k, x in lo.items()}}
    if base in tally["sae"]:
        for method in tally["sae"]:
            common = sorted(set(inner(method)) & set(inner(base)))
            if method == base or not common:
                continue
            (pa, la), (pb, lb) = mean_over(method, common), mean_over(base, common)
            paired[method] = {}
            for k in pa:
                diff, se = pa[k] - pb[k], jackknife_se(la[k] - lb[k])
                paired[method][k] = {"diff": diff, "se": se, "ci95": t_interval(diff, se, C),
                                     "layers": len(common)}
    return {"per_layer": per_layer, "means": means, "paired": paired, "contexts": C}


def held_out_dead_pct(tally: dict, method: str, layers: Sequence[int]) -> float:
    """% of an SAE's latents that never fired on the held-out tokens of any of its layers."""
    fires = sum(tally["sae"][method][v]["fires"] for v in layers)
    return 100.0 * float((fires == 0).double().mean())


def spread(counts: torch.Tensor, layers: Sequence[int], bins: int = 10) -> dict:
    """How one group SAE's latents spread over its member layers, from held-out firing counts
    [members, M] (each member layer evaluated on the same tokens). Latents with at least
    MIN_FIRES firings count: the histogram of the share of a latent's firings at its peak layer
    (1/|g| = spread evenly, 1 = one layer only), and per member layer the latents peaking there."""
    counts = counts.double()
    total = counts.sum(0)
    live = total >= MIN_FIRES
    share = counts[:, live].max(0).values / total[live]
    peak = counts[:, live].argmax(0)
    lo = 1.0 / len(layers)
    edges = torch.linspace(lo, 1.0, bins + 1)
    hist = torch.histc(share, bins=bins, min=lo, max=1.0) if share.numel() else torch.zeros(bins)
    return {"layers": list(layers), "latents_counted": int(live.sum()),
            "min_fires": MIN_FIRES,
            "peak_share_mean": float(share.mean()) if share.numel() else float("nan"),
            "one_layer_pct": 100 * float((share > 0.9).double().mean()) if share.numel()
            else float("nan"),
            "peak_share_hist": {"edges": [round(float(e), 4) for e in edges],
                                "counts": [int(c) for c in hist]},
            "peak_layer_counts": {str(v): int((peak == j).sum()) for j, v in enumerate(layers)}}


@torch.no_grad()
def mmcs(reference: torch.Tensor, other: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over `reference`'s rows [M1, D] of the best cosine similarity to a row of `other`
    [M2, D] (decoder rows; scale-free, so each SAE's own scaled space is fine)."""
    a = torch.nn.functional.normalize(reference.float(), dim=1)
    b = torch.nn.functional.normalize(other.float(), dim=1)
    best = torch.cat([(a[i:i + chunk] @ b.T).max(1).values for i in range(0, a.shape[0], chunk)])
    return float(best.double().mean())
