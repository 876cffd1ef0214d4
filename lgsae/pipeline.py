"""The run behind `python -m lgsae.train`: statistics -> groups -> train -> evaluate -> report.

Data flow (lgsae.sources has the token layout):
1. the statistics prefix (`--stat-tokens`) goes through the model once and stays in memory:
   per-layer scales and the layer-distance matrix, hence the groups (groups.json, plots);
2. the training stream (`--tokens`) goes through the model chunk by chunk (or, with
   `--from-cache`, through the disk cache) into the shuffle buffer (lgsae.buffer), whose batches
   feed every SAE of every method (lgsae.trainer); checkpoints record the step, from which the
   buffer is rebuilt on `--resume`;
3. the held-out contexts go through the model with each reconstruction spliced in
   (lgsae.evaluate); rank 0 writes metrics.json and report.md.

Under `torchrun --nproc_per_node N` (lgsae.dist) every rank runs its share of each forward and
the activations are all-gathered; the SAEs are spread over the ranks by cost, each rank training
its own in full, or with --data-parallel (or fewer SAEs than ranks) replicated, each rank
training on its rows of each batch. Rank 0 prepares the folder and writes the shared files.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from lgsae import dist as distributed
from lgsae.buffer import ShuffleBuffer
from lgsae.capture import DTYPES, block_paths, check_layers, special_ids
from lgsae.checkpoint import Checkpoints
from lgsae.config import COSMETIC, EQUAL_COMPUTE, PipelineConfig, eval_at_tokens
from lgsae.data import count_contexts
from lgsae.groups import compute_groups, parse_layers, plot_groups
from lgsae.io import write_json
from lgsae.models import DEFAULT_MODEL, is_default, load_model, load_tokenizer
from lgsae.plan import (
    SAESpec,
    choose_partition,
    layer_params_from,
    methods_from,
    milestones,
    plan_saes,
    variant_methods,
)
from lgsae.similarity import layer_distances
from lgsae.sources import (
    CacheSource,
    Forward,
    InMemoryActivations,
    Layout,
    StreamSource,
    context_batches,
    make_layout,
)
from lgsae.trainer import Trainer


def prepare_out(c: PipelineConfig, world: int = 1) -> Path:
    """Create (or check, for --resume) the run folder and write run.json."""
    out, r = Path(c.run.out), c.run
    flags = {k: v for k, v in c.flags().items() if k not in COSMETIC}
    flags["world_size"] = world
    if out.exists() and any(out.iterdir()):
        if (r.overwrite or r.resume) and not (out / "run.json").is_file():
            # never delete or continue a folder we did not create
            raise FileExistsError(f"--{'overwrite' if r.overwrite else 'resume'}: {out} is not "
                                  "an lgsae run folder (no run.json); remove it yourself or "
                                  "choose another --out")
        if r.overwrite:  # renamed aside first: a kill mid-way leaves no half-deleted run
            aside = out.parent / f".{out.name}.deleting-{os.getpid()}"
            os.replace(out, aside)
            shutil.rmtree(aside)
        elif r.resume:
            old = json.loads((out / "run.json").read_text())
            old.setdefault("world_size", 1)
            if old.get("world_size") != world:
                raise ValueError(f"--resume: {out} was run by {old['world_size']} process(es), "
                                 f"this launch has {world}; resume with the same "
                                 f"`torchrun --nproc_per_node {old['world_size']}` (or without "
                                 "torchrun if it was 1)")
            if old != flags:
                changed = sorted(k for k in set(old) | set(flags) if old.get(k) != flags.get(k))
                was = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r}" for k in changed)
                raise ValueError(f"--resume: {out} was started with other flags ({was}); "
                                 "resume with the same flags or use --overwrite")
            return out
        elif not (out / "run.json").is_file():
            raise FileExistsError(f"{out} is not empty and is not an lgsae run (no run.json); "
                                  "choose another --out (nothing was written)")
        else:
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or "
                                  "--overwrite to replace it (or choose another --out)")
    elif r.resume:
        raise FileNotFoundError(f"--resume: nothing to resume in {out}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", flags)
    return out


def check_budget(c: PipelineConfig, tokenizer, layout: Layout) -> None:
    """Before anything is written: does the text hold the statistics prefix, the held-out set
    and the training stream? (Counted by tokenising, for the packaged text and local files; an
    HF hub dataset is read lazily and the run stops where it ends.)"""
    d = c.data
    if d.dataset is not None and not Path(d.dataset).exists():
        return
    need = layout.total_contexts
    have = count_contexts(tokenizer, d.dataset, ctx_len=d.ctx, limit=need,
                          text_column=d.text_column, seed=c.train.seed)
    if have < need:
        per = layout.tokens_per_context
        room = (have - layout.train_start) * per
        raise ValueError(
            f"--tokens {c.train.tokens:,}: the text {d.dataset or 'default (Wikipedia leads)'!r} "
            f"holds {have:,} contexts of {d.ctx} ({have * d.ctx:,} tokens); the statistics "
            f"prefix and held-out set take {layout.train_start:,} of them, so at most "
            f"{max(room, 0):,} training tokens fit. Lower --tokens (or --stat-tokens / "
            "--eval-tokens), or pass a larger --dataset")


def run(c: PipelineConfig) -> dict:
    d = distributed.init(c.data.device)
    metrics = _run(c, d)
    d.close()
    return metrics


def _wandb_logger(c: PipelineConfig, start: bool = True):
    """wandb's run.log (checked on every rank, started on rank 0 only: start=False elsewhere)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: python -m pip install wandb") from None
    return wandb.init(project=c.run.wandb, config=c.flags()).log if start else None


def _run(c: PipelineConfig, d: distributed.Dist) -> dict:
    from lgsae.evaluate import evaluate
    from lgsae.report import summarize, write_report
    from lgsae.stats import summarize_eval

    distributed.check_same(d, "flags", c.flags())
    dc, tc = c.data, c.train
    methods = methods_from(tc.baselines)
    methods[1:1] = variant_methods(tc.group_variants)  # right after the plain groups
    log = _wandb_logger(c, start=d.is_main) if c.run.wandb else None
    progress = c.run.progress and d.is_main
    model_name = DEFAULT_MODEL if is_default(dc.model) else dc.model
    model = d.main_first(lambda: load_model(dc.model, dtype=DTYPES[dc.model_dtype],
                                            device=d.device,
                                            trust_remote_code=dc.trust_remote_code))
    tok = load_tokenizer(dc.model, trust_remote_code=dc.trust_remote_code)
    layers = check_layers(parse_layers(dc.layers), model.config.num_hidden_layers)
    layout = make_layout(ctx=dc.ctx, stat_tokens=dc.stat_tokens, eval_tokens=dc.eval_tokens,
                         train_tokens=tc.tokens, buffer_tokens=tc.buffer_tokens,
                         fwd_batch=dc.fwd_batch, batch=tc.batch)
    d.on_main(lambda: check_budget(c, tok, layout))
    out = d.on_main(lambda: prepare_out(c, d.world))
    forward = Forward(model, layers, batch_size=dc.fwd_batch, store=DTYPES[dc.act_dtype],
                      device=d.device, dist=d)
    text = dc.text(tc.seed)
    special = special_ids(tok)  # their positions are left out like the sink (lgsae.capture)

    def contexts(start: int, count: int):
        return context_batches(tok, text, ctx=dc.ctx, start=start, count=count,
                               per=layout.chunk_contexts)

    # 1. statistics prefix -> scales, distances, groups (every rank computes the same)
    sample = InMemoryActivations.collect(forward, contexts(0, layout.stat_contexts), dc.ctx,
                                         special)
    groups = {"model": model_name,
              **compute_groups(layer_distances(sample, centre=c.groups.centre), layers,
                               threshold=c.groups.threshold, contiguous=c.groups.contiguous,
                               exclude_last=not c.groups.include_last),
              "tokens": sample.n_tokens, "centre": c.groups.centre}
    scales, d_model = sample.scales, sample.d_model
    stat_means = {v: m.float() for v, m in zip(sample.layers, sample.means())}
    medians, outliers = sample.medians, sample.outliers
    if outliers and d.is_main:
        print(f"lgsae: {len(outliers)} kept position(s) of the statistics prefix have a norm over "
              f"50x their layer's median (see metrics.json 'outliers'); first: {outliers[0]}")
    del sample
    stat_seconds = forward.seconds  # model forward over the prefix (this rank's share)

    def write_groups():
        write_json(out / "groups.json", groups)
        plot_groups(groups, out)

    d.on_main(write_groups)
    partition = choose_partition(c.groups.groups, groups)

    # 2. training: every SAE of every method on the same shuffled batches
    specs = plan_saes(groups, partition, methods, d_model, tc.expansion, tc.k,
                      layer_params=layer_params_from(tc.layer_params))
    data_parallel = d.active and (tc.data_parallel or len(specs) < d.world)
    costs = [s.num_latents for s in specs]
    owned = None if data_parallel else distributed.balance(costs, d.world)[d.rank]
    trainer = Trainer(specs, tc, model_name, d_model=d_model, scales=scales,
                      total_tokens=tc.tokens, device=d.device, owned=owned, dist=d,
                      data_parallel=data_parallel, hook_prefix=block_paths(model)[1])
    source = _source(c, forward, layout, tok, model, d, special)
    ckpt = Checkpoints(out / "checkpoints", c.run.checkpoint_minutes, d)
    if c.run.resume:
        ckpt.load(trainer)
    buffer = ShuffleBuffer(source, layout, tc.batch, tc.seed, steps=trainer.total_steps)
    at = milestones(eval_at_tokens(tc.eval_at, tc.tokens), specs, tc.tokens, tc.batch, d_model,
                    tc.k)  # {step: tokens}
    equal = milestones([EQUAL_COMPUTE], specs, tc.tokens, tc.batch, d_model, tc.k) if at else {}

    def snapshot(tr: Trainer) -> None:  # the per-layer SAEs as they are at a milestone
        if tr.step in at:
            _snapshot(tr, out / MILESTONES / str(at[tr.step]), d.is_main or not data_parallel)

    before = forward.seconds
    trainer.fit(buffer.batches(trainer.step), ckpt, progress=progress, log=log,
                on_step=snapshot if at else None)
    stream_seconds = forward.seconds - before
    if isinstance(source, CacheSource):  # the harvest's forward, as recorded when it ran
        stream_seconds += source.cache.harvest_seconds
    firing = [trainer.firing(i) for i in range(len(trainer.saes))]  # collective (data parallel)
    if d.is_main or not data_parallel:  # replicas are identical: rank 0 saves them
        for spec, sae, f in zip(trainer.specs, trainer.saes, firing):
            sae.save(out / "saes" / spec.name, firing=f)

    # 3. held-out evaluation: each rank its own SAEs (data parallel: a share of the replicas)
    mine = list(range(len(trainer.specs)))
    if data_parallel:
        mine = distributed.balance([len(s.layers) for s in trainer.specs], d.world)[d.rank]
    by_method: dict[str, dict[int, object]] = {}
    for i in mine:
        spec = trainer.specs[i]
        for v in spec.layers:
            by_method.setdefault(spec.method, {})[v] = trainer.saes[i]
        if spec.method == "per-layer":
            for t in at.values():
                by_method.setdefault(f"per-layer@{t}", {})[spec.layers[0]] = _milestone_sae(
                    out / MILESTONES / str(t) / spec.name, d.device)
    tally = evaluate(by_method, model, contexts(layout.stat_contexts, layout.eval_contexts),
                     special=special, means=stat_means, medians=medians, progress=progress,
                     n_contexts=layout.eval_contexts) if by_method else None
    stats = {}
    for part in d.gather(trainer.sae_stats()):
        for i, st in part.items():  # data parallel: the slowest rank's seconds
            stats[i] = st if i not in stats else {**st, "seconds": max(st["seconds"],
                                                                       stats[i]["seconds"])}
    tally = merge_tallies([t for t in d.gather(tally) if t is not None])
    # the model forward the SAEs shared (statistics prefix + training stream, the slowest rank)
    forward_seconds = max(d.gather(stat_seconds + stream_seconds))

    # the milestone SAEs as methods of their own ("per-layer@<tokens>"), with their training
    # figures at the milestone
    all_specs, all_stats = list(specs), dict(stats)
    for t in at.values():
        for spec in (s for s in specs if s.method == "per-layer"):
            all_stats[len(all_specs)] = json.loads(
                (out / MILESTONES / str(t) / spec.name / "train.json").read_text())
            all_specs.append(SAESpec(f"per-layer@{t}/{spec.name.split('/', 1)[1]}",
                                     f"per-layer@{t}", spec.layers, spec.num_latents))

    def report() -> dict:
        last = max(groups["layers"])
        ev = summarize_eval(tally, d_model, last=last)
        spread = _spread(tally, specs, out)
        for row in outliers + tally["outliers"]:
            row["token"] = tok.decode([row["token_id"]])
        metrics = summarize(all_stats, all_specs, ev, tally, groups, forward_seconds,
                            partition=partition, tokens_train=trainer.tokens,
                            dead_window=trainer.dead_window, spread=spread,
                            outliers=outliers + tally["outliers"], special=special)
        metrics.update(processes=d.world, source="cache" if tc.from_cache else "stream",
                       parallel="data" if data_parallel else ("saes" if d.active else "none"),
                       buffer_tokens=2 * layout.chunk_contexts * layout.tokens_per_context,
                       stat_tokens=groups["tokens"], tokens_train_kept=trainer.kept)
        for name, m in metrics["methods"].items():
            m["tokens_train"] = int(name.split("@")[1]) if "@" in name else trainer.tokens
        if at:
            metrics["milestones"] = {
                f"per-layer@{t}": {"tokens": t, "equal_compute": t in equal.values(),
                                   "paired": summarize_eval(tally, d_model, last=last,
                                                            base=f"per-layer@{t}")["paired"]}
                for t in at.values()}
        # the ablation's other comparisons: against the equal-width smaller SAEs, and each
        # groups+<options> variant against the plain groups
        bases = [b for b in ("smaller", "groups") if b in metrics["methods"] and
                 (b == "smaller" or any(m.startswith("groups+") for m in metrics["methods"]))]
        if bases:
            metrics["paired_vs"] = {b: summarize_eval(tally, d_model, last=last,
                                                      base=b)["paired"] for b in bases}
        write_json(out / "metrics.json", metrics)
        if c.run.browse:  # the latent browser and its three example latents (report.md)
            from lgsae.browse import build

            try:  # on the held-out contexts: no text beyond what the run has read
                site = build(out, tokens=layout.eval_contexts * dc.ctx, progress=progress,
                             model=model, tokenizer=tok)
            except Exception as e:  # the run's results stand without it
                warnings.warn(f"lgsae: the latent browser was not built ({e!r}); build it "
                              f"later with python -m lgsae.browse {out}", stacklevel=1)
            else:
                metrics["browser"] = {k: site[k] for k in ("bytes", "seconds", "tokens",
                                                           "examples")}
                write_json(out / "metrics.json", metrics)
        write_report(out, metrics, groups)
        print((out / "report.md").read_text().split("\n## ")[1])
        return metrics

    metrics = d.on_main(report)
    if not c.run.keep_checkpoint:
        ckpt.remove()
    return metrics


MILESTONES = "milestones"  # run-folder subfolder: per-layer SAEs saved at --eval-at milestones


def _snapshot(tr: Trainer, folder: Path, write: bool) -> None:
    """Save the trainer's per-layer SAEs, their firing counts and their training figures so far
    under folder/<name> (every rank calls: the firing counts are a collective when data
    parallel; `write` on the rank that saves)."""
    stats = tr.sae_stats()
    for i, spec in enumerate(tr.specs):
        if spec.method != "per-layer":
            continue
        firing = tr.firing(i)
        if write:
            path = tr.saes[i].save(folder / spec.name, firing=firing)
            write_json(path / "train.json", {**stats[tr.index[i]], "tokens": tr.tokens})


def _milestone_sae(folder: Path, device):
    from lgsae.sae import GroupSAE

    if not (folder / "train.json").is_file():
        raise FileNotFoundError(f"{folder} is incomplete: the run stopped while saving its "
                                "--eval-at milestone; start over with --overwrite")
    return GroupSAE.load(folder, device=device)


def merge_tallies(parts: list[dict]) -> dict:
    """One evaluation tally from every rank's (each holds its own SAEs' rows; the clean and
    ablation sums of a layer are the same on every rank that evaluated it)."""
    out = {**parts[0], "sae": {}, "ablation": {}, "outliers": []}
    seen = set()
    for t in parts:
        for method, rows in t["sae"].items():
            out["sae"].setdefault(method, {}).update(rows)
        for v, ab in t["ablation"].items():
            out["ablation"].setdefault(v, ab)
        for row in t["outliers"]:
            key = (row["layer"], row["context"], row["position"])
            if key not in seen:
                seen.add(key)
                out["outliers"].append(row)
        out["seconds"] = max(out["seconds"], t["seconds"])
    return out


def _spread(tally: dict, specs, out: Path) -> dict:
    """Feature spread of every multi-layer SAE (lgsae.stats.spread) and, where per-layer SAEs
    were trained, MMCS of each member layer's per-layer SAE against it (weights read back from
    the run folder: under torchrun another rank may have trained them)."""
    from lgsae.sae import GroupSAE
    from lgsae.stats import mmcs, spread

    per_layer = {s.layers[0]: s.name for s in specs if s.method == "per-layer"}
    result = {}
    for spec in specs:
        if len(spec.layers) < 2:
            continue
        counts = torch.stack([tally["sae"][spec.method][v]["fires"] for v in spec.layers])
        result[spec.name] = row = spread(counts, spec.layers)
        if per_layer:
            W = GroupSAE.load(out / "saes" / spec.name).W_dec.detach()
            row["mmcs"] = {str(v): mmcs(GroupSAE.load(out / "saes" / per_layer[v]).W_dec.detach(),
                                        W) for v in spec.layers if v in per_layer}
    return result


def _source(c: PipelineConfig, forward: Forward, layout: Layout, tok, model, d, special):
    if not c.train.from_cache:
        return StreamSource(forward, layout, tok, c.data.text(c.train.seed), special)
    from lgsae.harvest import HarvestConfig, harvest
    from lgsae.sources import weights_fingerprint

    dc = c.data
    cfg = HarvestConfig(model=dc.model, dataset=dc.dataset, text_column=dc.text_column,
                        tokens=layout.train_contexts * dc.ctx, ctx=dc.ctx, layers=forward.layers,
                        dtype=dc.model_dtype, cache_dtype=dc.act_dtype, seed=c.train.seed,
                        skip_contexts=layout.train_start,
                        extra={"weights": weights_fingerprint(model), "fwd_batch": dc.fwd_batch,
                               "chunk_contexts": layout.chunk_contexts})
    # rank 0 harvests (once; later runs reuse the cache), the others then open it
    cache = d.main_first(lambda: harvest(cfg, device=d.device, batch_size=dc.fwd_batch,
                                         model=model, tokenizer=tok,
                                         progress=c.run.progress and d.is_main,
                                         shard_contexts=layout.chunk_contexts))
    return CacheSource(cache, special)
