"""`python -m lgsae.train`: harvest -> groups -> train -> evaluate -> report, in one run folder.

Run folder: run.json (the flags), groups.json + distances/dendrogram/amad plots, checkpoints/,
saes/<method>/<layers>/{cfg.json, sae.safetensors}, metrics.json, report.md, per_layer.png.

Under `torchrun --nproc_per_node N` (lgsae.dist): rank 0 prepares the folder, harvests (one
forward pass over the text for all layers; the others then open the finished cache: the cache is
the single-process one by construction, and a harvest is cheap next to training), groups and
writes every shared file. The SAEs are spread over the ranks by cost (latents x tokens), each rank
training its own in full; with --data-parallel, or when there are fewer SAEs than ranks, every
rank holds every SAE and trains on its share of each batch. Evaluation is split over the ranks and
gathered on rank 0. Checkpoints go to checkpoints/rank<r>/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from lgsae import dist as distributed
from lgsae.groups import compute_groups, parse_layers, plot_groups
from lgsae.harvest import HarvestConfig, harvest
from lgsae.models import DEFAULT_MODEL, is_default, load_model, load_tokenizer
from lgsae.similarity import layer_distances
from lgsae.train import METHODS, TrainConfig, Trainer, plan_saes

_RUN_FLAGS_IGNORED = ("resume", "overwrite")  # may differ between a run and its resumption


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lgsae.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train one TopK SAE per group of similar layers (and the baselines), "
                    "evaluate them on held-out tokens and write a report.")
    a = p.add_argument
    a("--model", default=None, help=f"HF name or local path; None = {DEFAULT_MODEL}, offline")
    a("--dataset", default=None,
      help="HF dataset, local .json/.jsonl/.txt; None = the packaged Wikipedia leads")
    a("--text-column", default="text", help="text column of --dataset")
    a("--tokens", type=int, default=49_152, help="training tokens (one pass, every SAE)")
    a("--eval-tokens", type=int, default=1024, help="held-out tokens for evaluation")
    a("--ctx", type=int, default=256, help="context length")
    a("--layers", default="all", help="blocks: all, 0-29, 0,2,4")
    a("--expansion", type=int, default=8, help="latents = expansion × model width")
    a("--k", type=int, default=32, help="active latents per token")
    a("--batch", type=int, default=256, help="tokens per training step")
    a("--lr", type=float, default=None, help="learning rate (default: 2e-4/sqrt(M/2^14))")
    a("--groups", default="auto",
      help="auto (Ĝ by the AMAD rule), a number G, or explicit groups like '0-8;9-10;11-28'")
    a("--threshold", type=float, default=0.2, help="AMAD threshold for --groups auto")
    a("--contiguous", action="store_true", help="only group neighbouring layers")
    a("--baselines", default="per-layer",
      help="comma list of per-layer,even,smaller,single (or 'none')")
    a("--dtype", default="float32", choices=["float32", "bfloat16"],
      help="SAE matmuls; bfloat16 keeps fp32 master weights and Adam state")
    a("--model-dtype", default="float32", choices=["float32", "bfloat16"],
      help="model compute dtype for harvest and evaluation")
    a("--cache-dtype", default="bfloat16", choices=["float32", "bfloat16"],
      help="dtype of the stored activations")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--out", default="runs/default", help="run folder")
    a("--seed", type=int, default=0)
    a("--data-parallel", action="store_true",
      help="under torchrun: replicate every SAE and split each batch over the ranks (default: "
           "spread the SAEs over the ranks; data parallel anyway if there are fewer SAEs)")
    a("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--overwrite", action="store_true", help="delete --out first if it exists")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--wandb", default=None, metavar="PROJECT",
      help="also log training to this Weights & Biases project (needs `pip install wandb`)")
    return p.parse_args(argv)


def _methods(text: str) -> list[str]:
    names = [] if text.strip() in ("", "none") else [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in METHODS[1:]]
    if bad:
        raise ValueError(f"--baselines: unknown {bad}; choose from {', '.join(METHODS[1:])}")
    return ["groups"] + [m for m in METHODS[1:] if m in names]


def _partition(spec: str, groups: dict) -> list[list[int]]:
    """The groups to train from --groups: auto, a number G, or explicit 'a-b;c,d;...'."""
    parts = groups["partitions"]
    if spec == "auto":
        return parts[str(groups["chosen_G"])]["groups"]
    if spec.isdigit():
        if spec not in parts:
            raise ValueError(f"--groups {spec}: choose G in 1..{len(parts)}")
        return parts[spec]["groups"]
    explicit = [parse_layers(g) or [] for g in spec.split(";")]
    flat = sorted(v for g in explicit for v in g)
    want = groups["grouped_layers"]
    if flat != want:
        unknown = sorted(set(flat) - set(groups["layers"]))
        separate = sorted(set(flat) & set(groups["separate_layers"]))
        raise ValueError(
            f"--groups {spec!r} must split layers {want} into groups, each layer once"
            + (f"; unknown layers {unknown}" if unknown else "")
            + (f"; layers {separate} get their own SAE and are not grouped" if separate else ""))
    return explicit


def _prepare_out(a: argparse.Namespace, world: int = 1) -> Path:
    out = Path(a.out)
    flags = {k: v for k, v in vars(a).items() if k not in _RUN_FLAGS_IGNORED}
    flags["world_size"] = world
    if out.exists() and any(out.iterdir()):
        if a.overwrite:
            if not (out / "run.json").is_file():  # never rmtree a folder we did not create
                raise FileExistsError(f"--overwrite: {out} is not an lgsae run folder (no "
                                      "run.json); remove it yourself or choose another --out")
            shutil.rmtree(out)
        elif a.resume:
            old = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
            old.setdefault("world_size", 1)
            if old.get("world_size") != world:
                raise ValueError(f"--resume: {out} was run by {old['world_size']} process(es), "
                                 f"this launch has {world}; resume with the same "
                                 f"`torchrun --nproc_per_node {old['world_size']}` (or without "
                                 "torchrun if it was 1)")
            if old != flags:
                changed = sorted(k for k in set(old) | set(flags) if old.get(k) != flags.get(k))
                raise ValueError(f"--resume: {out} was started with other flags ({changed}); "
                                 "resume with the same flags or use --overwrite")
        else:
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or "
                                  "--overwrite to replace it (or choose another --out)")
    elif a.resume:
        raise FileNotFoundError(f"--resume: nothing to resume in {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(flags, indent=1))
    return out


def _wandb_logger(a: argparse.Namespace, start: bool = True):
    """wandb's run.log (checked on every rank, started on rank 0 only: start=False elsewhere)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: python -m pip install wandb") from None
    return wandb.init(project=a.wandb, config=vars(a)).log if start else None


def run(a: argparse.Namespace) -> dict:
    d = distributed.init(a.device)
    metrics = _run(a, d)
    d.close()
    return metrics


def _run(a: argparse.Namespace, d: distributed.Dist) -> dict:
    from lgsae.evaluate import evaluate
    from lgsae.report import summarize, write_report

    distributed.check_same(d, "flags", vars(a))
    cfg = TrainConfig(k=a.k, expansion=a.expansion, batch=a.batch, lr=a.lr, dtype=a.dtype,
                      seed=a.seed, checkpoint_every=a.checkpoint_every)
    methods = _methods(a.baselines)
    log = _wandb_logger(a, start=d.is_main) if a.wandb else None
    out = d.on_main(lambda: _prepare_out(a, d.world))
    progress = not a.no_progress and d.is_main
    model_name = DEFAULT_MODEL if is_default(a.model) else a.model
    dtype = torch.bfloat16 if a.model_dtype == "bfloat16" else torch.float32
    device = d.device
    model = d.main_first(lambda: load_model(a.model, dtype=dtype, device=device))
    tok = load_tokenizer(a.model)

    hk = dict(model=a.model, dataset=a.dataset, text_column=a.text_column, ctx=a.ctx,
              layers=parse_layers(a.layers), dtype=a.model_dtype, cache_dtype=a.cache_dtype,
              seed=a.seed)
    kw = dict(model=model, tokenizer=tok, device=device, progress=progress)
    train_cache = d.main_first(lambda: harvest(HarvestConfig(tokens=a.tokens, **hk), **kw))
    harvest_seconds = train_cache.harvest_seconds  # when it was computed, if reused now
    eval_cache = d.main_first(lambda: harvest(HarvestConfig(
        tokens=a.eval_tokens, skip_contexts=train_cache.n_tokens // a.ctx, **hk), **kw))

    def grouping() -> dict:
        groups = {"model": model_name,
                  **compute_groups(layer_distances(train_cache), train_cache.layers,
                                   threshold=a.threshold, contiguous=a.contiguous),
                  "tokens": train_cache.n_tokens}
        (out / "groups.json").write_text(json.dumps(groups, indent=1))
        plot_groups(groups, out)
        return groups

    groups = d.on_main(grouping)
    partition = _partition(a.groups, groups)

    specs = plan_saes(groups, partition, methods, train_cache.d_model, a.expansion, a.k)
    data_parallel = d.active and (a.data_parallel or len(specs) < d.world)
    costs = [s.num_latents * train_cache.n_stat_tokens for s in specs]
    owned = None if data_parallel else distributed.balance(costs, d.world)[d.rank]
    trainer = Trainer(specs, train_cache, cfg, model_name, device=device, owned=owned, dist=d,
                      data_parallel=data_parallel)
    if a.resume:
        trainer.load_checkpoint(out / "checkpoints")
    trainer.fit(out / "checkpoints", progress=progress, log=log)
    if d.is_main or not data_parallel:  # replicas are identical: rank 0 saves them
        for spec, sae in zip(trainer.specs, trainer.saes):
            sae.save(out / "saes" / spec.name)

    # evaluation: each rank its own SAEs (data parallel: a balanced share of the replicas)
    mine = list(range(len(trainer.specs)))
    if data_parallel:
        mine = distributed.balance([len(s.layers) for s in trainer.specs], d.world)[d.rank]
    by_method: dict[str, dict[int, object]] = {}
    for i in mine:
        for v in trainer.specs[i].layers:
            by_method.setdefault(trainer.specs[i].method, {})[v] = trainer.saes[i]
    results = evaluate(by_method, eval_cache, model, progress=progress) if by_method \
        else {"per_layer": {}, "clean_ce": None}  # (never rank 0: it owns the largest SAE)
    stats = {}
    for part in d.gather(trainer.sae_stats()):
        for i, st in part.items():  # data parallel: the slowest rank's seconds
            stats[i] = st if i not in stats else {**st, "seconds": max(st["seconds"],
                                                                       stats[i]["seconds"])}
    per_layer: dict[str, dict[int, dict]] = {}
    for part in d.gather(results["per_layer"]):
        for method, rows in part.items():
            per_layer.setdefault(method, {}).update(rows)
    results = {"per_layer": per_layer, "clean_ce": results["clean_ce"]}

    def report() -> dict:
        metrics = summarize(stats, specs, results, groups, harvest_seconds,
                            eval_tokens=eval_cache.n_tokens, partition=partition,
                            tokens_train=trainer.tokens, dead_window=trainer.dead_window)
        metrics["processes"] = d.world
        metrics["parallel"] = "data" if data_parallel else ("saes" if d.active else "none")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        write_report(out, metrics, groups)
        print((out / "report.md").read_text().split("\n## ")[1])
        return metrics

    return d.on_main(report)
