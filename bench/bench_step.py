"""One full SAE training step: ours (sparse path) vs the same SAE written densely vs sparsify's
SparseCoder, and the floor (encoder GEMM + top-k alone). Run:
pytest bench/bench_step.py --benchmark-only [--scale small|paper]

Targets (issue 6, CPU, N=4096, D=576, M=9216, K=32): fp32 `sparse` <= 1.3x `gemm_topk` and
>= 1.4x faster than `sparsify`; bf16 `sparse` >= 2x faster than fp32 `sparsify`
(extra_info `speedup_vs_sparsify_fp32`). GPU: >= 2x faster than `sparsify` (Triton decoder) and
peak memory <= 0.5x sparsify's.

Timed, one call each (`test_step`: no dead latents, so no AuxK pass in any provider;
`test_step_with_dead_latents`: 1 % and 3 % dead, AuxK in ours and sparsify's):
- `gemm_topk`: encoder GEMM into a preallocated [N, M] buffer + torch.topk (the floor);
- `sparse`: lgsae.step.train_step on GroupSAE (Triton on CUDA, lgsae.reference on CPU); in bf16
  as the trainer's bf16 option runs it: bf16 matmuls over fp32 master weights and fp32 Adam;
- `dense`: the same step with the dense twin (conftest.dense_forward) as the forward;
- `sparsify`: its trainer's step (sparsify/trainer.py, 1.3.3): forward(x, dead_mask) with an
  all-False mask, fvu + auxk/32 + multi_topk_fvu/8, backward, remove the decoder-parallel
  gradient, Adam step, zero_grad, renorm the decoder; same weights, same Adam (fused, paper lr).
  No grad-norm clip (sparsify's trainer has none; ours clips at 1.0). On CUDA it runs as in its
  trainer: forward under its own bf16 autocast, TF32 matmuls.
Providers share one group per shape and dtype; the first (`gemm_topk`) is the denominator.
`test_step_over_floor_paired` times floor and step back to back per round (the ratio to quote on
a drifting VM); `test_step_parts` (CPU) times each part inside our step next to the floor.

extra_info: flops = the sparse step's useful work N·(2DM + 8KD) for every step provider (2NDM for
`gemm_topk`), so flop_per_s is an effective rate; bytes = the minimum traffic, x once and 8
passes over each of W_enc and W_dec (parameter, gradient, two Adam moments); peak_memory_mb =
conftest.peak_memory_mb of one extra step (`sparse` frees its reused workspace first, so it is
counted; `gemm_topk`'s preallocated buffer is not).
"""

import statistics
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import (
    DEVICE,
    dense_forward,
    device_name,
    median,
    peak_memory_mb,
    scale,
    sparsify_coder,
    sync,
)

from lgsae import GroupSAE, reference
from lgsae.step import AUXK_COEF, make_optimizer, train_step

SHAPES = {  # name -> (N, D, M, K)
    "tiny": (512, 64, 512, 8),
    "small": (4096, 576, 9216, 32),  # the CPU shape (SmolLM2 width, expansion 16)
    "paper": (16384, 768, 12288, 128),
}
PROVIDERS = ["gemm_topk", "sparse", "dense", "sparsify"]


@contextmanager
def _sparsify_precision():
    """sparsify's Trainer.fit sets float32 matmul precision "high" (TF32) on CUDA for its run."""
    if DEVICE.type != "cuda":
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _dead_mask(M: int, frac: float) -> torch.Tensor:
    """A fixed set of round(frac·M) dead latents (seeded), on the benchmark device."""
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(7))[:round(frac * M)]] = True
    return dead.to(DEVICE)


def _step_fn(provider: str, sae: GroupSAE, x: torch.Tensor, dead_frac: float = 0.0):
    N, K = x.shape[0], sae.k
    dead = _dead_mask(sae.num_latents, dead_frac)
    if provider == "gemm_topk":
        W, b = sae.encoder.weight.detach(), sae.encoder.bias.detach()
        pre = torch.empty(N, sae.num_latents, device=DEVICE, dtype=x.dtype)
        return lambda: torch.addmm(b, x, W.t(), out=pre).topk(K, dim=1, sorted=False)
    if provider == "sparsify":
        sc = sparsify_coder(sae.state_dict(), sae.k)
        opt = make_optimizer(sc)  # duck-typed: parameters() and num_latents

        def step():
            with _sparsify_precision():
                out = sc(x, dead_mask=dead)
                loss = out.fvu + AUXK_COEF * out.auxk_loss + out.multi_topk_fvu / 8
                loss.backward()
                sc.remove_gradient_parallel_to_decoder_directions()
                opt.step()
                opt.zero_grad()
                sc.set_decoder_norm_to_unit_norm()
            return out

        return step
    opt = make_optimizer(sae)
    fwd = dense_forward(sae) if provider == "dense" else None
    mask = dead if dead_frac > 0 else None  # as the trainer passes it: None when none is dead
    return lambda: train_step(sae, opt, x, forward=fwd, dead_mask=mask)


def _timed(provider: str, dtype: torch.dtype, dead_frac: float = 0.0):
    """One provider's step at the scale's shape, synchronised: (shape, timed fn)."""
    N, D, M, K = SHAPES[scale()]
    torch.manual_seed(0)
    # our bf16 option (TrainConfig dtype="bfloat16") is bf16 matmuls over fp32 master weights;
    # the floor, the dense twin and sparsify run with bf16 parameters
    mixed = provider == "sparse" and dtype != torch.float32
    sae = GroupSAE(D, k=K, num_latents=M, dtype=torch.float32 if mixed else dtype, device=DEVICE,
                   seed=0, compute_dtype=dtype if mixed else None)
    x = torch.randn(N, D, device=DEVICE, dtype=dtype)
    run = _step_fn(provider, sae, x, dead_frac)

    def timed():
        out = run()
        sync()
        return out
    return (N, D, M, K), timed


def _time_step(benchmark, provider: str, dtype: torch.dtype, dead_frac: float = 0.0):
    """Time one provider's step at the scale's shape; returns (shape, dtype name, timed fn)."""
    (N, D, M, K), timed = _timed(provider, dtype, dead_frac)

    # CPU: 15 rounds after 2 warm-ups (the first allocates the workspace and Adam's state); with
    # 7, the 2-core CI VM's minute-to-minute drift moved a median by up to 10 %. The dense twin
    # (seconds a step, never a headline ratio) keeps 5.
    rounds = 20 if DEVICE.type != "cpu" else 5 if provider == "dense" else 15
    benchmark.pedantic(timed, warmup_rounds=2, rounds=rounds)
    return (N, D, M, K), str(dtype).removeprefix("torch."), timed


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step(benchmark, record, provider, dtype):
    (N, D, M, K), name, timed = _time_step(benchmark, provider, dtype)
    group = f"step N={N} D={D} M={M} K={K} {name}"
    record(benchmark, group, provider)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to report
        return
    reference.free_workspace()
    t = benchmark.stats.stats.median
    es = dtype.itemsize
    flops = 2 * N * D * M if provider == "gemm_topk" else N * (2 * D * M + 8 * K * D)
    moved = es * ((N * D + M * D + 2 * N * M) if provider == "gemm_topk"
                  else (N * D + 16 * M * D))
    benchmark.extra_info.update(
        N=N, D=D, M=M, K=K, dtype=name, device=device_name(), scale=scale(), flops=flops,
        flop_per_s=flops / t, gb_per_s=moved / t / 1e9, peak_memory_mb=peak_memory_mb(timed))
    base = median(group.replace(name, "float32"), "sparsify")
    if provider == "sparse" and dtype != torch.float32 and base is not None:
        benchmark.extra_info["speedup_vs_sparsify_fp32"] = base / t


@pytest.mark.parametrize("provider", ["gemm_topk", "sparse", "sparsify"])
@pytest.mark.parametrize("dead_frac", [0.01, 0.03], ids=["dead1pct", "dead3pct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_with_dead_latents(benchmark, record, provider, dead_frac, dtype):
    """The step with AuxK running: 1 % and 3 % of the latents dead (k_aux = D/2 in both SAEs;
    at M=9216 that is 92 and 276 dead latents, either side of the fused AuxK's 256)."""
    (N, D, M, K), name, _ = _time_step(benchmark, provider, dtype, dead_frac)
    record(benchmark, f"step+AuxK {dead_frac:.0%} dead N={N} D={D} M={M} K={K} {name}",
           provider)
    if benchmark.stats is not None:
        reference.free_workspace()
        benchmark.extra_info.update(N=N, D=D, M=M, K=K, dtype=name, device=device_name(),
                                    scale=scale(), dead=round(dead_frac * M))


@pytest.mark.parametrize("dead_frac", [0.0, 0.03], ids=["none_dead", "dead3pct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_over_floor_paired(benchmark, record, dtype, dead_frac):
    """Our step over its floor, as pairs: each round times the floor (`gemm_topk`) and then our
    step (`sparse`), back to back, and the note is the median of the per-round ratios with its
    quartiles. The rows above take each provider's median over rounds a minute apart; on the
    2-core CI VM, whose speed drifts by 10-20 % between minutes, that moves a ratio by as much.
    Pairs taken a second apart share the drift. The timed quantity is the pair."""
    (N, D, M, K), floor = _timed("gemm_topk", dtype, dead_frac)
    _, step = _timed("sparse", dtype, dead_frac)
    times: list[tuple[float, float]] = []

    def pair():
        t0 = time.perf_counter()
        floor()
        t1 = time.perf_counter()
        step()
        times.append((t1 - t0, time.perf_counter() - t1))

    benchmark.pedantic(pair, warmup_rounds=2, rounds=21 if DEVICE.type == "cpu" else 30)
    name = str(dtype).removeprefix("torch.")
    record(benchmark, f"step/floor paired, {dead_frac:.0%} dead N={N} D={D} M={M} K={K} {name}",
           "sparse")
    if benchmark.stats is None:
        return
    reference.free_workspace()
    kept = times[2:]  # the warm-up rounds went through pair() too
    q = statistics.quantiles([s / f for f, s in kept], n=4)
    benchmark.extra_info.update(
        N=N, D=D, M=M, K=K, dtype=name, device=device_name(), scale=scale(),
        dead=round(dead_frac * M), step_over_floor=q[1],
        step_over_floor_quartiles=f"{q[0]:.3f}-{q[2]:.3f}",
        floor_ms=statistics.median(f for f, _ in kept) * 1e3,
        step_ms=statistics.median(s for _, s in kept) * 1e3)


# Where our step's time goes, part by part (CPU: every op runs its lgsae.reference twin, so
# wrapping those functions catches them; the GEMM + top-k is inside `encode`).
STEP_PARTS = {
    "encode": (reference, "topk_encode"),
    "decode": (reference, "sparse_decode"),
    "decode_backward": (reference, "sparse_decode_backward"),
    "encode_backward": (reference, "topk_encode_backward"),
    "decoder_projection": (reference, "project_decoder_grad_"),
    "grad_norm": (torch.nn.utils, "get_total_norm"),
    "renorm": (reference, "renorm_decoder_"),
}


@contextmanager
def _part_timers(spent: dict[str, list[float]], opt: torch.optim.Optimizer):
    """Wrap each STEP_PARTS function (and opt.step as `adam`) so that every call adds its
    seconds to spent[part][-1]; restores them on exit."""
    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name][-1] += time.perf_counter() - t0
        return wrapper

    saved = [(owner, attr, getattr(owner, attr)) for owner, attr in STEP_PARTS.values()]
    try:
        for name, (owner, attr) in STEP_PARTS.items():
            setattr(owner, attr, timed(name, getattr(owner, attr)))
        opt.step = timed("adam", opt.step)  # an instance attribute over the class's method
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
        del opt.step


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the parts are the reference ops (CPU path)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_parts(benchmark, record, dtype):
    """Our step (no dead latents) with each of its parts timed inside it: the encode (GEMM +
    top-k, and ReLU on the K chosen), the sparse decode and both sparse backward products, the
    decoder projection, the grad norm, fused Adam and the renorm; `rest` is the step minus all
    of them (the casts of the master weights, the loss's elementwise work and autograd). Each
    round runs the floor (`gemm_topk`) first, so the parts can be read against it. The note
    gives each part's median over the rounds, in ms; the timed quantity is floor + step."""
    N, D, M, K = SHAPES[scale()]
    torch.manual_seed(0)
    mixed = dtype != torch.float32
    sae = GroupSAE(D, k=K, num_latents=M, dtype=torch.float32, seed=0,
                   compute_dtype=dtype if mixed else None)
    x = torch.randn(N, D, dtype=dtype)
    opt = make_optimizer(sae)
    _, floor = _timed("gemm_topk", dtype)
    spent: dict[str, list[float]] = {name: [] for name in [*STEP_PARTS, "adam", "step"]}
    floors: list[float] = []

    def step():
        t0 = time.perf_counter()
        floor()
        floors.append(time.perf_counter() - t0)
        for v in spent.values():
            v.append(0.0)
        t0 = time.perf_counter()
        train_step(sae, opt, x)
        spent["step"][-1] = time.perf_counter() - t0

    with _part_timers(spent, opt):
        benchmark.pedantic(step, warmup_rounds=2, rounds=15)
    name = str(dtype).removeprefix("torch.")
    record(benchmark, f"step parts N={N} D={D} M={M} K={K} {name}", "sparse")
    if benchmark.stats is None:
        return
    reference.free_workspace()
    kept = {part: v[2:] for part, v in spent.items()}  # the warm-up rounds called step() too
    rest = [s - sum(v[i] for part, v in kept.items() if part != "step")
            for i, s in enumerate(kept["step"])]
    ms = {part: statistics.median(v) * 1e3
          for part, v in [("floor", floors[2:]), *kept.items(), ("rest", rest)]}
    assert all(len(v) == len(rest) for v in kept.values())
    benchmark.extra_info.update(N=N, D=D, M=M, K=K, dtype=name, device=device_name(),
                                scale=scale(), parts_ms={p: round(t, 2) for p, t in ms.items()})
