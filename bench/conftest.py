"""Shared benchmark plumbing: side-by-side ratios printed at the end and stored in the JSON."""

import os
import platform

import pytest
import torch

from lgsae.step import tune_cpu_allocator

# Same process-wide allocator setting the trainer uses (see tune_cpu_allocator); every provider
# runs under it. LGSAE_BENCH_GLIBC_DEFAULTS=1 measures with glibc's defaults instead.
ALLOCATOR_TUNED = os.environ.get("LGSAE_BENCH_GLIBC_DEFAULTS") != "1" and tune_cpu_allocator()

_MEDIANS: dict[tuple[str, str], float] = {}  # (group, provider) -> median seconds


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def record():
    """record(benchmark, group, provider): keep the median for the ratio table."""

    def _record(benchmark, group: str, provider: str) -> None:
        if benchmark.stats is not None:  # None under --benchmark-disable
            _MEDIANS[(group, provider)] = benchmark.stats.stats.median

    return _record


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


def pytest_terminal_summary(terminalreporter):
    r = ratios()
    if not r:
        return
    terminalreporter.section("lgsae: median time relative to the group's first provider")
    terminalreporter.write_line(f"glibc allocator tuned (lgsae.step.tune_cpu_allocator): "
                                f"{ALLOCATOR_TUNED}")
    for group, row in r.items():
        cells = "  ".join(f"{p}={v:.2f}x" for p, v in row.items())
        terminalreporter.write_line(f"{group}: {cells}")
