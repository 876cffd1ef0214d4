"""Shared benchmark plumbing: the --scale option, the device, peak memory, the dense twin, the
sparsify peer, and side-by-side ratios printed at the end and stored in the JSON.

    pytest bench/ --benchmark-only [--scale tiny|small|paper] [--benchmark-json RESULTS.json]
    python bench/table.py RESULTS.json [--readme README.md]

Scale: --scale, else $LGSAE_BENCH_SCALE, else small on CPU and paper on CUDA. Device:
$LGSAE_BENCH_DEVICE, else cuda when available.
"""

import os
import platform
import time
from collections.abc import Callable

import pytest
import torch

from lgsae import reference
from lgsae.sae import ForwardOutput, GroupSAE
from lgsae.step import tune_cpu_allocator

# Same process-wide allocator setting the trainer uses (see tune_cpu_allocator); every provider
# runs under it. LGSAE_BENCH_GLIBC_DEFAULTS=1 measures with glibc's defaults instead.
ALLOCATOR_TUNED = os.environ.get("LGSAE_BENCH_GLIBC_DEFAULTS") != "1" and tune_cpu_allocator()
DEVICE = torch.device(os.environ.get("LGSAE_BENCH_DEVICE", "cuda" if torch.cuda.is_available()
                                     else "cpu"))
SCALES = ("tiny", "small", "paper")  # tiny: seconds, to check that the benches run

_MEDIANS: dict[tuple[str, str], float] = {}  # (group, provider) -> median seconds
_SCALE: list[str] = []  # set once by pytest_configure


def pytest_addoption(parser):
    parser.addoption("--scale", choices=SCALES, default=None,
                     help="benchmark sizes: tiny (a smoke test), small (CPU minutes) or paper "
                          "(GPU); default $LGSAE_BENCH_SCALE, else small on CPU, paper on CUDA")


def pytest_configure(config):
    s = (config.getoption("--scale", default=None) or os.environ.get("LGSAE_BENCH_SCALE")
         or ("paper" if DEVICE.type == "cuda" else "small"))
    if s not in SCALES:
        raise pytest.UsageError(f"LGSAE_BENCH_SCALE={s!r}: choose one of {', '.join(SCALES)}")
    _SCALE[:] = [s]


def scale() -> str:
    """The chosen scale, for module-level shape tables (collection runs after pytest_configure)."""
    return _SCALE[0] if _SCALE else os.environ.get("LGSAE_BENCH_SCALE", "small")


def device_name(device: torch.device = DEVICE) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def sync(device: torch.device = DEVICE) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn: Callable[[], object], device: torch.device = DEVICE) -> float | None:
    """Peak of the bytes allocated by one extra call of `fn` above what was live before it.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    at the start. CPU: the call runs under torch.profiler(profile_memory=True); its `[memory]`
    events (+nbytes per allocation, -nbytes per free, by torch's CPU allocator) are summed in time
    order and the maximum of the running sum is taken (None if this torch's profiler does not
    expose them; checked on torch 2.13). Memory that a provider keeps between calls (a
    preallocated output, a reused workspace) is not counted unless freed first.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def measured(fn: Callable[[], object], out: dict) -> Callable[[], object]:
    """`fn` wrapped to put its wall-clock seconds and peak memory into `out` (for runs too long
    to repeat, and so that --benchmark-disable runs still report): out["wall_s"];
    out["peak_memory_mb"] on CUDA (max_memory_allocated above the start); out["peak_rss_mb"] on
    CPU: the process's resident-set high-water mark (VmHWM) during the call, after resetting it
    through /proc/self/clear_refs (Linux); it includes everything resident (model, caches, freed
    heap that glibc keeps), so it is an upper bound of what the call needs. None if unavailable."""

    def wrapped():
        if DEVICE.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats(DEVICE)
            before = torch.cuda.memory_allocated(DEVICE)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current resident set
                ok = True
            except OSError:
                ok = False
        t0 = time.perf_counter()
        result = fn()
        sync()
        out["wall_s"] = time.perf_counter() - t0
        if DEVICE.type == "cuda":
            out["peak_memory_mb"] = (torch.cuda.max_memory_allocated(DEVICE) - before) / 2**20
        else:
            out["peak_rss_mb"] = _vm_hwm_mb() if ok else None
        return result

    return wrapped


def dense_forward(sae: GroupSAE):
    """The same SAE written densely (lgsae.reference.dense_sae_forward: N×M latents, a dense
    decoder GEMM, plain autograd), with GroupSAE.forward's signature and input scaling; pass it as
    `forward=` to lgsae.step.train_step."""

    def forward(x, layer=None, dead_mask=None, total_variance=None):
        if total_variance is not None:
            raise NotImplementedError("the dense twin computes its own FVU denominator; "
                                      "it is for one process, not data parallel")
        s = sae.scale_for(layer, x.shape[0])
        d = reference.dense_sae_forward((x * s).to(sae.dtype), sae.encoder.weight,
                                        sae.encoder.bias, sae.W_dec, sae.b_dec, sae.k, dead_mask,
                                        sae.k_aux if dead_mask is not None else 0)
        return ForwardOutput((d.recon / s).to(x.dtype), d.top_acts, d.top_indices, d.fvu,
                             d.auxk_loss)

    return forward


def import_sparsify():
    """The `sparsify` module (eai-sparsify, `pip install -e .[peers]`), or skip with the reason.

    sparsify picks its Triton decoder at import whenever triton imports, and that decoder fails
    on CPU tensors: on CPU we ask for its eager decoder (SPARSIFY_DISABLE_TRITON=1) first."""
    if DEVICE.type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify
    except ImportError as e:
        pytest.skip(f"sparsify is not importable ({e}); install the peers extra: "
                    "python -m pip install -e '.[peers]'")
    return sparsify


def sparsify_coder(state: dict[str, torch.Tensor], k: int):
    """A sparsify.SparseCoder with W_dec's shape, dtype and device and a copy of `state`
    (`encoder.weight`, `encoder.bias`, `W_dec`, `b_dec`: a GroupSAE's state_dict)."""
    sparsify = import_sparsify()
    M, D = state["W_dec"].shape
    sc = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=M, k=k),
                              device=state["W_dec"].device, dtype=state["W_dec"].dtype)
    sc.load_state_dict(state)
    return sc


@pytest.fixture
def record():
    """record(benchmark, group, provider): keep the median for the ratio table and label the
    JSON entry (extra_info group, provider, baseline = the group's first provider)."""

    def _record(benchmark, group: str, provider: str) -> None:
        if benchmark.stats is None:  # --benchmark-disable
            return
        _MEDIANS[(group, provider)] = benchmark.stats.stats.median
        base = next(p for (g, p) in _MEDIANS if g == group)
        benchmark.extra_info.update(group=group, provider=provider, baseline=base)

    return _record


def median(group: str, provider: str) -> float | None:
    """A median recorded earlier in this session (None if that benchmark did not run)."""
    return _MEDIANS.get((group, provider))


def ratios() -> dict[str, dict[str, float]]:
    """Per group: every provider's median divided by the first provider recorded in that group."""
    out: dict[str, dict[str, float]] = {}
    for (group, provider), t in _MEDIANS.items():
        base = next(v for (g, _), v in _MEDIANS.items() if g == group)
        out.setdefault(group, {})[provider] = t / base
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["lgsae_ratios"] = ratios()
    output_json["lgsae_allocator_tuned"] = ALLOCATOR_TUNED
    output_json["lgsae_command"] = " ".join(["pytest", *config.invocation_params.args])
    output_json["lgsae_scale"] = scale()
    output_json["lgsae_device"] = device_name()


def pytest_terminal_summary(terminalreporter):
    r = ratios()
    if not r:
        return
    terminalreporter.section("lgsae: median time relative to the group's first provider")
    terminalreporter.write_line(f"scale {scale()}, {device_name()}; glibc allocator tuned "
                                f"(lgsae.step.tune_cpu_allocator): {ALLOCATOR_TUNED}")
    for group, row in r.items():
        cells = "  ".join(f"{p}={v:.2f}x" for p, v in row.items())
        terminalreporter.write_line(f"{group}: {cells}")
