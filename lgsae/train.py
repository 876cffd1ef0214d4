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
    dtype: str = "float32"  # SAE parameters: float32 or bfloat16
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
    """All SAEs of a run, their optimizers, dead-latent counters and timings; checkpointable."""

    def __init__(self, specs: list[SAESpec], cache: ActivationCache, cfg: TrainConfig,
                 model_name: str, device: str | torch.device = "cpu"):
        if not specs:
            raise ValueError("no SAEs to train")
        known = set(cache.layers)
        for spec in specs:
            bad = [v for v in spec.layers if v not in known]
            if bad:
                raise ValueError(f"{spec.name}: layers {bad} are not in the activation cache "
                                 f"(it has {cache.layers})")
            if not 1 <= cfg.k <= spec.num_latents:
                raise ValueError(f"{spec.name}: k={cfg.k} must be in [1, {spec.num_latents}] "
                                 "(its number of latents); lower k or raise expansion")
        self.specs, self.cache, self.cfg, self.device = specs, cache, cfg, torch.device(device)
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        scales = cache.scales
        self.saes = [
            GroupSAE(cache.d_model, k=cfg.k, num_latents=s.num_latents, layers=s.layers,
                     scales=[scales[v] for v in s.layers], model=model_name,
                     hookpoints=[f"layers.{v}" for v in s.layers], dtype=dtype, device=device,
                     seed=cfg.seed * 1009 + i)
            for i, s in enumerate(specs)
        ]
        self.opts = [make_optimizer(sae, cfg.lr) for sae in self.saes]
        self.since_fire = [torch.zeros(s.num_latents, dtype=torch.int64) for s in specs]
        self.seconds = [0.0] * len(specs)
        self.step, self.tokens = 0, 0
        self.layers = sorted({v for s in specs for v in s.layers})
        total = (cache.n_stat_tokens // cfg.batch) * cfg.batch
        self.total_steps = total // cfg.batch
        self.dead_window = cfg.dead_window or max(cfg.batch, min(PAPER_DEAD_WINDOW, total // 5))

    def _inputs(self, i: int, batch: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw activations for SAE i, one random member layer per token (seeded per step)."""
        layers = self.specs[i].layers
        n = next(iter(batch.values())).shape[0]
        if len(layers) == 1:
            return batch[layers[0]], torch.full((n,), layers[0])
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + self.step * 131 + i)
        pick = torch.randint(len(layers), (n,), generator=g)
        stacked = torch.stack([batch[v] for v in layers])  # [members, n, D]
        return stacked[pick, torch.arange(n)], torch.tensor(layers)[pick]

    def train_batch(self, batch: dict[int, torch.Tensor]) -> dict[str, float]:
        for v in self.layers:
            if not bool(torch.isfinite(batch[v]).all()):
                raise FloatingPointError(f"non-finite activations at layer {v} in step "
                                         f"{self.step}; the cache is damaged or the model "
                                         "overflowed: harvest again (e.g. in float32)")
        fvus, dead = [], []
        for i, sae in enumerate(self.saes):
            x, layer = self._inputs(i, batch)
            x = x.to(self.device)
            dead_mask = (self.since_fire[i] >= self.dead_window).to(self.device)
            t0 = time.perf_counter()
            out = train_step(sae, self.opts[i], x, layer=layer.to(self.device),
                             dead_mask=dead_mask if bool(dead_mask.any()) else None)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[i] += time.perf_counter() - t0
            fired = torch.zeros_like(self.since_fire[i], dtype=torch.bool)
            fired[out.top_indices[out.top_acts > 0].cpu()] = True
            self.since_fire[i] += x.shape[0]
            self.since_fire[i][fired] = 0
            fvus.append(out.fvu.item())
            dead.append(float((self.since_fire[i] >= self.dead_window).float().mean()))
        self.step += 1
        self.tokens += next(iter(batch.values())).shape[0]
        return {"fvu": sum(fvus) / len(fvus), "dead": 100 * sum(dead) / len(dead)}

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
                "specs": [asdict(s) for s in self.specs], "config": asdict(self.cfg)}
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["specs"] != [asdict(s) for s in self.specs] or meta["config"] != asdict(self.cfg):
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

    def save_checkpoint(self, folder: Path) -> Path:
        """Write checkpoints/step_NNNNNN atomically (temp folder + rename), then drop older ones."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state()
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta))
        final = folder / f"step_{self.step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in folder.glob("step_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, folder: Path) -> bool:
        found = sorted(folder.glob("step_*")) if folder.is_dir() else []
        if not found:
            return False
        latest = found[-1]
        self.load_state(load_file(latest / "state.safetensors"),
                        json.loads((latest / "state.json").read_text()))
        return True

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
        if ckpt_dir is not None:
            self.save_checkpoint(ckpt_dir)

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
    except (ValueError, FileNotFoundError, FileExistsError, OSError, FloatingPointError) as e:
        sys.exit(f"lgsae.train: error: {e}")
