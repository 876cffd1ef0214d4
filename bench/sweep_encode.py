"""Time the fused top-k encoder at several tile configurations on one GPU, next to its floor.

    python bench/sweep_encode.py [--out sweep.json] [--k 32 128] [--k-aux 0 256] [--dtype bf16]

Issue 3's target is the forward at N=16384, D=768, M=12288, K ∈ {32, 128}, bf16: at most 1.2x
(cuBLAS GEMM + torch.topk) at K=32. `block_config` picks the launcher's tiles from compile-time
facts only (registers, no spills; tests/test_kernels_aot.py); this script is the measurement that
should confirm or replace it. For each (K, k_aux) it runs the floor (`addmm` into a preallocated
buffer, ReLU, `torch.topk`) and the launcher at its default configuration plus the variants below
(for the top-k sweep; with k_aux > 0 the AuxK sweep over the dead latents runs at its defaults),
each checked against the floor's values first (sorted top-k values within the dtype's rounding,
indices distinct and in range) and timed with `triton.testing.do_bench` (median of ~200 ms of
runs after warm-up). It prints one table and writes every row (with the device name) as JSON.
Variants that do not fit the GPU's shared memory are listed as such. CUDA only: on a machine
without a GPU it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

VARIANTS = {  # extra (BLOCK_N, BLOCK_M, num_warps) per candidate width KP; BLOCK_D = 64
    32: [(64, 128, 8), (128, 64, 8), (64, 64, 4), (128, 128, 8)],
    64: [(64, 64, 8), (64, 128, 8)],
    128: [(64, 128, 8), (32, 128, 4), (16, 128, 8)],
    256: [(32, 256, 8), (16, 256, 4)],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def floor_fn(x, W, b_enc, b_dec, k):
    """cuBLAS GEMM into a preallocated [N, M] buffer, ReLU and torch.topk: the unfused floor."""
    buf = torch.empty(x.shape[0], W.shape[0], dtype=x.dtype, device=x.device)

    def run():
        torch.addmm(b_enc, x - b_dec, W.t(), out=buf)
        return torch.topk(buf.relu_(), k, dim=1, sorted=False)

    return run


def check(out, want_vals, M, k):
    """None if `out` is a valid top-k with the floor's values (to rounding), else why not."""
    vals = out.top_acts.float().sort(1, descending=True).values
    ref = want_vals.float().sort(1, descending=True).values
    tol = 4 * torch.finfo(want_vals.dtype).eps * max(1.0, ref.abs().max().item())
    err = (vals - ref).abs().max().item()
    if not err <= tol:
        return f"values differ by {err:.3g} (tolerance {tol:.3g})"
    idx = out.top_indices
    if idx.min().item() < 0 or idx.max().item() >= M:
        return "index out of range"
    s = idx.sort(1).values
    if not bool((s[:, 1:] != s[:, :-1]).all()):
        return "a latent chosen twice in one row"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--m", type=int, default=12288)
    p.add_argument("--k", type=int, nargs="+", default=[32, 128])
    p.add_argument("--k-aux", type=int, nargs="+", default=[0, 256],
                   help="AuxK widths to add (1%% of latents dead); 0 = no AuxK set")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_encode: needs a CUDA GPU (timings on the interpreter mean nothing)",
              file=sys.stderr)
        return 2
    import triton
    from lgsae.kernels import topk_encode as E
    from triton.testing import do_bench

    dev, dt = torch.device("cuda"), DTYPES[a.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    W = torch.randn(a.m, a.d, generator=g)
    W = (W / W.norm(dim=1, keepdim=True)).to(dev, dt)
    x = torch.randn(a.n, a.d, generator=g).to(dev, dt)
    b_enc, b_dec = torch.zeros(a.m, device=dev, dtype=dt), torch.zeros(a.d, device=dev, dtype=dt)
    dead = torch.zeros(a.m, dtype=torch.bool)
    dead[torch.randperm(a.m, generator=g)[: max(1, a.m // 100)]] = True
    dead = dead.to(dev)
    name = torch.cuda.get_device_name()
    rows = []
    for k in a.k:
        floor = floor_fn(x, W, b_enc, b_dec, k)
        want = floor().values.clone()
        t_floor = do_bench(floor, warmup=50, rep=200, return_mode="median")
        rows.append({"k": k, "k_aux": 0, "config": "floor: addmm + relu + topk", "ms": t_floor})
        for k_aux in a.k_aux:
            kk = min(k_aux, int(dead.sum()))
            KP = E.candidate_width(k)
            default = E.block_config(a.d, KP)
            configs = [default] + [
                {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_D": default["BLOCK_D"], "num_warps": w}
                for bn, bm, w in VARIANTS.get(KP, []) if bm >= KP]
            for cfg in configs:
                label = (f"BN={cfg['BLOCK_N']} BM={cfg['BLOCK_M']} w={cfg['num_warps']}"
                         + (" (default)" if cfg is default else ""))
                row = {"k": k, "k_aux": kk, "config": label, **cfg}

                def run(cfg=cfg):
                    return E.topk_encode(x, W, b_enc, b_dec, k, dead if kk else None, kk,
                                         config=cfg)

                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = run()
                if any("does not fit" in str(w.message) for w in caught):
                    rows.append({**row, "error": "does not fit this GPU"})
                    continue
                bad = check(out, want, a.m, k)
                if bad:
                    rows.append({**row, "error": bad})
                    continue
                del out
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run()
                torch.cuda.synchronize()  # one call's extra memory (do_bench adds its own)
                extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
                ms = do_bench(run, warmup=50, rep=200, return_mode="median")
                row.update(ms=ms, vs_floor=ms / t_floor, extra_mb=extra_mb)
                rows.append(row)
    print(f"{name}, triton {triton.__version__}, torch {torch.__version__}, N={a.n} D={a.d} "
          f"M={a.m} {a.dtype}")
    print(f"{'k':>4} {'k_aux':>5}  {'config':34} {'ms':>8} {'vs floor':>8}")
    for r in rows:
        tail = r.get("error") or f"{r['ms']:8.3f} {r.get('vs_floor', 1.0):7.2f}x"
        print(f"{r['k']:4d} {r['k_aux']:5d}  {r['config']:34} {tail}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": name, "triton": triton.__version__, "torch": torch.__version__,
                       "shape": {"N": a.n, "D": a.d, "M": a.m, "dtype": a.dtype}, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
