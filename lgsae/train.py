"""Train group SAEs and the paper's baselines from one pass over the activation cache.

`python -m lgsae.train` runs the whole pipeline on the offline default (SmolLM2-135M and the
packaged Wikipedia text): harvest -> groups (Ĝ) -> train the Ĝ group SAEs + the last layer's SAE
and the baselines -> evaluate on held-out tokens -> report (metrics.json, report.md, plots, saved
SAEs). Every SAE of every method sees the same batches: each batch is read from the cache once and
feeds them all. A group SAE draws, for every token of a batch, one member layer at random, so it
sees as many tokens per step as a single-layer SAE (DESIGN §1).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lgsae.dist import Dist, LaunchError
from lgsae.harvest import ActivationCache
from lgsae.sae import GroupSAE
from lgsae.step import make_optimizer, train_step, tune_cpu_allocator

METHODS = ("groups", "per-layer", "even", "smaller", "single")
PAPER_DEAD_WINDOW = 10_000_000  # tokens without a firing before a latent counts as dead


@dataclass
class SAESpec:
    """One SAE to train: which method it belongs to, the layers it serves, its width."""

    name: str
    method: str
    layers: list[int]
    num_latents: int


def _name(method: str, group: list[int]) -> str:
    span = f"L{group[0]:02d}" if len(group) == 1 else f"L{group[0]:02d}-L{group[-1]:02d}"
    return f"{method}/{span}" if len(group) == len(range(group[0], group[-1] + 1)) \
        else f"{method}/" + "_".join(f"L{v:02d}" for v in group)


def plan_saes(groups: dict, partition: list[list[int]], methods: list[str], d: int,
              expansion: int, k: int) -> list[SAESpec]:
    """The SAEs of every method. `groups` is the groups.json dict; `partition` the chosen groups
    of the grouped layers; the separate layers (the last one by default) get their own SAE in
    every grouped method."""
    M = expansion * d
    separate = [[v] for v in groups["separate_layers"]]
    every = [[v] for v in groups["layers"]]
    G = len(partition)
    partitions = {
        "groups": partition + separate,
        "per-layer": every,
        "even": groups["even"]["groups"] + separate if G == groups["chosen_G"]
        else _even(groups["grouped_layers"], G) + separate,
        "smaller": every,
        "single": [groups["grouped_layers"]] + separate,
    }
    # equal cost: L smaller SAEs hold as many latents in all as the G group SAEs (paper Table 1)
    small = max(k, round(M * G / len(groups["grouped_layers"])))
    specs = []
    for method in methods:
        width = small if method == "smaller" else M
        specs += [SAESpec(_name(method, g), method, list(g), width) for g in partitions[method]]
    return specs


def _even(layers: list[int], G: int) -> list[list[int]]:
    from lgsae.groups import even_partition

    return even_partition(layers, G)


@dataclass
class TrainConfig:
    """Training hyper-parameters (the --help text of `python -m lgsae.train`)."""

    k: int = 32  # latents active per token
    expansion: int = 8  # latents = expansion × model width
    batch: int = 256  # tokens per step (small: CPU runs see few tokens, steps matter more)
    lr: float | None = None  # None: the paper's 2e-4 / sqrt(M / 2^14) for each SAE
    dtype: str = "float32"  # SAE matmuls: float32, or bfloat16 over fp32 master weights and Adam
    seed: int = 0
    dead_window: int = 0  # tokens without a firing => dead; 0: min(10M, training tokens / 5)
    checkpoint_every: int = 50  # steps between checkpoints (0: only at the end)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.expansion < 1:
            raise ValueError(f"expansion must be >= 1, got {self.expansion}")
        if self.batch < 2:
            raise ValueError(f"batch must be >= 2 tokens (FVU needs a variance), got {self.batch}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def batches(cache: ActivationCache, layers: list[int], batch: int, seed: int
            ) -> Iterator[dict[int, torch.Tensor]]:
    """{layer: [batch, D]} over one pass of the cache (sink positions skipped), tokens shuffled
    within each shard (seeded), leftovers carried into the next shard; the last partial batch is
    dropped."""
    carry: dict[int, torch.Tensor] | None = None
    for s, shard in enumerate(cache.iter_shards(layers, skip_sink=True)):
        perm = torch.randperm(next(iter(shard.values())).shape[0],
                              generator=torch.Generator().manual_seed(seed * 100_003 + s))
        shard = {v: x[perm] for v, x in shard.items()}
        if carry is not None:
            shard = {v: torch.cat([carry[v], shard[v]]) for v in layers}
        n = next(iter(shard.values())).shape[0]
        for b in range(0, n - batch + 1, batch):
            yield {v: shard[v][b:b + batch] for v in layers}
        rest = n - n % batch
        carry = {v: shard[v][rest:] for v in layers}


class Trainer:
    """The SAEs of a run (or this rank's share of them), their optimizers, dead-latent counters
    and timings; checkpointable.

    `owned`: indices into `specs` that this process trains (default: all). Seeds follow the index
    in `specs`, so an SAE comes out the same whichever rank trains it. `dist` with
    `data_parallel=True`: every rank holds every owned SAE and trains on its 1/world of each
    batch, with gradients, FVU denominators and dead-latent counters reduced over the ranks.
    """

    def __init__(self, specs: list[SAESpec], cache: ActivationCache, cfg: TrainConfig,
                 model_name: str, device: str | torch.device = "cpu", *,
                 owned: list[int] | None = None, dist: Dist | None = None,
                 data_parallel: bool = False):
        if not specs:
            raise ValueError("no SAEs to train")
        self.dist = dist or Dist(device=torch.device(device))
        self.dp = data_parallel and self.dist.active
        if self.dp and cfg.batch % self.dist.world:
            raise ValueError(f"data parallel splits each batch over the ranks: --batch "
                             f"{cfg.batch} must be a multiple of the world size {self.dist.world}")
        self.index = list(range(len(specs))) if owned is None else list(owned)
        known = set(cache.layers)
        for spec in specs:
            bad = [v for v in spec.layers if v not in known]
            if bad:
                raise ValueError(f"{spec.name}: layers {bad} are not in the activation cache "
                                 f"(it has {cache.layers})")
            if not 1 <= cfg.k <= spec.num_latents:
                raise ValueError(f"{spec.name}: k={cfg.k} must be in [1, {spec.num_latents}] "
                                 "(its number of latents); lower k or raise expansion")
        self.specs = [specs[i] for i in self.index]
        self.cache, self.cfg, self.device = cache, cfg, torch.device(device)
        # bf16: matmuls in bf16, parameters and Adam in fp32 (pure-bf16 parameters drift: at 49k
        # tokens the default run's group FVU was 3.6 % worse than fp32, bench/bench_e2e.py)
        compute = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        scales = cache.scales
        self.saes = [
            GroupSAE(cache.d_model, k=cfg.k, num_latents=s.num_latents, layers=s.layers,
                     scales=[scales[v] for v in s.layers], model=model_name,
                     hookpoints=[f"layers.{v}" for v in s.layers], device=device,
                     seed=cfg.seed * 1009 + g, compute_dtype=compute)
            for g, s in zip(self.index, self.specs)
        ]
        self.opts = [make_optimizer(sae, cfg.lr) for sae in self.saes]
        self.since_fire = [torch.zeros(s.num_latents, dtype=torch.int64) for s in self.specs]
        self.seconds = [0.0] * len(self.specs)
        self.step, self.tokens = 0, 0
        self.layers = sorted({v for s in self.specs for v in s.layers})
        total = (cache.n_stat_tokens // cfg.batch) * cfg.batch
        self.total_steps = total // cfg.batch
        self.dead_window = cfg.dead_window or max(cfg.batch, min(PAPER_DEAD_WINDOW, total // 5))

    def _rows(self, n: int) -> slice:
        """This rank's rows of a batch of n (all of them unless data parallel)."""
        if not self.dp:
            return slice(0, n)
        part = n // self.dist.world
        return slice(self.dist.rank * part, (self.dist.rank + 1) * part)

    def _inputs(self, i: int, batch: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw activations for SAE i, one random member layer per token (seeded per step and
        drawn for the whole batch, so a rank's rows get the picks one process would give them)."""
        layers = self.specs[i].layers
        n = next(iter(batch.values())).shape[0]
        rows = self._rows(n)
        if len(layers) == 1:
            x = batch[layers[0]][rows]
            return x, torch.full((x.shape[0],), layers[0])
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + self.step * 131 + self.index[i])
        pick = torch.randint(len(layers), (n,), generator=g)[rows]
        stacked = torch.stack([batch[v][rows] for v in layers])  # [members, rows, D]
        return stacked[pick, torch.arange(pick.shape[0])], torch.tensor(layers)[pick]

    def _total_variances(self, inputs) -> list[torch.Tensor | None]:
        """Data parallel: each SAE's FVU denominator over the whole batch, from every rank's
        rows (two reductions: the mean, then the centred sum of squares)."""
        if not self.dp:
            return [None] * len(inputs)
        xs = [sae.loss_input(x, layer) for sae, (x, layer) in zip(self.saes, inputs)]
        sums = torch.stack([x.double().sum(0) for x in xs]).cpu()
        counts = torch.tensor([float(x.shape[0]) for x in xs], dtype=torch.float64)
        self.dist.all_reduce_many_([sums, counts])
        means = sums / counts[:, None]
        tv = torch.stack([(x - m.to(x.device, x.dtype)).double().pow(2).sum().cpu()
                          for x, m in zip(xs, means)])
        self.dist.all_reduce_(tv)
        return [t.to(self.device, torch.float32) for t in tv]

    def _sync_grads(self, sae: GroupSAE) -> None:
        self.dist.all_reduce_many_([p.grad for p in sae.parameters()])

    def train_batch(self, batch: dict[int, torch.Tensor]) -> dict[str, float]:
        for v in self.layers:
            if not bool(torch.isfinite(batch[v]).all()):
                raise FloatingPointError(f"non-finite activations at layer {v} in step "
                                         f"{self.step}; the cache is damaged or the model "
                                         "overflowed: harvest again (e.g. in float32)")
        n = next(iter(batch.values())).shape[0]
        inputs = [(x.to(self.device), layer.to(self.device))
                  for x, layer in (self._inputs(i, batch) for i in range(len(self.saes)))]
        tvs = self._total_variances(inputs)
        fvus, fired = [], []
        for i, sae in enumerate(self.saes):
            x, layer = inputs[i]
            dead_mask = (self.since_fire[i] >= self.dead_window).to(self.device)
            t0 = time.perf_counter()
            out = train_step(sae, self.opts[i], x, layer=layer,
                             dead_mask=dead_mask if bool(dead_mask.any()) else None,
                             total_variance=tvs[i], grad_sync=self._sync_grads if self.dp
                             else None)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[i] += time.perf_counter() - t0
            f = torch.zeros(self.since_fire[i].shape, dtype=torch.uint8)
            f[out.top_indices[out.top_acts > 0].cpu()] = 1
            fired.append(f)
            fvus.append(out.fvu.double().cpu())
        fvu = torch.stack(fvus)
        if self.dp:  # a latent fired if it fired on any rank; the FVU parts add up
            self.dist.all_reduce_many_(fired, "max")
            self.dist.all_reduce_(fvu)
        dead = []
        for i, f in enumerate(fired):
            self.since_fire[i] += n
            self.since_fire[i][f.bool()] = 0
            dead.append(float((self.since_fire[i] >= self.dead_window).float().mean()))
        self.step += 1
        self.tokens += n
        return {"fvu": float(fvu.mean()), "dead": 100 * sum(dead) / len(dead)}

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {}
        for i, (sae, opt) in enumerate(zip(self.saes, self.opts)):
            for name, p in sae.state_dict().items():
                tensors[f"{i}.{name}"] = p
            for j, st in opt.state_dict()["state"].items():
                for key, t in st.items():
                    tensors[f"{i}.adam.{j}.{key}"] = t
            tensors[f"{i}.since_fire"] = self.since_fire[i]
        meta = {"step": self.step, "tokens": self.tokens, "seconds": self.seconds,
                "specs": [asdict(s) for s in self.specs], "config": asdict(self.cfg),
                "index": self.index, "world": self.dist.world, "data_parallel": self.dp}
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("world", 1) != self.dist.world:
            raise ValueError(f"the checkpoint was written by {meta.get('world', 1)} processes, "
                             f"this run has {self.dist.world}: resume with the same "
                             "`torchrun --nproc_per_node`")
        if meta["specs"] != [asdict(s) for s in self.specs] or meta["config"] != asdict(self.cfg) \
                or meta.get("index", self.index) != self.index \
                or meta.get("data_parallel", False) != self.dp:
            raise ValueError("the checkpoint was written by a run with other SAEs or settings; "
                             "resume with the same flags, or start over with --overwrite")
        for i, (sae, opt) in enumerate(zip(self.saes, self.opts)):
            sae.load_state_dict({n: tensors[f"{i}.{n}"] for n in sae.state_dict()})
            sd = opt.state_dict()
            for j in sd["state"] or range(len(sd["param_groups"][0]["params"])):
                prefix = f"{i}.adam.{j}."
                st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if st:
                    sd["state"][j] = st
            opt.load_state_dict(sd)
            self.since_fire[i] = tensors[f"{i}.since_fire"].clone()
        self.step, self.tokens, self.seconds = meta["step"], meta["tokens"], list(meta["seconds"])

    def rank_folder(self, ckpt_dir: Path) -> Path:
        """checkpoints/ for one process; checkpoints/rank<r>/ for each rank under torchrun."""
        return ckpt_dir if not self.dist.active else ckpt_dir / f"rank{self.dist.rank}"

    def save_checkpoint(self, ckpt_dir: Path) -> Path:
        """Write <rank folder>/step_NNNNNN atomically (temp folder + rename) and drop older ones;
        data parallel keeps the previous one too, so that after a crash the ranks can resume
        from a step that every rank has."""
        folder = self.rank_folder(ckpt_dir)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state()
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta))
        final = folder / f"step_{self.step:06d}"
        if final.exists():  # never a moment without a complete copy of this step on disk
            aside = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-old-"))
            os.replace(final, aside / final.name)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for old in sorted(folder.glob("step_*"))[:-2 if self.dp else -1]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in folder.glob(".tmp-*"):  # left by a process killed while writing
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        return final

    def load_checkpoint(self, ckpt_dir: Path) -> bool:
        """Restore the latest checkpoint (data parallel: the latest that every rank has).
        Returns False if there is none."""
        folder = self.rank_folder(ckpt_dir)
        found = sorted(folder.glob("step_*")) if folder.is_dir() else []
        steps = [int(p.name[5:]) for p in found]
        if self.dp:
            common = set(steps)
            for other in self.dist.gather(steps):
                common &= set(other)
            steps = sorted(common)
        if not steps:
            return False
        latest = folder / f"step_{steps[-1]:06d}"
        self.load_state(load_file(latest / "state.safetensors"),
                        json.loads((latest / "state.json").read_text()))
        return True

    def sae_stats(self) -> dict[int, dict]:
        """{index in specs: {seconds, flops, dead_pct}} for the SAEs this process trained."""
        return {g: {"seconds": self.seconds[i], "flops": self.flops(i),
                    "dead_pct": self.dead_pct(i)} for i, g in enumerate(self.index)}

    # ------------------------------------------------------------------ the loop
    def fit(self, ckpt_dir: Path | None = None, progress: bool = True,
            stop_after: int | None = None, log=None) -> None:
        """One pass over the cache (continuing after a loaded checkpoint). `log(dict, step=)`,
        if given, receives the step's mean FVU, dead % and tokens/s (e.g. wandb's run.log)."""
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train",
                   disable=not progress)
        t0, done0 = time.perf_counter(), self.tokens
        for b, batch in enumerate(batches(self.cache, self.layers, cfg.batch, cfg.seed)):
            if b < self.step:
                continue  # consumed before the checkpoint we resumed from
            stats = self.train_batch(batch)
            rate = (self.tokens - done0) / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(tok_s=f"{rate:.0f}", fvu=f"{stats['fvu']:.3f}",
                            dead=f"{stats['dead']:.1f}%")
            if log is not None:
                log({"fvu": stats["fvu"], "dead_pct": stats["dead"], "tokens_per_s": rate},
                    step=self.step)
            if ckpt_dir is not None and cfg.checkpoint_every and \
                    self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(ckpt_dir)
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        if ckpt_dir is not None and not (cfg.checkpoint_every and
                                         self.step % cfg.checkpoint_every == 0 and self.step):
            self.save_checkpoint(ckpt_dir)  # unless the loop just saved this step

    def dead_pct(self, i: int) -> float:
        return 100.0 * float((self.since_fire[i] >= self.dead_window).float().mean())

    def flops(self, i: int) -> float:
        """Work of SAE i's training so far: encoder GEMM + sparse decode/backward, per token."""
        d, M, k = self.cache.d_model, self.specs[i].num_latents, self.cfg.k
        return float(self.tokens * (2 * d * M + 8 * k * d))


def main(argv: list[str] | None = None) -> dict:
    from lgsae.pipeline import parse_args, run

    tune_cpu_allocator()
    return run(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, OSError, FloatingPointError,
            LaunchError) as e:
        sys.exit(f"lgsae.train: error: {e}")
