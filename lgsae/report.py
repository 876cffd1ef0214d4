"""metrics.json and report.md of a training run: one row per method with every metric ± its
standard error over held-out contexts, paired differences against per-layer SAEs, per-layer
plots, the feature spread of multi-layer SAEs, and the paper's Pythia-160M rows for reference."""

from __future__ import annotations

import math
from pathlib import Path

from lgsae.capture import OUTLIER_FACTOR
from lgsae.io import save_with, write_atomic
from lgsae.stats import MIN_FIRES

# Ghilardi et al., Pythia-160M (L=12, Ĝ=6, 1B tokens per SAE), means over layers 0-10 unless
# noted: (FVU as SAELens's 1 − explained variance, ΔCE %, where the numbers come from; DESIGN §1).
PAPER_PYTHIA = [
    ("per-layer", 0.097, 5.33, "recount from the authors' CSVs (the paper plots it)"),
    ("groups", 0.108, 6.01, "paper Table 1"),
    ("even", 0.114, 5.40, "paper Table 1"),
    ("smaller", 0.115, 7.37, "paper Table 1 (mean over all 12 layers, the last included)"),
    ("smaller", 0.109, 6.09, "recount from the authors' CSVs, layers 0-10"),
    ("single", 0.154, 9.57, "recount from the authors' CSVs (the paper plots it)"),
]
# column header (with the estimator), metrics.json key, format
COLUMNS = [
    ("FVU Σ‖x−x̂‖²/Σ‖x−x̄‖²", "fvu", "{:.4f}"),
    ("EV (SAELens, per-token mean)", "explained_variance", "{:.4f}"),
    ("MSE/elem (scaled)", "mse", "{:.3g}"),
    ("L0", "l0", "{:.1f}"),
    ("loss recovered, zero-abl.", "loss_recovered", "{:.4f}"),
    ("loss recovered, mean-abl.", "loss_recovered_mean", "{:.4f}"),
    ("ΔCE % (paper)", "delta_ce_pct", "{:.2f}"),
    ("KL nats/token", "kl", "{:.4f}"),
]


def summarize(stats: dict[int, dict], specs, ev: dict, tally: dict, groups: dict,
              forward_seconds: float, partition: list[list[int]], tokens_train: int,
              dead_window: int, spread: dict | None = None, outliers: list[dict] | None = None,
              special: list[int] | None = None) -> dict:
    """The metrics.json dict. `stats`: {index in specs: {seconds, flops, dead_pct,
    dead_window}} (Trainer.sae_stats, of every rank); `ev`: lgsae.stats.summarize_eval."""
    from lgsae.stats import held_out_dead_pct

    last = max(groups["layers"])
    methods: dict[str, dict] = {}
    for i, spec in enumerate(specs):
        m = methods.setdefault(spec.method, {"n_saes": 0, "train_seconds": 0.0, "flops": 0.0,
                                             "saes": {}, "per_layer": {}})
        m["n_saes"] += 1
        m["train_seconds"] += stats[i]["seconds"]
        m["flops"] += stats[i]["flops"]
        dead = held_out_dead_pct(tally, spec.method, spec.layers)
        m["saes"][spec.name] = {"layers": spec.layers, "num_latents": spec.num_latents,
                                "dead_pct": dead, "dead_pct_train": stats[i]["dead_pct"],
                                "dead_window_tokens": stats[i].get("dead_window")}
        for v in spec.layers:
            m["per_layer"][str(v)] = {**ev["per_layer"][spec.method][v], "dead_pct": dead,
                                      "dead_pct_train": stats[i]["dead_pct"], "sae": spec.name}
    for name, m in methods.items():
        m.update(ev["means"][name])
        inner = [row for v, row in m["per_layer"].items() if int(v) != last] or \
            list(m["per_layer"].values())
        for key in ("dead_pct", "dead_pct_train"):
            m[key] = sum(row[key] for row in inner) / len(inner)
        m["forward_seconds"] = forward_seconds
    n_ctx = tally["contexts"]
    return {"model": groups["model"], "tokens_train": tokens_train,
            "tokens_eval": n_ctx * tally["ctx"],
            "eval": {"contexts": n_ctx, "tokens_kept": tally["kept"],
                     "seconds": tally["seconds"], "excluded_token_ids": special or [],
                     "se": "delete-one jackknife over held-out contexts",
                     "ci": "paired, t with contexts-1 degrees of freedom, 95 %"},
            "chosen_G": groups["chosen_G"], "trained_G": len(partition),
            "clean_ce": float(tally["clean"].sum() / tally["targets"].sum()),
            "dead_window_tokens": dead_window, "methods": methods, "paired": ev["paired"],
            "spread": spread or {},
            "outliers": {"factor": OUTLIER_FACTOR, "count": len(outliers or []),
                         "rows": (outliers or [])[:50]}}


def _pm(m: dict, key: str, fmt: str) -> str:
    if key not in m:
        return "n/a"
    se = m.get(f"{key}_se", float("nan"))
    return fmt.format(m[key]) + ("" if not math.isfinite(se) else " ± " + fmt.format(se))


def write_report(out: Path, metrics: dict, groups: dict) -> Path:
    methods = metrics["methods"]
    base = methods.get("per-layer")
    head = ["method", "#SAEs", *(c[0] for c in COLUMNS), "dead % held-out",
            "dead % train window", "SAE-training s", "FLOPs", "speedup vs per-layer"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        speed = f"{base['train_seconds'] / m['train_seconds']:.2f}x" if base else "n/a"
        cells = [name, str(m["n_saes"]), *(_pm(m, key, fmt) for _, key, fmt in COLUMNS),
                 f"{m['dead_pct']:.1f}", f"{m['dead_pct_train']:.1f}",
                 f"{m['train_seconds']:.1f}", f"{m['flops']:.3g}", speed]
        rows.append("| " + " | ".join(cells) + " |")
    paired = _paired_table(metrics.get("paired", {}), "per-layer")
    for name, ms in metrics.get("milestones", {}).items():
        why = (", equal compute: the per-layer SAEs have cost what the group SAEs cost over the "
               "whole run" if ms["equal_compute"] else "")
        paired += ["", f"### Paired differences against per-layer SAEs after {ms['tokens']:,} "
                   f"tokens ({name}{why})", "",
                   *_paired_table({k: v for k, v in ms["paired"].items()
                                   if "@" not in k and k != "per-layer"}, name)]
    for base, table in metrics.get("paired_vs", {}).items():
        keep = {k: v for k, v in table.items() if "@" not in k and (
            base != "groups" or k.startswith("groups+"))}
        what = "smaller per-layer SAEs (equal width in all)" if base == "smaller" else \
            "the plain group SAEs (per-member-layer options)"
        paired += ["", f"### Paired differences against {what}", "",
                   *_paired_table(keep, base)]
    paper = ["| method | FVU (1 − EV) | ΔCE % | source |", "|---|---|---|---|"] + [
        f"| {k} | {fvu:.3f} | {ce:.2f} | {src} |" for k, fvu, ce, src in PAPER_PYTHIA]
    trained = [s["layers"] for s in methods["groups"]["saes"].values()] \
        if "groups" in methods else []
    groups_line = " ".join(f"[{g[0]}..{g[-1]}]" if len(g) > 1 else f"[{g[0]}]" for g in trained)
    plot = _plot_per_layer(out, metrics)
    variants = [m for m in methods if m.startswith("groups+")]
    extra_plot = ""
    if variants:  # the ablation: the variants against the plain groups, per-layer and smaller
        chosen = [m for m in ("groups", *variants, "per-layer", "smaller") if m in methods]
        p = _plot_per_layer(out, metrics, chosen, "per_layer_variants.png")
        extra_plot = f"\n![the group variants per layer, against per-layer and smaller]({p.name})\n"
    forward_s = next(iter(methods.values()))["forward_seconds"]
    ev = metrics["eval"]
    text = f"""# lgsae run: {metrics['model']}

## Results

Held-out evaluation on {ev['contexts']} contexts ({metrics['tokens_eval']:,} tokens, of which
{ev['tokens_kept']:,} kept positions are reconstructed and spliced) after one pass over
{metrics['tokens_train']:,} training tokens{_source(metrics)}; means over layers excluding the
last; clean CE {metrics['clean_ce']:.3f} nats/token. Ĝ = {metrics['chosen_G']} by the AMAD rule
(threshold {groups['threshold']}); trained groups: {groups_line}.

{chr(10).join(rows)}

± is the standard error over the {ev['contexts']} held-out contexts (delete-one jackknife).
Kept positions: not the first of a context (the attention sink) and not a special token
(ids {ev['excluded_token_ids']}); the others keep their clean activations. FVU = Σ‖x − x̂‖² /
Σ‖x − x̄‖² over all kept held-out tokens; EV = SAELens's explained variance, the mean over tokens
of 1 − ‖x − x̂‖² / ‖x − x̄‖² (x̄ here: the statistics prefix's mean); MSE per element in the
SAE's scaled space (unit mean norm);
loss recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean), the layer's kept positions
zero-ablated or set to its mean over the statistics prefix; ΔCE % = (CE_spliced − CE_clean) /
CE_clean; KL(clean ‖ spliced) per next-token prediction. Dead % held-out: latents that never fire
on the held-out tokens; dead % train window: no firing in the last {metrics['dead_window_tokens']:,}
× |g| training tokens (|g| = the SAE's number of layers, so a latent is judged on as many tokens
of each layer as a per-layer SAE). SAE-training seconds exclude the shared model forward
({forward_s:.0f} s: statistics prefix and training stream, every layer at once); FLOPs count each
SAE's training work; speedup vs per-layer = the per-layer SAEs' training seconds over this
method's (wall time on this machine, not the FLOPs ratio). Evaluation: {ev['seconds']:.0f} s.

### Paired differences against per-layer SAEs (same contexts, 95 % interval)

{chr(10).join(paired)}

## Per layer

![per-layer FVU and loss recovered]({plot.name})
{extra_plot}{_spread_section(out, metrics)}{_outlier_section(metrics)}{_browser_section(metrics)}
## Layer groups

![layer distances](distances.png)

## For reference: the paper's Pythia-160M results (Ghilardi et al.; 1B tokens per SAE)

Not comparable in absolute terms (another model, 10,000x the tokens); each number is labelled
with where it comes from.

{chr(10).join(paper)}
"""
    path = out / "report.md"
    return write_atomic(path, text)


def _paired_table(paired: dict, base: str) -> list[str]:
    """Markdown rows: each method − `base`, difference [95 % interval] per column."""
    rows = [f"| method − {base} | " + " | ".join(c[0] for c in COLUMNS[:1] + COLUMNS[4:])
            + " |", "|" + "---|" * (1 + len(COLUMNS) - 3)]
    for name, p in paired.items():
        cells = []
        for _, key, fmt in COLUMNS[:1] + COLUMNS[4:]:
            if key not in p:
                cells.append("n/a")
                continue
            d = p[key]
            lo, hi = d["ci95"]
            cells.append(f"{fmt.format(d['diff'])} [{fmt.format(lo)}, {fmt.format(hi)}]")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def _browser_section(metrics: dict) -> str:
    site = metrics.get("browser")
    if not site:
        return ""
    ex = site["examples"]
    pics = "" if not ex else f"""
Three latents of {ex[0]['sae']}, chosen by how their held-out firings spread over its member
layers (most even, most concentrated on one layer, median); each with its top contexts, the
firing token in [brackets]:

![three example latents](latents.png)
"""
    return f"""
## Latent browser

[browser/index.html](browser/index.html) shows every latent of every SAE: its firing frequency,
mean activation and share of firings per member layer, its top and random activations on
{site['tokens']:,} held-out tokens grouped by layer, and its logit lens; links like
`index.html#groups/L02-L08/17` point at one latent. It opens from the file system
({site['bytes'] / 1e6:.1f} MB, built in {site['seconds']:.0f} s; rebuild with
`python -m lgsae.browse RUN --tokens N`).
{pics}"""


def _source(metrics: dict) -> str:
    """Where the training tokens came from, for the report's first sentence."""
    if "source" not in metrics:
        return ""
    how = "streamed from the model" if metrics["source"] == "stream" else "read from the cache"
    return (f" ({how} through a {metrics['buffer_tokens']:,}-token shuffle buffer; groups and"
            f" scales from a separate {metrics['stat_tokens']:,}-token prefix)")


def _spread_section(out: Path, metrics: dict) -> str:
    spread = metrics.get("spread") or {}
    if not spread:
        return ""
    _plot_spread(out, spread)
    rows = ["| SAE | layers | latents counted | mean share at peak layer | % on one layer (>90 %) "
            "| MMCS vs per-layer (mean) |", "|---|---|---|---|---|---|"]
    for name, s in spread.items():
        mm = s.get("mmcs") or {}
        mmcs = f"{sum(mm.values()) / len(mm):.3f}" if mm else "n/a"
        rows.append(f"| {name} | {s['layers'][0]}..{s['layers'][-1]} | {s['latents_counted']} | "
                    f"{s['peak_share_mean']:.3f} | {s['one_layer_pct']:.1f} | {mmcs} |")
    return f"""
## How multi-layer SAEs' features spread over their layers

For each latent with at least {MIN_FIRES} firings on the held-out tokens (every member layer sees
the same tokens): the share of its firings at its peak layer (1/|g| = spread evenly, 1 = one
layer only), the number of latents peaking at each layer, and MMCS: for each member layer, the
mean over the per-layer SAE's decoder rows of the best cosine similarity to the group SAE's rows.

{chr(10).join(rows)}

![feature spread](spread.png)
"""


def _outlier_section(metrics: dict) -> str:
    o = metrics.get("outliers") or {}
    if not o.get("count"):
        return (f"\nNo kept position's norm exceeded {OUTLIER_FACTOR:.0f}x its layer's median "
                "(statistics prefix and held-out set).\n")
    rows = ["| where | layer | context | position | token | norm | × median |",
            "|---|---|---|---|---|---|---|"]
    for r in o["rows"][:10]:
        rows.append(f"| {r['where']} | {r['layer']} | {r['context']} | {r['position']} | "
                    f"{r.get('token', r['token_id'])!r} ({r['token_id']}) | {r['norm']:,.0f} | "
                    f"{r['ratio']:.0f} |")
    return f"""
## Massive-norm positions

{o['count']} kept position(s) (not the sink, not a special token) have a norm over
{o['factor']:.0f}x their layer's median; they stay in the statistics and metrics. First ones:

{chr(10).join(rows)}
"""


def _plot_per_layer(out: Path, metrics: dict, methods: list[str] | None = None,
                    name: str = "per_layer.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("fvu", "FVU (held out)"), ("loss_recovered", "loss recovered, zero-abl."),
            ("delta_ce_pct", "ΔCE % (held out)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for method in methods or list(metrics["methods"]):
        m = metrics["methods"][method]
        layers = sorted(int(v) for v in m["per_layer"])
        for ax, (key, _) in zip(axes, keys):
            y = [m["per_layer"][str(v)][key] for v in layers]
            se = [m["per_layer"][str(v)].get(f"{key}_se", 0.0) for v in layers]
            ax.errorbar(layers, y, yerr=[0 if not math.isfinite(e) else e for e in se],
                        marker="o", ms=3, capsize=2, label=method)
    for ax, (_, label) in zip(axes, keys):
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = save_with(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _plot_spread(out: Path, spread: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, s in spread.items():
        h = s["peak_share_hist"]
        total = max(sum(h["counts"]), 1)
        mids = [(a + b) / 2 for a, b in zip(h["edges"][:-1], h["edges"][1:])]
        axes[0].plot(mids, [c / total for c in h["counts"]], marker="o", ms=3, label=name)
        layers = [int(v) for v in s["peak_layer_counts"]]
        axes[1].bar(layers, list(s["peak_layer_counts"].values()), label=name)
        if s.get("mmcs"):
            axes[2].plot([int(v) for v in s["mmcs"]], list(s["mmcs"].values()), marker="o", ms=3,
                         label=name)
    axes[0].set_xlabel("share of a latent's firings at its peak layer")
    axes[0].set_ylabel("fraction of latents")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("latents peaking at this layer")
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("MMCS per-layer SAE vs group SAE")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = save_with(out / "spread.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
