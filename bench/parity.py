"""Trainer quality at equal tokens: lgsae's trainer against sparsify's, one layer, several seeds.

    python bench/parity.py --out bench/results/parity-smollm2-L15.json     # ~20 min on 2 cores

Both trainers see the same rows: the default run's training stream for one layer of the default
model (the pipeline's layout, its first position and special tokens left out), captured once with
lgsae's own forward and cached under $LGSAE_CACHE/parity. Ours runs the real `Trainer` on those
rows through the pipeline's shuffle buffer; sparsify 1.3.3 runs its own `Trainer.fit` (its
initialisation, dead-latent bookkeeping, AuxK, Adam and lr schedule) on a replay model whose hooked
module returns the same rows, one context per step as it trains, contexts in a seeded random order.
Each SAE is then evaluated on the held-out contexts of the run's layout: FVU = Σ‖x − x̂‖² /
Σ‖x − x̄‖² (x̄ the held-out mean) over the kept positions whose norm is at most 50x the layer's
median (massive-norm positions excluded), L0, and the share of latents that never fire there.

`--variants` lists our trainer's settings to compare (name=flag,flag, see VARIANTS); each is one
change against the previous default or a combination, so the table is the ablation. Not part of CI.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro
from safetensors.torch import load_file, save_file
from torch import nn

from lgsae.buffer import ShuffleBuffer
from lgsae.capture import KEEP, OUTLIER_FACTOR, drop_sink, kept_rows, special_ids
from lgsae.config import PipelineConfig, TrainConfig
from lgsae.models import DEFAULT_MODEL, cache_dir, load_model, load_tokenizer
from lgsae.plan import SAESpec
from lgsae.sources import Forward, InMemoryActivations, StreamSource, context_batches, make_layout
from lgsae.trainer import Trainer

# our trainer's settings, one change at a time from the paper's (lgsae 0.1.0's defaults):
# TrainConfig fields, plus `lr_factor` (x the paper's lr rule), `window_div` (dead window = run
# tokens / div) and `massive` (leave massive-norm rows out of training as well as evaluation).
# "default" is whatever TrainConfig's defaults are now.
_PAPER = {"init_b_dec": "zero", "encoder_norm": 1.0, "lr_factor": 1.0, "window_div": 5}
_INIT = {**_PAPER, "init_b_dec": "mean", "encoder_norm": 0.58}
VARIANTS = {
    "paper (lgsae 0.1.0)": _PAPER,
    "b_dec mean": {**_PAPER, "init_b_dec": "mean"},
    "enc 0.58": {**_PAPER, "encoder_norm": 0.58},
    "b_dec mean, enc 0.58": _INIT,
    "b_dec mean, enc 0.3": {**_INIT, "encoder_norm": 0.3},
    "b_dec mean, enc 0.58, massive-norm rows out": {**_INIT, "massive": True},
    "+ lr x2": {**_INIT, "lr_factor": 2.0},
    "+ lr x3": {**_INIT, "lr_factor": 3.0},
    "+ lr x4": {**_INIT, "lr_factor": 4.0},
    "+ lr x8": {**_INIT, "lr_factor": 8.0},
    "+ lr x4, enc 0.8": {**_INIT, "lr_factor": 4.0, "encoder_norm": 0.8},
    "+ lr x4, enc 1": {**_INIT, "lr_factor": 4.0, "encoder_norm": 1.0},
    "+ lr x2, window /24": {**_INIT, "lr_factor": 2.0, "window_div": 24},
    "+ lr x4, window /24": {**_INIT, "lr_factor": 4.0, "window_div": 24},
    "+ lr x4, window /96": {**_INIT, "lr_factor": 4.0, "window_div": 96},
    "default": {},
}


@dataclass
class ParityConfig:
    """Our trainer vs sparsify's on one layer of the default model, at equal tokens."""

    out: Path = Path("parity.json")
    """Results JSON (written whole at the end, and after every SAE so a stop loses little)."""
    layer: int = 15
    """Block whose output both trainers learn."""
    seeds: int = 3
    """Seeds per configuration (SAE initialisation and the order of the rows)."""
    variants: str = "all"
    """Our settings to train: all, or names from VARIANTS separated by ';'."""
    sparsify: str = "constant,default,constant@x2,constant@x4"
    """sparsify runs: constant (scheduler replaced) or default (warmup+decay), "@xF": lr x F."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch=256, dtype="float32"))


# ----------------------------------------------------------------------------- the rows
def collect(cfg: ParityConfig) -> dict[str, torch.Tensor]:
    """The layer's training chunks (as the pipeline's StreamSource gives them), held-out rows and
    the statistics prefix's scale and median norm; cached, since the forward is the slow part."""
    pc = PipelineConfig(train=cfg.train)
    dc, tc = pc.data, pc.train
    layout = make_layout(ctx=dc.ctx, stat_tokens=dc.stat_tokens, eval_tokens=dc.eval_tokens,
                         train_tokens=tc.tokens, buffer_tokens=tc.buffer_tokens,
                         fwd_batch=dc.fwd_batch, batch=tc.batch)
    path = cache_dir() / "parity" / (f"L{cfg.layer}-{layout.train_contexts}x{dc.ctx}-"
                                     f"chunk{layout.chunk_contexts}-seed{tc.seed}.safetensors")
    if path.is_file():
        return load_file(path)
    model = load_model(dc.model, dtype=torch.float32)
    tok = load_tokenizer(dc.model)
    special = special_ids(tok)
    text = dc.text(tc.seed)
    forward = Forward(model, [cfg.layer], batch_size=dc.fwd_batch,
                      store=torch.bfloat16 if dc.act_dtype == "bfloat16" else torch.float32,
                      device="cpu")

    def contexts(start, count):
        return context_batches(tok, text, ctx=dc.ctx, start=start, count=count,
                               per=layout.chunk_contexts)

    sample = InMemoryActivations.collect(forward, contexts(0, layout.stat_contexts), dc.ctx,
                                         special)
    ids = torch.cat(list(contexts(layout.stat_contexts, layout.eval_contexts)))
    held = drop_sink(forward(ids)[cfg.layer], dc.ctx)
    chunks = list(StreamSource(forward, layout, tok, text, special).chunks())
    out = {"scale": torch.tensor(sample.scales[cfg.layer]),
           "median": torch.tensor(sample.medians[cfg.layer]),
           "eval_x": held, "eval_keep": kept_rows(ids, special),
           "chunk_sizes": torch.tensor([c[KEEP].numel() for c in chunks]),
           "train_x": torch.cat([c[cfg.layer] for c in chunks]),
           "train_keep": torch.cat([c[KEEP] for c in chunks]),
           "layout": torch.tensor([layout.ctx, layout.stat_contexts, layout.eval_contexts,
                                   layout.train_contexts, layout.chunk_contexts])}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)
    return out


def _not_massive(x: torch.Tensor, median: float) -> torch.Tensor:
    return torch.linalg.vector_norm(x.float(), dim=1) <= OUTLIER_FACTOR * median


class _Replay:
    """A chunk source over the cached rows (lgsae.sources' chunk interface)."""

    def __init__(self, data: dict, layer: int, keep: torch.Tensor):
        self.parts = list(zip(data["train_x"].split(data["chunk_sizes"].tolist()),
                              keep.split(data["chunk_sizes"].tolist())))
        self.layer = layer

    def chunks(self, start: int = 0):
        for x, k in self.parts[start:]:
            yield {self.layer: x, KEEP: k}


def _layout(data: dict):
    from lgsae.sources import Layout
    ctx, stat, ev, train, chunk = data["layout"].tolist()
    return Layout(ctx=ctx, stat_contexts=stat, eval_contexts=ev, train_contexts=train,
                  chunk_contexts=chunk)


# ----------------------------------------------------------------------------- trainers
def train_ours(cfg: ParityConfig, data: dict, seed: int, settings: dict):
    settings = dict(settings)
    massive = settings.pop("massive", False)
    lr_factor = settings.pop("lr_factor", None)
    div = settings.pop("window_div", None)
    spec = SAESpec(f"per-layer/L{cfg.layer:02d}", "per-layer", [cfg.layer],
                   cfg.train.expansion * data["train_x"].shape[1])
    if lr_factor is not None:
        settings["lr"] = lr_factor * 2e-4 / math.sqrt(spec.num_latents / 2**14)
    if div is not None:
        steps = _layout(data).train_tokens // cfg.train.batch
        settings["dead_window"] = max(cfg.train.batch, steps * cfg.train.batch // div)
    tc = TrainConfig(**{**cfg.train.__dict__, "seed": seed, **settings})
    keep = data["train_keep"].clone()
    if massive:
        keep &= _not_massive(data["train_x"], float(data["median"]))
    layout = _layout(data)
    trainer = Trainer([spec], tc, DEFAULT_MODEL, d_model=data["train_x"].shape[1],
                      scales={cfg.layer: float(data["scale"])},
                      total_tokens=layout.train_tokens)
    buffer = ShuffleBuffer(_Replay(data, cfg.layer, keep), layout, tc.batch, seed,
                           steps=trainer.total_steps)
    trainer.fit(buffer.batches(), progress=False)
    sae = trainer.saes[0]
    info = {"tokens_train": trainer.kept, "steps": trainer.step, "window": trainer.windows[0],
            "train_dead_pct": trainer.dead_pct(0)}

    def recon(x):
        with torch.no_grad():
            out = sae(x, layer=cfg.layer)
        return out.recon.float(), out.top_acts, out.top_indices
    return recon, info, trainer.windows[0]


class _Rows(nn.Module):
    """The hooked module: token ids are row numbers of the cached activations."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows[ids]


class _ReplayModel(nn.Module):
    """What sparsify's Trainer needs of a model: base_model, device, dummy_inputs, a forward."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.replay = _Rows(rows)
        self.dummy_inputs = {"input_ids": torch.tensor([[0, 1]])}

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids=None, **_):
        return self.replay(input_ids)


def train_sparsify(cfg: ParityConfig, data: dict, seed: int, schedule: str, window: int,
                   lr_factor: float = 1.0):
    # sparsify picks its Triton decoder whenever triton imports; on CPU tensors it fails there
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    import sparsify.trainer as st
    from datasets import Dataset
    from sparsify import SaeConfig
    from sparsify import TrainConfig as SpConfig
    from sparsify import Trainer as SpTrainer

    layout = _layout(data)
    x, keep = data["train_x"].float(), data["train_keep"]
    per = layout.tokens_per_context
    sentinel = x.shape[0]  # a zero row: positions sparsify must leave out point at it
    rows = torch.cat([x, x.new_zeros(1, x.shape[1])])
    ids = torch.arange(x.shape[0])
    ids[~keep] = sentinel
    ids = ids.view(-1, per)  # one context (its rows after the sink) per dataset row
    steps = layout.train_tokens // cfg.train.batch
    ids = ids[:steps * cfg.train.batch // per]  # whole contexts, as many positions as ours
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
    ds = Dataset.from_dict({"input_ids": ids[order].tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory() as tmp:
        sp = SpConfig(SaeConfig(expansion_factor=cfg.train.expansion, k=cfg.train.k),
                      batch_size=max(1, cfg.train.batch // per), optimizer="adam",
                      lr=None if lr_factor == 1.0 else lr_factor * 2e-4 / math.sqrt(
                          cfg.train.expansion * x.shape[1] / 2**14),
                      auxk_alpha=1 / 32, dead_feature_threshold=window,
                      exclude_tokens=[sentinel], hookpoints=["replay"], init_seeds=[seed],
                      log_to_wandb=False, save_dir=tmp, save_every=10**9)
        real = st.get_linear_schedule_with_warmup
        if schedule == "constant":
            from transformers import get_constant_schedule
            st.get_linear_schedule_with_warmup = lambda opt, *a, **k: get_constant_schedule(opt)
        try:
            trainer = SpTrainer(sp, ds, _ReplayModel(rows))
            trainer.fit()
        finally:
            st.get_linear_schedule_with_warmup = real
    coder = trainer.saes["replay"]
    dead = trainer.num_tokens_since_fired["replay"] > window

    def recon(x):
        with torch.no_grad():
            enc = coder.encode(x.float())
            return coder.decode(enc.top_acts, enc.top_indices).float(), enc.top_acts, \
                enc.top_indices
    return recon, {"tokens_train": int(keep.sum()), "steps": trainer.global_step,
                   "window": window, "train_dead_pct": 100 * float(dead.float().mean())}


# ----------------------------------------------------------------------------- evaluation
def held_out(recon, data: dict, num_latents: int) -> dict:
    x = data["eval_x"][data["eval_keep"]].float()
    x = x[_not_massive(x, float(data["median"]))]
    xhat, acts, idx = recon(x)
    sse = (x.double() - xhat.double()).pow(2).sum()
    sst = (x.double() - x.double().mean(0)).pow(2).sum()
    fired = torch.zeros(num_latents, dtype=torch.bool)
    fired[idx[acts > 0]] = True
    return {"fvu": float(sse / sst), "l0": float((acts > 0).sum(1).float().mean()),
            "never_fire_pct": 100 * float((~fired).float().mean()), "eval_rows": x.shape[0]}


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("fvu", "l0", "never_fire_pct", "train_dead_pct"):
        v = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        out[key] = float(v.mean())
        out[key + "_sd"] = float(v.std()) if len(v) > 1 else 0.0
    return out


def main(cfg: ParityConfig) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    data = collect(cfg)
    M = cfg.train.expansion * data["train_x"].shape[1]
    names = _split_names(cfg.variants)
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; known: {list(VARIANTS)}")
    # sparsify gets the dead window of our default settings (AuxK the same on both sides)
    window = Trainer([SAESpec("x", "per-layer", [cfg.layer], M)], cfg.train, "x",
                     d_model=data["train_x"].shape[1], scales={cfg.layer: 1.0},
                     total_tokens=_layout(data).train_tokens).windows[0]
    result = {"layer": cfg.layer, "seeds": cfg.seeds, "k": cfg.train.k, "num_latents": M,
              "batch": cfg.train.batch, "eval": "held-out contexts of the default layout, kept "
              "positions, norm <= 50x median", "defaults": {
                  k: getattr(TrainConfig, k) for k in ("init_b_dec", "encoder_norm", "lr_scale")},
              "dead_window": window, "runs": {}, "summary": {}}
    def over_seeds(label: str, train) -> None:  # train(seed) -> (recon, info)
        runs = []
        for seed in range(cfg.seeds):
            t = time.perf_counter()
            recon, info = train(seed)
            runs.append({"seed": seed, **info, **held_out(recon, data, M),
                         "seconds": time.perf_counter() - t})
            print(f"{label} seed {seed}: {runs[-1]}", flush=True)
        result["runs"][label], result["summary"][label] = runs, _summary(runs)
        _write(cfg.out, result)

    for name in names:
        over_seeds(f"lgsae {name}", lambda seed: train_ours(cfg, data, seed, VARIANTS[name])[:2])
    for run in [s.strip() for s in cfg.sparsify.split(",") if s.strip()]:
        schedule, _, factor = run.partition("@x")
        if schedule not in ("constant", "default"):
            raise SystemExit(f"--sparsify: unknown schedule {schedule!r} (constant, default)")
        factor = float(factor or 1)
        label = schedule + (f" lr x{factor:g}" if factor != 1 else " lr")
        over_seeds(f"sparsify 1.3.3, {label}", lambda seed: train_sparsify(
            cfg, data, seed, schedule, window, factor))
    result["seconds"] = time.perf_counter() - t0
    _write(cfg.out, result)
    cfg.out.with_suffix(".md").write_text(table(result))
    print(table(result))
    return result


def table(result: dict) -> str:
    """The markdown table of a results JSON: mean ± sd over seeds per configuration."""
    rows = ["| trainer, settings | held-out FVU | never fire on held-out % | dead in train "
            "window % | L0 |", "|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        rows.append(f"| {name} | {s['fvu']:.4f} ± {s['fvu_sd']:.4f} | "
                    f"{s['never_fire_pct']:.1f} ± {s['never_fire_pct_sd']:.1f} | "
                    f"{s['train_dead_pct']:.1f} | {s['l0']:.0f} |")
    return "\n".join(rows) + "\n"


def _split_names(spec: str) -> list[str]:
    """Variant names: ';'-separated (names contain commas), or one name, or 'all'."""
    if spec == "all":
        return list(VARIANTS)
    return [n.strip() for n in spec.split(";") if n.strip()]


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main(tyro.cli(ParityConfig))
