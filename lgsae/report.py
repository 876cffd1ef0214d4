"""metrics.json and report.md of a training run: one row per method, per-layer plots, and the
paper's Pythia-160M rows for reference."""

from __future__ import annotations

from pathlib import Path

from lgsae.io import save_with, write_atomic

# Ghilardi et al., Table 1 (Pythia-160M, L=12, Ĝ=6): mean FVU and ΔCE% over layers.
PAPER_PYTHIA = {
    "per-layer": (0.097, 5.33),
    "groups": (0.108, 6.01),
    "even": (0.114, 5.40),
    "smaller": (0.109, 6.09),
    "single": (0.154, 9.57),
}
_KEYS = ("fvu", "delta_ce_pct", "l0", "dead_pct", "kl", "mse", "explained_variance")


def summarize(stats: dict[int, dict], specs, results: dict, groups: dict, forward_seconds: float,
              eval_tokens: int, partition: list[list[int]], tokens_train: int,
              dead_window: int) -> dict:
    """The metrics.json dict: per method the means over layers excluding the last one.
    `stats`: {index in specs: {seconds, flops, dead_pct}} (Trainer.sae_stats, of every rank)."""
    last = max(groups["layers"])
    methods: dict[str, dict] = {}
    for i, spec in enumerate(specs):
        m = methods.setdefault(spec.method, {"n_saes": 0, "train_seconds": 0.0, "flops": 0.0,
                                             "saes": {}, "per_layer": {}})
        m["n_saes"] += 1
        m["train_seconds"] += stats[i]["seconds"]
        m["flops"] += stats[i]["flops"]
        m["saes"][spec.name] = {"layers": spec.layers, "num_latents": spec.num_latents,
                                "dead_pct": stats[i]["dead_pct"]}
        for v in spec.layers:
            m["per_layer"][str(v)] = {**results["per_layer"][spec.method][v],
                                      "dead_pct": stats[i]["dead_pct"], "sae": spec.name}
    for m in methods.values():
        inner = [row for v, row in m["per_layer"].items() if int(v) != last] or \
            list(m["per_layer"].values())
        for key in _KEYS:
            m[key] = sum(row[key] for row in inner) / len(inner)
        m["forward_seconds"] = forward_seconds
    return {"model": groups["model"], "tokens_train": tokens_train, "tokens_eval": eval_tokens,
            "chosen_G": groups["chosen_G"], "trained_G": len(partition),
            "clean_ce": results["clean_ce"], "dead_window_tokens": dead_window,
            "methods": methods}


def write_report(out: Path, metrics: dict, groups: dict) -> Path:
    methods = metrics["methods"]
    base = methods.get("per-layer")
    rows = ["| method | #SAEs | FVU | ΔCE % | L0 | dead % | KL | SAE-training s | FLOPs | "
            "speedup vs per-layer |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        speed = f"{base['train_seconds'] / m['train_seconds']:.2f}x" if base else "n/a"
        rows.append(f"| {name} | {m['n_saes']} | {m['fvu']:.4f} | {m['delta_ce_pct']:.2f} | "
                    f"{m['l0']:.1f} | {m['dead_pct']:.1f} | {m['kl']:.4f} | "
                    f"{m['train_seconds']:.1f} | {m['flops']:.3g} | {speed} |")
    paper = ["| method | FVU | ΔCE % |", "|---|---|---|"] + [
        f"| {k} | {fvu:.3f} | {ce:.2f} |" for k, (fvu, ce) in PAPER_PYTHIA.items()]
    trained = [s["layers"] for s in methods["groups"]["saes"].values()]
    groups_line = " ".join(f"[{g[0]}..{g[-1]}]" if len(g) > 1 else f"[{g[0]}]" for g in trained)
    plot = _plot_per_layer(out, metrics)
    forward_s = next(iter(methods.values()))["forward_seconds"]
    text = f"""# lgsae run: {metrics['model']}

## Results

Held-out evaluation on {metrics['tokens_eval']:,} tokens after one pass over
{metrics['tokens_train']:,} training tokens{_source(metrics)}; means over layers excluding the
last; clean CE
{metrics['clean_ce']:.3f} nats/token. Ĝ = {metrics['chosen_G']} by the AMAD rule
(threshold {groups['threshold']}); trained groups: {groups_line}.

{chr(10).join(rows)}

FVU = ‖x − x̂‖² / ‖x − mean‖²; ΔCE % = (CE with layer l replaced by its reconstruction − clean CE)
/ clean CE; L0 = active latents per token; dead % = latents with no firing in the last
{metrics['dead_window_tokens']:,} training tokens; SAE-training seconds exclude the shared
model forward ({forward_s:.0f} s: statistics prefix and training stream, every layer at once);
FLOPs count each SAE's training work (encoder GEMM plus the sparse decode and backward).

## Per layer

![per-layer FVU and ΔCE]({plot.name})

## Layer groups

![layer distances](distances.png)

## For reference: the paper's Pythia-160M results (Ghilardi et al., Table 1; 1B tokens per SAE)

{chr(10).join(paper)}
"""
    path = out / "report.md"
    return write_atomic(path, text)


def _source(metrics: dict) -> str:
    """Where the training tokens came from, for the report's first sentence."""
    if "source" not in metrics:
        return ""
    how = "streamed from the model" if metrics["source"] == "stream" else "read from the cache"
    return (f" ({how} through a {metrics['buffer_tokens']:,}-token shuffle buffer; groups and"
            f" scales from a separate {metrics['stat_tokens']:,}-token prefix)")


def _plot_per_layer(out: Path, metrics: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, m in metrics["methods"].items():
        layers = sorted(int(v) for v in m["per_layer"])
        for ax, key in zip(axes, ("fvu", "delta_ce_pct")):
            ax.plot(layers, [m["per_layer"][str(v)][key] for v in layers], marker="o", ms=3,
                    label=name)
    for ax, label in zip(axes, ("FVU (held out)", "ΔCE % (held out)")):
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = save_with(out / "per_layer.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
