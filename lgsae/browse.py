"""A latent browser for a finished run: `python -m lgsae.browse RUN [--out DIR] [--tokens N]`.

One streamed pass over held-out text (the run's evaluation contexts, then text after its training
stream) captures every layer the run's SAEs serve; each SAE encodes its member layers, and for
every latent we keep its firing count and mean activation per member layer, its `--top` highest
activations (with each one's context window of per-token activations of that latent at that
layer), `--random` further firings drawn at random, and the tokens its decoder row promotes through
the model's unembedding (logit lens: W_U · (γ ⊙ d), γ the final norm's weight).

The site is static (index.html, app.js, data/): it opens from the file system or any static
server. Data files are JavaScript that hand gzip-compressed JSON to the page (a page opened from
file:// may not fetch), one summary file per SAE and one file per `SHARD` latents, loaded when
first needed. Links are shareable: `index.html#<sae>/<latent>`, e.g. `#groups/L02-L08/17`.
Positions that training leaves out (each context's first, special tokens) never count as firings.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from lgsae.capture import kept_positions, special_ids
from lgsae.io import write_folder
from lgsae.sae import GroupSAE

SHARD = 256  # latents per detail file
WINDOW = (10, 4)  # tokens shown before and after a firing
ENCODE_ROWS = 4096  # rows per encode call (bounds the [rows, M] pre-activations)


# ----------------------------------------------------------------------------- the run
def run_saes(run: Path, methods: str = "all", device="cpu") -> list[tuple[str, str, GroupSAE]]:
    """[(name, method, SAE)] of a run folder, in metrics.json's order (the SAEs it trained)."""
    for f in ("run.json", "metrics.json", "saes"):
        if not (run / f).exists():
            raise FileNotFoundError(f"{run} is not a finished lgsae run (no {f}); pass the --out "
                                    "folder of python -m lgsae.train")
    trained = json.loads((run / "metrics.json").read_text())["methods"]
    # "all": the trained methods, not the per-layer SAEs saved part-way (--eval-at, "name@tokens")
    want = [m for m in trained if "@" not in m] if methods == "all" else \
        [m.strip() for m in methods.split(",")]
    unknown = [m for m in want if m not in trained]
    if unknown:
        raise ValueError(f"method(s) {unknown} are not in this run (it has {list(trained)})")
    out = []
    for method in want:
        for name in sorted(trained[method].get("saes", {})):
            base, _, at = method.partition("@")
            folder = run / "saes" / name if not at else \
                run / "milestones" / at / base / name.split("/", 1)[1]
            if not (folder / "cfg.json").is_file():
                raise FileNotFoundError(f"{folder} is missing: the run's SAE folders are "
                                        "incomplete (was it moved or cut short?)")
            out.append((name, method, GroupSAE.load(folder, device=device)))
    if not out:
        raise ValueError(f"{run}: no trained SAEs in metrics.json")
    return out


def held_out_ids(flags: dict, tok, n_ctx: int) -> torch.Tensor:
    """[contexts, ctx] held-out token ids: the run's evaluation contexts, then the contexts after
    its training stream (never the statistics prefix or training text), up to n_ctx."""
    from lgsae.data import iter_contexts
    from lgsae.sources import context_batches, make_layout

    ctx = flags["ctx"]
    layout = make_layout(ctx=ctx, stat_tokens=flags["stat_tokens"],
                         eval_tokens=flags["eval_tokens"], train_tokens=flags["tokens"],
                         buffer_tokens=flags["buffer_tokens"], fwd_batch=flags["fwd_batch"],
                         batch=flags["batch"])
    text = {"dataset": flags.get("dataset"), "text_column": flags.get("text_column", "text"),
            "seed": flags.get("seed", 0)}
    first = min(n_ctx, layout.eval_contexts)
    parts = list(context_batches(tok, text, ctx=ctx, start=layout.stat_contexts, count=first,
                                 per=64))
    more = n_ctx - first
    if more > 0:  # one pass to the end of the training stream, then as many as the text has
        after = iter_contexts(tok, text["dataset"], ctx_len=ctx, start=layout.total_contexts,
                              text_column=text["text_column"], seed=text["seed"])
        rows = [row for _, row in zip(range(more), after)]
        if rows:
            parts.append(torch.stack(rows))
    return torch.cat(parts)


def _unembedding(model) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(W_U [V, D], final norm weight [D] or None), or (None, None) without an LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return None, None
    base = model.base_model
    gamma = None
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        w = getattr(getattr(base, name, None), "weight", None)
        if isinstance(w, torch.Tensor):
            gamma = w.detach().float()
            break
    return head.weight.detach().float(), gamma


# ----------------------------------------------------------------------------- the pass
def latent_records(sae: GroupSAE, acts: dict[int, torch.Tensor], keep: torch.Tensor, ctx: int,
                   *, top: int, n_random: int, seed: int = 0) -> dict:
    """Everything the site shows of one SAE, from raw activations {layer: [rows, D]} of the
    held-out rows (row = context * ctx + position) and `keep` [rows] (positions that count).

    Returns {"fires": [members, M] firing counts, "sum": [members, M] activation sums, "tokens":
    kept rows per member, "top": list per latent of (member, row, act) best first, "random":
    likewise, "windows": {(member, row, latent): [(offset, act)]} of every example}."""
    M, members = sae.num_latents, sae.layers
    n = keep.shape[0]
    fires = torch.zeros(len(members), M, dtype=torch.int64)
    sums = torch.zeros(len(members), M, dtype=torch.float64)
    top_idx, top_act = [], []
    for m, v in enumerate(members):
        idx_parts, act_parts = [], []
        for lo in range(0, n, ENCODE_ROWS):
            with torch.no_grad():
                a, i = sae.encode(acts[v][lo:lo + ENCODE_ROWS].to(sae.device, torch.float32),
                                  layer=v)
            idx_parts.append(i.cpu())
            act_parts.append(a.float().cpu())
        a, i = torch.cat(act_parts), torch.cat(idx_parts)
        a = torch.where(keep[:, None], a, torch.zeros(()))  # left-out positions never fire
        fired = a > 0
        fires[m] = torch.bincount(i[fired], minlength=M)
        sums[m] = torch.zeros(M, dtype=torch.float64).index_add_(0, i[fired],
                                                                  a[fired].double())
        top_idx.append(i)
        top_act.append(a)
    # every firing as (latent, act, member, row)
    lat, act, mem, row = [], [], [], []
    for m in range(len(members)):
        fired = top_act[m] > 0
        r, _ = fired.nonzero(as_tuple=True)
        lat.append(top_idx[m][fired])
        act.append(top_act[m][fired])
        mem.append(torch.full_like(r, m))
        row.append(r)
    lat, act, mem, row = (torch.cat(t) for t in (lat, act, mem, row))
    best = _ranked(lat, -act.double(), M) < top
    g = torch.Generator().manual_seed(seed)
    rand_key = torch.rand(lat.shape[0], generator=g, dtype=torch.float64) + best.double()
    rand = (_ranked(lat, rand_key, M) < n_random) & ~best
    out_top: list[list] = [[] for _ in range(M)]
    out_rand: list[list] = [[] for _ in range(M)]
    for sel, dest in ((best, out_top), (rand, out_rand)):
        order = torch.argsort(-act[sel], stable=True)
        for j, m, r, a in zip(lat[sel][order].tolist(), mem[sel][order].tolist(),
                              row[sel][order].tolist(), act[sel][order].tolist()):
            dest[j].append((m, r, a))
    windows = _windows(out_top, out_rand, top_idx, top_act, ctx, n)
    return {"fires": fires, "sum": sums, "tokens": [int(keep.sum())] * len(members),
            "top": out_top, "random": out_rand, "windows": windows}


def _ranked(group: torch.Tensor, key: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Rank of each element within its group when sorted by `key` ascending."""
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel()) - starts[group[order]]
    return rank


def _windows(top, rand, idx, acts, ctx: int, n: int) -> dict:
    """{(member, row, latent): [(offset, act), ...]} the latent's non-zero activations in the
    window around each example (within its context)."""
    ex = [(m, r, j) for j, lst in enumerate(top) for m, r, _ in lst] + \
         [(m, r, j) for j, lst in enumerate(rand) for m, r, _ in lst]
    if not ex:
        return {}
    t = torch.tensor(ex)
    before, after = WINDOW
    offs = torch.arange(-before, after + 1)
    out = {}
    for m in range(len(idx)):
        for sel in t[t[:, 0] == m].split(8192):  # [E, W, K] temporaries stay ~100 MB
            rows = sel[:, 1:2] + offs  # [E, W]
            same = (rows // ctx == sel[:, 1:2] // ctx) & (rows >= 0) & (rows < n)
            rows = rows.clamp(0, n - 1)
            hit = idx[m][rows] == sel[:, 2, None, None]  # [E, W, K]
            val = (acts[m][rows] * hit).sum(-1) * same  # [E, W]
            for (mm, r, j), v in zip(sel.tolist(), val.tolist()):
                out[(mm, r, j)] = [(o, a) for o, a in zip(offs.tolist(), v) if a > 0]
    return out


def _logit_lens(sae: GroupSAE, W_U, gamma, n: int = 8) -> list[list] | None:
    if W_U is None or W_U.shape[1] != sae.d_in:
        return None
    d = sae.W_dec.detach().float()  # directions; the layer scale does not change them
    W_U = W_U.to(d.device)  # on the model's device (a GPU for a large vocabulary)
    if gamma is not None:
        d = d * gamma.to(d.device)
    out = []
    for lo in range(0, d.shape[0], 1024):
        v, i = torch.topk(d[lo:lo + 1024] @ W_U.T, n, dim=1)
        out += [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
    return out


# ----------------------------------------------------------------------------- the site
def _r(x: float) -> float:
    return float(f"{x:.3g}")


def _pack(obj) -> str:
    """JSON, gzip-compressed, base64: what a data file hands to the page."""
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.b64encode(gzip.compress(raw, 9, mtime=0)).decode()


def _js(call: str, *args) -> str:
    return f"LGSAE.{call}({', '.join(json.dumps(a) for a in args)});\n"


def _window(pairs: list[tuple[int, float]], act: float) -> list[int]:
    """An example's context window as a flat [offset, percent, ...]: the latent's other non-zero
    activations there, in whole percent of the example's own (offset 0 is the example itself;
    the page only shades tokens with these, so two digits are plenty and the site stays small)."""
    return [v for o, x in pairs if o != 0 for v in (o, round(100 * x / act))]


def slug(name: str) -> str:
    """A folder name for an SAE name like 'groups/L02-L08'."""
    return name.replace("/", "__")


def site_records(name: str, method: str, sae: GroupSAE, rec: dict, lens) -> tuple[dict, list]:
    """(summary, shards) of one SAE: the summary lists every latent (frequency, mean activation,
    peak layer, share per member layer); shard s details latents s*SHARD ... (examples
    [layer, row, activation, window (see _window)], logit lens)."""
    fires, sums = rec["fires"], rec["sum"]
    total = fires.sum(0)
    tokens = sum(rec["tokens"])
    share = (fires / total.clamp(min=1)).T  # [M, members]
    mean = (sums.sum(0) / total.clamp(min=1)).tolist()
    summary = {"name": name, "method": method, "layers": sae.layers, "M": sae.num_latents,
               "k": sae.k, "tokens": tokens, "shard": SHARD,
               "count": total.tolist(), "freq": [_r(c / max(tokens, 1)) for c in total.tolist()],
               "mean": [_r(v) for v in mean],
               "peak": [sae.layers[int(i)] if c else None
                        for i, c in zip(fires.argmax(0).tolist(), total.tolist())],
               "share": [[_r(x) for x in row] for row in share.tolist()]}
    shards = []
    for lo in range(0, sae.num_latents, SHARD):
        part = {}
        for j in range(lo, min(lo + SHARD, sae.num_latents)):
            ex = {key: [[sae.layers[m], r, _r(a), _window(rec["windows"].get((m, r, j), []), a)]
                        for m, r, a in rec[key][j]] for key in ("top", "random")}
            if lens is not None:
                ex["lens"] = [[i, _r(v)] for i, v in lens[j]]
            part[j] = ex
        shards.append(part)
    return summary, shards


def build(run: str | Path, out: str | Path | None = None, *, tokens: int = 8192,
          top: int = 20, n_random: int = 3, methods: str = "all", progress: bool = True,
          model=None, tokenizer=None) -> dict:
    """Write the site for `run` to `out` (default RUN/browser) and the three example latents of
    its largest group SAE to RUN/latents.png; returns {path, bytes, seconds, tokens, saes,
    latents, examples}. `model`, `tokenizer`: the run's, when already loaded."""
    from tqdm.auto import tqdm

    from lgsae.models import load_model, load_tokenizer
    from lgsae.sources import Forward

    t0 = time.perf_counter()
    run = Path(run)
    out = Path(out) if out is not None else run / "browser"
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or
                                               (out / "browser.json").is_file())):
        raise FileExistsError(f"{out} exists and is not a site written by lgsae.browse: pass a "
                              "new or empty --out (an older site there is replaced whole)")
    if tokens < 1 or top < 1 or n_random < 0:
        raise ValueError(f"need --tokens >= 1, --top >= 1 and --random >= 0, got {tokens}, "
                         f"{top}, {n_random}")
    flags = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    saes = run_saes(run, methods)
    remote = bool(flags.get("trust_remote_code"))
    model = model if model is not None else load_model(flags.get("model"),
                                                       trust_remote_code=remote)
    tok = tokenizer if tokenizer is not None else load_tokenizer(flags.get("model"),
                                                                  trust_remote_code=remote)
    device = next(model.parameters()).device
    saes = [(n, m, s.to(device)) for n, m, s in saes]
    ctx = flags["ctx"]
    ids = held_out_ids(flags, tok, max(1, math.ceil(tokens / ctx)))
    keep = kept_positions(ids, special_ids(tok)).reshape(-1)
    layers = sorted({v for _, _, s in saes for v in s.layers})
    acts = Forward(model, layers, batch_size=flags.get("fwd_batch", 8), store=torch.float32,
                   device=device)(ids)
    W_U, gamma = _unembedding(model)
    vocab_ids = sorted(set(ids.reshape(-1).tolist()))
    pieces = {}
    lens_all = {}
    index = []
    bar = tqdm(saes, desc="browse", unit="sae", disable=not progress)
    for name, method, sae in bar:
        rec = latent_records(sae, acts, keep, ctx, top=top, n_random=n_random)
        lens = _logit_lens(sae, W_U, gamma)
        if lens is not None:
            lens_all[name] = True
            vocab_ids = sorted(set(vocab_ids) | {i for row in lens for i, _ in row})
        summary, shards = site_records(name, method, sae, rec, lens)
        pieces[name] = (summary, shards)
        index.append({"name": name, "method": method, "layers": sae.layers,
                      "M": sae.num_latents, "dir": slug(name), "shards": len(shards)})
    vocab = {i: tok.decode([i]) for i in vocab_ids}
    meta = {"run": str(run.resolve().name), "model": flags.get("model") or "SmolLM2-135M-Instruct",
            "ctx": ctx, "tokens": int(ids.numel()), "kept": int(keep.sum()), "top": top,
            "random": n_random, "window": list(WINDOW), "saes": index, "shard": SHARD,
            "lens": bool(lens_all)}

    def fill(tmp: Path) -> None:
        static = resources.files("lgsae") / "site"
        for f in ("index.html", "app.js"):
            (tmp / f).write_text(static.joinpath(f).read_text())
        data = tmp / "data"
        data.mkdir()
        (data / "run.js").write_text(
            _js("run", meta) + _js("text", _pack({"ids": ids.reshape(-1).tolist(),
                                                  "vocab": vocab})))
        for name, (summary, shards) in pieces.items():
            d = data / slug(name)
            d.mkdir(parents=True)
            (d / "latents.js").write_text(_js("latents", name, _pack(summary)))
            for s, part in enumerate(shards):
                (d / f"{s}.js").write_text(_js("shard", name, s, _pack(part)))
        (tmp / "browser.json").write_text(json.dumps({k: meta[k] for k in
                                                      ("run", "tokens", "top", "random")}))

    write_folder(out, fill)  # built beside `out`, then replaces it (an older site) whole
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    examples = example_latents(pieces)
    if examples:
        plot_examples(pieces, examples, ids.reshape(-1).tolist(), vocab, ctx,
                      run / "latents.png")
    return {"path": str(out), "bytes": size, "seconds": time.perf_counter() - t0,
            "tokens": int(ids.numel()), "saes": len(saes),
            "latents": sum(s.num_latents for _, _, s in saes),
            "examples": [{"sae": n, "latent": j} for n, j in examples]}


def example_latents(pieces: dict, min_fires: int = 20) -> list[tuple[str, int]]:
    """Three latents of the widest-spanning group SAE (the first such, by name), among those with
    >= min_fires held-out firings: the one whose firings spread most evenly over the member
    layers, the most concentrated on one layer, and the median (by the entropy of the shares)."""
    multi = [(len(s["layers"]), n) for n, (s, _) in pieces.items()
             if len(s["layers"]) > 1 and s["method"] == "groups"] or \
        [(len(s["layers"]), n) for n, (s, _) in pieces.items() if len(s["layers"]) > 1]
    if not multi:
        return []
    name = min(multi, key=lambda t: (-t[0], t[1]))[1]  # widest, then first by name
    s = pieces[name][0]
    ok = [j for j in range(s["M"]) if s["count"][j] >= min_fires]
    if len(ok) < 3:
        return []
    share = torch.tensor([s["share"][j] for j in ok], dtype=torch.float64)
    ent = -(share * share.clamp(min=1e-12).log()).sum(1)
    order = torch.argsort(ent, descending=True, stable=True).tolist()
    picks = [ok[order[0]], ok[order[-1]], ok[order[len(order) // 2]]]
    return [(name, j) for j in dict.fromkeys(picks)]


def plot_examples(pieces: dict, examples: list[tuple[str, int]], ids: list[int], vocab: dict,
                  ctx: int, path: Path, n_ctx: int = 4) -> Path:
    """An image of each example latent: its firing share per member layer, and its top held-out
    contexts (the firing token in [brackets], with its activation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lgsae.io import save_with

    def text(a: int, b: int) -> str:
        return "".join(vocab.get(i, "?") for i in ids[a:b]).replace("\n", " ⏎ ")

    fig, axes = plt.subplots(len(examples), 2, figsize=(15, 2.3 * len(examples)),
                             gridspec_kw={"width_ratios": [1, 5]}, squeeze=False)
    before, after = WINDOW
    for (name, j), (ax_bar, ax_txt) in zip(examples, axes):
        summary, shards = pieces[name]
        detail = shards[j // SHARD][j]
        layers = summary["layers"]
        ax_bar.bar([str(v) for v in layers], [100 * x for x in summary["share"][j]],
                   color="#4a78c2")
        ax_bar.set_xlabel("member layer")
        ax_bar.set_ylabel("% of firings")
        ax_bar.set_title(f"{name} #{j}", fontsize=10)
        lines = [f"fires on {100 * summary['freq'][j]:.2f} % of held-out token-layer positions, "
                 f"mean activation {summary['mean'][j]:.2f}; top contexts:"]
        for layer, row, act, _ in detail["top"][:n_ctx]:
            start = row - row % ctx
            left, tok = text(max(start, row - 2 * before), row)[-80:], text(row, row + 1)
            right = text(row + 1, min(start + ctx, row + 1 + after))[:40]
            lines.append(f"L{layer:<2d} {act:6.2f}  …{left}[{tok}]{right}…")
        ax_txt.axis("off")
        ax_txt.text(0, 1, "\n".join(line.replace("$", "\\$") for line in lines),
                    va="top", ha="left", family="monospace", fontsize=9,
                    transform=ax_txt.transAxes)
    fig.tight_layout()
    out = save_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict:
    from lgsae.config import BrowseConfig, parse

    c = parse(BrowseConfig, argv, "python -m lgsae.browse")
    try:
        info = build(c.run, c.out or None, tokens=c.tokens, top=c.top, n_random=c.random,
                     methods=c.methods, progress=c.progress)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"lgsae.browse: {e}") from None
    print(f"lgsae.browse: {info['saes']} SAEs, {info['latents']} latents, {info['tokens']} "
          f"held-out tokens -> {info['path']} ({info['bytes'] / 1e6:.1f} MB, "
          f"{info['seconds']:.0f} s); open {info['path']}/index.html")
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
