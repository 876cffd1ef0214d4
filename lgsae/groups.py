"""Layer groups: complete-linkage clustering of the layer distance matrix and the AMAD rule.

Ghilardi et al. (arXiv 2410.21508): cluster layers agglomeratively with complete linkage (cluster
distance = the largest pairwise distance) on the precomputed L×L angular-distance matrix, cut at G
groups; AMAD(G) = mean over groups of the largest within-group distance; Ĝ = the smallest G with
AMAD(G) < threshold (0.2). The last layer is kept out of the clustering (it gets its own SAE) by
default. Run `python -m lgsae.groups` for harvest -> similarity -> groups on the offline default.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from lgsae.io import save_with, write_json

Groups = list[list[int]]


def _sub(dist: np.ndarray, all_layers: list[int], layers: list[int]) -> np.ndarray:
    idx = [all_layers.index(v) for v in layers]
    return dist[np.ix_(idx, idx)]


def complete_linkage(dist: np.ndarray) -> np.ndarray:
    """scipy's linkage matrix for complete linkage on a precomputed distance matrix (not on its
    rows as feature vectors, which is what the authors' code did)."""
    return linkage(squareform(dist, checks=False), method="complete")


def _canonical(groups) -> Groups:
    return sorted(sorted(int(v) for v in g) for g in groups)


def partition_from_linkage(Z: np.ndarray, layers: list[int], G: int) -> Groups:
    labels = cut_tree(Z, n_clusters=G).ravel()
    return _canonical([[v for v, c in zip(layers, labels) if c == k] for k in set(labels)])


def contiguous_partitions(dist: np.ndarray, layers: list[int]) -> dict[int, Groups]:
    """Complete linkage restricted to merging neighbouring groups: every G yields runs of
    adjacent layers."""
    groups = [[i] for i in range(len(layers))]
    out = {len(groups): [[layers[i] for i in g] for g in groups]}
    while len(groups) > 1:
        costs = [dist[np.ix_(a + b, a + b)].max() for a, b in zip(groups, groups[1:])]
        j = int(np.argmin(costs))
        groups[j:j + 2] = [groups[j] + groups[j + 1]]
        out[len(groups)] = [[layers[i] for i in g] for g in groups]
    return out


def amad(dist: np.ndarray, layers: list[int], groups: Groups) -> float:
    """Mean over groups of the largest distance between two members (0 for a singleton)."""
    return float(np.mean([_sub(dist, layers, g).max() for g in groups]))


def is_contiguous(groups: Groups, layers: list[int]) -> bool:
    """Every group is a run of neighbouring entries of `layers`."""
    pos = {v: i for i, v in enumerate(layers)}
    return all(max(pos[v] for v in g) - min(pos[v] for v in g) + 1 == len(g) for g in groups)


def even_partition(layers: list[int], G: int) -> Groups:
    """G runs of adjacent layers of (nearly) equal size: the paper's evenly spaced baseline."""
    return [list(map(int, c)) for c in np.array_split(np.array(layers), G)]


def compute_groups(dist: torch.Tensor | np.ndarray, layers: list[int], *, threshold: float = 0.2,
                   exclude_last: bool = True, contiguous: bool = False) -> dict:
    """Partitions for every G, AMAD, Ĝ and the even baseline, as the groups.json dict (without
    model/tokens). `layers` names the rows of `dist`."""
    dist = np.asarray(dist, dtype=np.float64)
    if not 0 < threshold:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if dist.shape != (len(layers), len(layers)):
        raise ValueError(f"distance matrix {dist.shape} does not match {len(layers)} layers")
    grouped = layers[:-1] if exclude_last and len(layers) > 1 else list(layers)
    sub = _sub(dist, layers, grouped)
    if contiguous:
        parts = contiguous_partitions(sub, grouped)
    else:
        Z = complete_linkage(sub) if len(grouped) > 1 else None
        parts = {G: (partition_from_linkage(Z, grouped, G) if Z is not None else [grouped])
                 for G in range(1, len(grouped) + 1)}
    partitions = {
        str(G): {"groups": g, "amad": amad(dist, layers, g),
                 "contiguous": is_contiguous(g, grouped)}
        for G, g in sorted(parts.items())
    }
    chosen = min(int(G) for G, p in partitions.items() if p["amad"] < threshold)
    even = even_partition(grouped, chosen)
    return {
        "layers": list(layers),
        "grouped_layers": grouped,
        "separate_layers": [v for v in layers if v not in grouped],
        "distances": dist.tolist(),
        "threshold": threshold,
        "linkage": "complete",
        "mode": "contiguous" if contiguous else "unconstrained",
        "chosen_G": chosen,
        "partitions": partitions,
        "even": {"groups": even, "amad": amad(dist, layers, even),
                 "contiguous": is_contiguous(even, grouped)},
    }


def format_table(result: dict) -> str:
    lines = [f"{'G':>3}  {'AMAD':>6}  contig  groups"]
    for G, p in result["partitions"].items():
        mark = "  <- chosen" if int(G) == result["chosen_G"] else ""
        groups = " ".join(f"[{g[0]}]" if len(g) == 1 else f"[{g[0]}..{g[-1]}]"
                          if p["contiguous"] else str(g) for g in p["groups"])
        lines.append(f"{G:>3}  {p['amad']:6.3f}  {'yes' if p['contiguous'] else 'no ':>6}  "
                     f"{groups}{mark}")
    return "\n".join(lines)


def plot_groups(result: dict, out: Path) -> list[Path]:
    """Distance heatmap with the Ĝ groups outlined, dendrogram, AMAD vs G. Returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from scipy.cluster.hierarchy import dendrogram

    out.mkdir(parents=True, exist_ok=True)
    layers, dist = result["layers"], np.array(result["distances"])
    chosen = result["partitions"][str(result["chosen_G"])]["groups"]
    title = result.get("model", "")
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    im = ax.imshow(dist, cmap="viridis")
    fig.colorbar(im, ax=ax, label="mean angular distance")
    ticks = range(0, len(layers), max(1, len(layers) // 15))
    ax.set_xticks(list(ticks), [layers[i] for i in ticks])
    ax.set_yticks(list(ticks), [layers[i] for i in ticks])
    for g in chosen + [[v] for v in result["separate_layers"]]:
        idx = [layers.index(v) for v in g]
        if max(idx) - min(idx) + 1 == len(idx):  # outline runs; scattered groups have no box
            lo = min(idx) - 0.5
            ax.add_patch(Rectangle((lo, lo), len(idx), len(idx), fill=False, ec="red", lw=1.5))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\nĜ = {result['chosen_G']} groups (+ {len(result['separate_layers'])} "
                 f"separate), AMAD < {result['threshold']}", fontsize=9)
    paths.append(_save(fig, out / "distances.png"))

    grouped = result["grouped_layers"]
    if len(grouped) > 1:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        Z = complete_linkage(_sub(dist, layers, grouped))
        dendrogram(Z, labels=grouped, ax=ax, color_threshold=result["threshold"])
        ax.axhline(result["threshold"], color="gray", ls="--", lw=1)
        ax.set_ylabel("complete-linkage distance")
        ax.set_title("dendrogram of the grouped layers", fontsize=9)
        paths.append(_save(fig, out / "dendrogram.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    Gs = [int(G) for G in result["partitions"]]
    ax.plot(Gs, [p["amad"] for p in result["partitions"].values()], marker="o", ms=3)
    ax.axhline(result["threshold"], color="red", ls="--", lw=1, label="threshold")
    ax.axvline(result["chosen_G"], color="gray", ls=":", lw=1, label=f"Ĝ = {result['chosen_G']}")
    ax.set_xlabel("number of groups G")
    ax.set_ylabel("AMAD")
    ax.legend()
    paths.append(_save(fig, out / "amad.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    save_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def parse_layers(text: str | None) -> list[int] | None:
    """'all' / None, '0-29', '0,2,4' or '0-5,10' -> sorted block indices."""
    if text in (None, "", "all"):
        return None
    layers: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--layers {text!r}: use 'all', '0-29', '0,2,4' or '0-5,10'") from None
    return sorted(layers)


def main(argv: list[str] | None = None) -> dict:
    """`python -m lgsae.groups`: the statistics stage of `python -m lgsae.train` alone."""
    from lgsae.capture import DTYPES, check_layers, special_ids
    from lgsae.config import GroupsConfig, check_device, parse
    from lgsae.models import DEFAULT_MODEL, is_default, load_model, load_tokenizer
    from lgsae.similarity import layer_distances
    from lgsae.sources import Forward, InMemoryActivations, context_batches

    c = parse(GroupsConfig, argv, prog="python -m lgsae.groups")
    dc, gc = c.data, c.groups
    check_device(dc.device)
    out = Path(c.out)
    # before the model loads: a run's report and SAEs were made from its groups.json
    if (out / "run.json").exists():
        raise FileExistsError(f"{out} is a python -m lgsae.train run, whose report and SAEs "
                              "follow its groups.json; choose another --out (nothing was written)")
    if (out / "groups.json").exists() and not c.overwrite:
        raise FileExistsError(f"{out} already holds groups.json; choose another --out or pass "
                              "--overwrite (nothing was written)")
    tok = load_tokenizer(dc.model, trust_remote_code=dc.trust_remote_code)
    model = load_model(dc.model, dtype=DTYPES[dc.model_dtype], device=dc.device,
                       trust_remote_code=dc.trust_remote_code)
    layers = check_layers(parse_layers(dc.layers), model.config.num_hidden_layers)
    forward = Forward(model, layers, batch_size=dc.fwd_batch, store=DTYPES[dc.act_dtype],
                      device=torch.device(dc.device))
    n_ctx = -(-dc.stat_tokens // dc.ctx)
    sample = InMemoryActivations.collect(
        forward, context_batches(tok, dc.text(0), ctx=dc.ctx, start=0, count=n_ctx,
                                 per=dc.fwd_batch), dc.ctx, special_ids(tok))
    dist = layer_distances(sample, centre=gc.centre)
    result = {"model": DEFAULT_MODEL if is_default(dc.model) else dc.model,
              **compute_groups(dist, layers, threshold=gc.threshold,
                               exclude_last=not gc.include_last, contiguous=gc.contiguous),
              "tokens": sample.n_tokens, "centre": gc.centre}
    write_json(out / "groups.json", result)
    plots = plot_groups(result, out)
    print(format_table(result))
    print(f"Ĝ = {result['chosen_G']} (AMAD < {gc.threshold}); separate: "
          f"{result['separate_layers']}; wrote {out / 'groups.json'} and "
          f"{', '.join(p.name for p in plots)}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as e:
        sys.exit(f"lgsae.groups: error: {e}")
