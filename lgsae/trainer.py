"""The multi-SAE trainer: every SAE of a run (or this rank's share) on the same batches.

The trainer takes batches {layer: [n, D]} from any iterator and knows nothing of where they come
from (lgsae.sources, lgsae.buffer). A group SAE draws, for every token of a batch, one member layer
at random, so it sees as many tokens per step as a single-layer SAE (DESIGN §1). Checkpoints:
lgsae.checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from lgsae.capture import KEEP
from lgsae.config import TrainConfig
from lgsae.dist import Dist
from lgsae.plan import SAESpec, sae_flops_per_token
from lgsae.sae import GroupSAE
from lgsae.step import make_optimizer, paper_lr, train_step

PAPER_DEAD_WINDOW = 10_000_000  # tokens without a firing before a latent counts as dead


class Trainer:
    """The SAEs of a run (or this rank's share of them), their optimizers, dead-latent counters
    and timings; checkpointable.

    `hook_prefix`: the block list's module path in the base model (lgsae.capture.block_paths),
    for the SAEs' hookpoints. `owned`: indices into `specs` that this process trains (default:
    all). Seeds follow the index
    in `specs`, so an SAE comes out the same whichever rank trains it. `dist` with
    `data_parallel=True`: every rank holds every owned SAE and trains on its 1/world of each
    batch, with gradients, FVU denominators and dead-latent counters reduced over the ranks.
    """

    def __init__(self, specs: list[SAESpec], cfg: TrainConfig, model_name: str, *,
                 d_model: int, scales: dict[int, float], total_tokens: int,
                 device: str | torch.device = "cpu", owned: list[int] | None = None,
                 dist: Dist | None = None, data_parallel: bool = False,
                 hook_prefix: str = "layers"):
        if not specs:
            raise ValueError("no SAEs to train")
        cfg = cfg.for_device(device)  # an unset --batch / --dtype: the device's default
        self.dist = dist or Dist(device=torch.device(device))
        self.dp = data_parallel and self.dist.active
        if self.dp and cfg.batch % self.dist.world:
            raise ValueError(f"data parallel splits each batch over the ranks: --batch "
                             f"{cfg.batch} must be a multiple of the world size {self.dist.world}")
        self.index = list(range(len(specs))) if owned is None else list(owned)
        known = set(scales)
        for spec in specs:
            bad = [v for v in spec.layers if v not in known]
            if bad:
                raise ValueError(f"{spec.name}: layers {bad} have no scale (known layers: "
                                 f"{sorted(known)})")
            if not 1 <= cfg.k <= spec.num_latents:
                raise ValueError(f"{spec.name}: k={cfg.k} must be in [1, {spec.num_latents}] "
                                 "(its number of latents); lower k or raise expansion")
        self.specs = [specs[i] for i in self.index]
        # each SAE's seed key (initialisation and layer draws): its index in `specs`, except that
        # a variant ("groups+b_dec") takes that of the plain SAE over the same layers, so the
        # two start alike and see the same rows: an ablation differs only in the option
        first = {}
        for j, sp in enumerate(specs):
            first.setdefault((sp.method, tuple(sp.layers)), j)
        self.seed_keys = [first.get((specs[i].method.split("+")[0], tuple(specs[i].layers)), i)
                          for i in self.index]
        self.cfg, self.device, self.d_model = cfg, torch.device(device), d_model
        # bf16: matmuls in bf16, parameters and Adam in fp32 (pure-bf16 parameters drift: at 49k
        # tokens the default run's group FVU was 3.6 % worse than fp32, bench/bench_e2e.py)
        compute = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        self.saes = [
            GroupSAE(d_model, k=cfg.k, num_latents=s.num_latents, layers=s.layers,
                     scales=[scales[v] for v in s.layers], model=model_name,
                     hookpoints=[f"{hook_prefix}.{v}" for v in s.layers], device=device,
                     seed=cfg.seed * 1009 + g, compute_dtype=compute,
                     encoder_norm=cfg.encoder_norm, layer_params=s.layer_params)
            for g, s in zip(self.seed_keys, self.specs)
        ]
        self.opts = [make_optimizer(sae, cfg.lr if cfg.lr is not None else
                                    cfg.lr_scale * paper_lr(sae.num_latents))
                     for sae in self.saes]
        self.since_fire = [torch.zeros(s.num_latents, dtype=torch.int64) for s in self.specs]
        # firings per (member layer, latent) and kept tokens per member layer, this rank's rows:
        # the training firing rates that exports carry (SAELens's sparsity.safetensors)
        self.fire_counts = [torch.zeros(len(s.layers), s.num_latents, dtype=torch.int64,
                                        device=device) for s in self.specs]
        self.layer_tokens = [torch.zeros(len(s.layers), dtype=torch.int64, device=device)
                             for s in self.specs]
        self.seconds = [0.0] * len(self.specs)
        # the finiteness guard without a device read (fused Adam skips a bad update on the device;
        # train_batch reads the losses in its one copy per step); on the CPU the read is free
        # (not data parallel: there a non-finite loss on one rank reaches every rank's summed
        # gradients, and the eager guard stops the step before the all-reduce)
        self.lazy_check = self.device.type == "cuda" and not self.dp
        self._laps: list[tuple] = []  # CUDA (sae, start, end) events not yet added to seconds
        self.step, self.tokens, self.kept = 0, 0, 0  # stream positions, of which trained on
        self.layers = sorted({v for s in self.specs for v in s.layers})
        self.total_steps = total_tokens // cfg.batch
        total = self.total_steps * cfg.batch
        # default window: 1/24 of the run (4,096 tokens at the default 98,304; bench/parity.py:
        # a fifth of the run let a fast-learning SAE lose 8 % of its latents for good)
        self.dead_window = cfg.dead_window or max(cfg.batch, min(PAPER_DEAD_WINDOW, total // 24))
        # A group SAE's latent sees each member layer on 1/|g| of its tokens: its window is
        # |g| times longer, so a latent that fires on one member layer as often as a healthy
        # per-layer latent does is not flagged dead (and pushed by AuxK) |g| times sooner. Capped
        # at half the run (never below the base window), so that AuxK still acts in every SAE
        # of a short run (the cap binds only when |g| x window > tokens / 2).
        self.windows = [min(self.dead_window * len(s.layers), max(self.dead_window, total // 2))
                        for s in self.specs]

    def _rows(self, n: int) -> slice:
        """This rank's rows of a batch of n (all of them unless data parallel)."""
        if not self.dp:
            return slice(0, n)
        part = n // self.dist.world
        return slice(self.dist.rank * part, (self.dist.rank + 1) * part)

    def _inputs(self, i: int, batch: dict[int, torch.Tensor], keep: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw activations for SAE i, one random member layer per token (seeded per step and
        drawn for the whole batch, so a rank's rows get the picks one process would give them),
        without the rows `keep` marks False (special-token positions)."""
        layers = self.specs[i].layers
        n = batch[layers[0]].shape[0]
        rows = self._rows(n)
        if len(layers) == 1:
            x, layer = batch[layers[0]][rows], torch.full((len(range(n)[rows]),), layers[0])
        else:
            g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + self.step * 131
                                              + self.seed_keys[i])
            pick = torch.randint(len(layers), (n,), generator=g)[rows]
            stacked = torch.stack([batch[v][rows] for v in layers])  # [members, rows, D]
            x, layer = stacked[pick, torch.arange(pick.shape[0])], torch.tensor(layers)[pick]
        if keep is None:
            return x, layer
        k = keep[rows]
        return x[k], layer[k]

    def _batch_means(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """[SAEs, D] fp64 (host): each SAE's mean over the batch rows xs[i] (scaled space), over
        every rank's rows when data parallel."""
        sums = torch.stack([x.double().sum(0) for x in xs]).cpu()
        counts = torch.tensor([float(x.shape[0]) for x in xs], dtype=torch.float64)
        if self.dp:
            self.dist.all_reduce_many_([sums, counts])
        return sums / counts[:, None]

    def _total_variances(self, inputs) -> list[torch.Tensor | None]:
        """Data parallel: each SAE's FVU denominator over the whole batch, from every rank's
        rows (two reductions: the mean, then the centred sum of squares)."""
        if not self.dp:
            return [None] * len(inputs)
        xs = [sae.loss_input(x, layer) for sae, (x, layer) in zip(self.saes, inputs)]
        means = self._batch_means(xs)
        tv = torch.stack([(x - m.to(x.device, x.dtype)).double().pow(2).sum().cpu()
                          for x, m in zip(xs, means)])
        self.dist.all_reduce_(tv)
        return [t.to(self.device, torch.float32) for t in tv]

    @torch.no_grad()
    def _init_b_dec(self, inputs) -> None:
        """Before the first step: every SAE's b_dec at its first batch's mean in the scaled
        space, and a per-member-layer Δb_dec at each layer's own mean minus that
        (GroupSAE.init_b_dec_; over every rank's rows when data parallel, so all ranks start
        alike)."""
        parts = [sae.layer_sums(sae.loss_input(x, layer), sae.layer_pos(layer, x.shape[0]))
                 for sae, (x, layer) in zip(self.saes, inputs)]
        sums = [s.cpu() for s, _ in parts]
        counts = [c.cpu() for _, c in parts]
        if self.dp:
            self.dist.all_reduce_many_(sums + counts)
        for sae, s, c in zip(self.saes, sums, counts):
            sae.init_b_dec_from_sums_(s, c)

    def _sync_grads(self, sae: GroupSAE) -> None:
        self.dist.all_reduce_many_([p.grad for p in sae.parameters()])

    def train_batch(self, batch: dict[int, torch.Tensor]) -> dict[str, float]:
        for v in self.layers:
            if not bool(torch.isfinite(batch[v]).all()):
                raise FloatingPointError(f"non-finite activations at layer {v} in step "
                                         f"{self.step}; the model overflowed or the cache is "
                                         "damaged: try --model-dtype float32 (or delete the "
                                         "cache)")
        keep = batch.get(KEEP)
        n = batch[self.layers[0]].shape[0]
        kept = n if keep is None else int(keep.sum())  # not special-token positions
        # rows on the device; each row's layer stays on the host for the forward (validated
        # there without a device read) and goes to the device for the firing counts
        # host -> device copies without a stream sync (pageable memory is staged at once)
        inputs = [(x.to(self.device, non_blocking=True), layer)
                  for x, layer in (self._inputs(i, batch, keep) for i in range(len(self.saes)))]
        if self.step == 0 and self.cfg.init_b_dec == "mean":
            self._init_b_dec(inputs)
        tvs = self._total_variances(inputs)
        fvus, auxks, fired = [], [], []
        for i, sae in enumerate(self.saes):
            x, layer = inputs[i]
            # the dead mask stays on the host, where the counters live: the AuxK branch and its
            # dead-latent indices are decided there, with no device read
            dead = self.dead_latents(i)
            start = self._clock()
            out = train_step(sae, self.opts[i], x, layer=layer,
                             dead_mask=dead if bool(dead.any()) else None,
                             total_variance=tvs[i], grad_sync=self._sync_grads if self.dp
                             else None, lazy_check=self.lazy_check)
            self._lap(i, start)
            # which latents fired, counted on the device (no boolean indexing: no host sync)
            f = torch.zeros(sae.num_latents, dtype=torch.int32, device=self.device)
            f.index_add_(0, out.top_indices.reshape(-1), (out.top_acts > 0).reshape(-1).int())
            fired.append(f)
            self._count_by_layer(i, inputs[i][1].to(self.device, non_blocking=True), out)
            fvus.append(out.fvu.detach().double())
            auxks.append(out.auxk_loss.detach().double())
        # one device -> host copy per step for every SAE's firing flags, FVU and AuxK loss
        sizes, S = [f.numel() for f in fired], len(self.saes)
        flat = torch.cat([torch.cat(fired).double(), torch.stack(fvus),
                          torch.stack(auxks)]).cpu()
        fired = [(t > 0).to(torch.uint8) for t in flat[:sum(sizes)].split(sizes)]
        fvu, auxk = flat[sum(sizes):sum(sizes) + S], flat[sum(sizes) + S:]
        self._settle()  # the copy waited for the step: the timing events are complete
        bad = [i for i in range(S) if not (math.isfinite(fvu[i]) and math.isfinite(auxk[i]))]
        if bad:  # lazy_check: the optimizer skipped these SAEs' updates on the device
            i = bad[0]
            raise FloatingPointError(
                f"non-finite loss (fvu={float(fvu[i]):.4g}, auxk={float(auxk[i]):.4g}) for "
                f"{self.specs[i].name} (layers {self.specs[i].layers}) in step {self.step}: its "
                "update was skipped, so the weights are those of the step before; the batch "
                "needs >= 2 tokens with non-zero variance and finite activations")
        if self.dp:  # a latent fired if it fired on any rank; the FVU parts add up
            self.dist.all_reduce_many_(fired, "max")
            self.dist.all_reduce_(fvu)
        dead = []
        for i, f in enumerate(fired):
            self.count_fires(i, f.bool(), kept)
            dead.append(float(self.dead_latents(i).float().mean()))
        self.step += 1
        self.tokens += n
        self.kept += kept
        return {"fvu": float(fvu.mean()), "dead": 100 * sum(dead) / len(dead)}

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every tensor (SAE weights, Adam moments, dead counters) and the metadata a resume
        checks; the stream position is the step (lgsae.buffer rebuilds the rest)."""
        tensors = {}
        for i, (sae, opt) in enumerate(zip(self.saes, self.opts)):
            for name, p in sae.state_dict().items():
                tensors[f"{i}.{name}"] = p
            for j, st in opt.state_dict()["state"].items():
                for key, t in st.items():
                    tensors[f"{i}.adam.{j}.{key}"] = t
            tensors[f"{i}.since_fire"] = self.since_fire[i]
            tensors[f"{i}.fire_counts"] = self.fire_counts[i]
            tensors[f"{i}.layer_tokens"] = self.layer_tokens[i]
        meta = {"step": self.step, "tokens": self.tokens, "kept": self.kept,
                "windows": self.windows,
                "seconds": self.seconds,
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
                or meta.get("data_parallel", False) != self.dp \
                or meta.get("windows") != self.windows:
            raise ValueError("the checkpoint was written by a run with other SAEs or settings "
                             "(or by an older lgsae); resume with the same flags and version, "
                             "or start over with --overwrite")
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
            if f"{i}.fire_counts" not in tensors:
                raise ValueError("the checkpoint was written by an older lgsae (no firing "
                                 "counts); start over with --overwrite")
            self.fire_counts[i] = tensors[f"{i}.fire_counts"].to(self.device)
            self.layer_tokens[i] = tensors[f"{i}.layer_tokens"].to(self.device)
        self.step, self.tokens, self.seconds = meta["step"], meta["tokens"], list(meta["seconds"])
        self.kept = meta.get("kept", self.tokens)

    def sae_stats(self) -> dict[int, dict]:
        """{index in specs: {seconds, flops, dead_pct}} for the SAEs this process trained."""
        return {g: {"seconds": self.seconds[i], "flops": self.flops(i),
                    "dead_pct": self.dead_pct(i), "dead_window": self.windows[i]}
                for i, g in enumerate(self.index)}

    # ------------------------------------------------------------------ the loop
    def fit(self, batches: Iterable[dict[int, torch.Tensor]], checkpoints=None,
            progress: bool = True, stop_after: int | None = None, log=None,
            on_step=None) -> None:
        """Train on `batches` (which must start at batch `self.step`: after a loaded checkpoint,
        the source is asked for that position, never replayed). `on_step(trainer)`, if given,
        runs after every step, before a checkpoint is due (milestone snapshots). `checkpoints`: an
        lgsae.checkpoint.Checkpoints that saves when due and at the end. `log(dict, step=)`, if
        given, receives the step's mean FVU, dead % and tokens/s (e.g. wandb's run.log)."""
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train",
                   disable=not progress)
        t0, done0 = time.perf_counter(), self.tokens
        for batch in batches:
            if self.step >= self.total_steps:
                break
            stats = self.train_batch(batch)
            rate = (self.tokens - done0) / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(tok_s=f"{rate:.0f}", fvu=f"{stats['fvu']:.3f}",
                            dead=f"{stats['dead']:.1f}%")
            if log is not None:
                log({"fvu": stats["fvu"], "dead_pct": stats["dead"], "tokens_per_s": rate},
                    step=self.step)
            if on_step is not None:
                on_step(self)
            if checkpoints is not None and checkpoints.due():
                checkpoints.save(self)
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        if checkpoints is not None and checkpoints.saved_step != self.step:
            checkpoints.save(self)  # at the end (unless this step was just saved)

    def _clock(self):
        """A start mark for SAE step timing: a CUDA event (no host sync), else the wall clock."""
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def _lap(self, i: int, start) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._laps.append((i, start, end))
        else:
            self.seconds[i] += time.perf_counter() - start

    def _settle(self) -> None:
        """Add the recorded CUDA laps to the per-SAE seconds (their events have completed)."""
        for i, start, end in self._laps:
            self.seconds[i] += start.elapsed_time(end) / 1000
        self._laps.clear()

    def _count_by_layer(self, i: int, layer: torch.Tensor, out) -> None:
        """Add one step's firings of SAE i per member layer (on its device, no host sync)."""
        sae = self.saes[i]
        pos = sae._layer_pos[layer]  # member index of each row's layer
        M = sae.num_latents
        flat = (pos[:, None] * M + out.top_indices).reshape(-1)
        self.fire_counts[i].view(-1).index_add_(0, flat, (out.top_acts > 0).reshape(-1).long())
        self.layer_tokens[i].index_add_(0, pos, torch.ones_like(pos))

    def firing(self, i: int) -> dict[str, torch.Tensor]:
        """SAE i's training firing counts {"counts": [members, M], "tokens": [members]}, summed
        over the ranks when data parallel (a collective: every rank calls it)."""
        counts, tokens = self.fire_counts[i].cpu().clone(), self.layer_tokens[i].cpu().clone()
        if self.dp:
            self.dist.all_reduce_many_([counts, tokens])
        return {"counts": counts, "tokens": tokens}

    def count_fires(self, i: int, fired: torch.Tensor, tokens: int) -> None:
        """After a step of `tokens` kept tokens in which SAE i's latents `fired` ([M] bool)."""
        self.since_fire[i] += tokens
        self.since_fire[i][fired] = 0

    def dead_latents(self, i: int) -> torch.Tensor:
        """[M] bool: SAE i's latents without a firing in its window (dead_window x |g|)."""
        return self.since_fire[i] >= self.windows[i]

    def dead_pct(self, i: int) -> float:
        return 100.0 * float(self.dead_latents(i).float().mean())

    def flops(self, i: int) -> float:
        """Work of SAE i's training so far: encoder GEMM + sparse decode/backward, per token."""
        return float(self.kept * sae_flops_per_token(self.specs[i], self.d_model, self.cfg.k))

