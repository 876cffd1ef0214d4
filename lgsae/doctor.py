"""`python -m lgsae.doctor`: what this machine gives lgsae, in one command to run first.

Prints the device, the versions that matter, which path (Triton kernel or pure-torch reference)
each op takes there and why, the kernel self-check's verdicts (lgsae.selfcheck), and a timing of
the training step at the default shape (D = 576, M = 4,608, K = 32, the device's default batch and
dtype) next to its floor: the encoder GEMM + top-k alone, which no SAE step can beat.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

import torch

from lgsae import __version__, ops, selfcheck
from lgsae.config import check_device


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception as e:  # noqa: BLE001 - any import failure is worth printing
        return f"not importable ({type(e).__name__}: {e})"


def op_paths(device: torch.device) -> dict[str, str]:
    """{op: "triton" | "reference (why)"} for tensors on `device`."""
    t = torch.empty(0, device=device)
    out = {}
    for op, module in ops._KERNEL_MODULES.items():
        if device.type != "cuda":
            out[op] = "reference (CPU tensors: the Triton kernels run on CUDA only)"
        elif ops.triton_disabled():
            out[op] = "reference (LGSAE_DISABLE_TRITON is set)"
        elif ops._kernel_module(module) is None:
            out[op] = f"reference (lgsae.kernels.{module} not importable: is triton installed?)"
        elif ops.triton_launcher(op, t) is None:
            out[op] = f"reference (lgsae.kernels.{module} has no {op})"
        elif op in selfcheck._failed:
            out[op] = "reference (failed its self-check: see the warning above)"
        else:
            out[op] = "triton"
    return out


def _timed(fn, seconds: float, sync) -> float:
    """Median seconds per call of fn over about `seconds` (after one warm-up call)."""
    fn()
    sync()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def step_vs_floor(device: torch.device, seconds: float = 10.0, D: int = 576, M: int = 4608,
                  K: int = 32) -> dict:
    """Our training step and its floor (GEMM + top-k) at the default shape, median seconds."""
    from lgsae.config import TrainConfig
    from lgsae.sae import GroupSAE
    from lgsae.step import make_optimizer, train_step

    cfg = TrainConfig().for_device(device)
    compute = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    sae = GroupSAE(D, k=K, num_latents=M, seed=0, device=device, compute_dtype=compute)
    opt = make_optimizer(sae)
    x = torch.randn(cfg.batch, D, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    step = _timed(lambda: train_step(sae, opt, x), seconds / 2, sync)
    cd = compute or torch.float32
    W, xc = sae.encoder.weight.detach().to(cd), x.to(cd)

    def floor():
        (xc @ W.T).topk(K, dim=1)

    base = _timed(floor, seconds / 2, sync)
    return {"batch": cfg.batch, "dtype": cfg.dtype, "D": D, "M": M, "K": K,
            "step_s": step, "floor_s": base, "ratio": step / base}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m lgsae.doctor", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0,
                   help="seconds for the step timing (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when this machine has one, else cpu)")
    a = p.parse_args(argv)
    device = check_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name})")
    versions = {"python": platform.python_version(), "lgsae": __version__,
                "torch": torch.__version__, "triton": _version("triton"),
                "transformers": _version("transformers")}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    timing = step_vs_floor(device, a.seconds)  # runs every op once: the self-check happens here
    paths = op_paths(device)
    print("ops:")
    for op, path in paths.items():
        print(f"  {op:24} {path}")
    checks = list(selfcheck.RESULTS)
    if checks:
        print("self-check (probe per class, once per process):")
        for r in checks:
            print(f"  {r['op']:24} {'ok' if r['ok'] else 'FAILED'}  error {r['error']:.2g}  "
                  f"{1e3 * r['seconds']:.1f} ms  {r['class'][2:]}")
    elif device.type == "cuda":
        print("self-check: skipped (LGSAE_KERNEL_CHECK=0)" if not selfcheck.enabled() else
              "self-check: no Triton launcher ran")
    else:
        print("self-check: not needed (no Triton kernel runs on this device)")
    print(f"step at the default shape (N={timing['batch']} {timing['dtype']}, D={timing['D']}, "
          f"M={timing['M']}, K={timing['K']}): {1e3 * timing['step_s']:.1f} ms; floor (encoder "
          f"GEMM + top-k): {1e3 * timing['floor_s']:.1f} ms; step = {timing['ratio']:.2f}x floor")
    return {"device": str(device), "name": name, "versions": versions, "ops": paths,
            "self_check": checks, "timing": timing}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"lgsae.doctor: error: {e}")
