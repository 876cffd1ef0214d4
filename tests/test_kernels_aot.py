"""Ahead-of-time compile every kernel at every config its launcher's heuristic can pick, for sm_80
and sm_90, without a GPU (DESIGN §6); read registers, shared memory and spills from the cubin.

The compiles run in a child process with TRITON_INTERPRET removed: test_kernels.py may have turned
the interpreter on for this process, and then triton would hand back interpreted functions.
`python tests/test_kernels_aot.py` is that child: it prints one JSON line per compiled kernel.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
# realistic widths, plus the widest row decoder_norm keeps whole (8192) and one past it (two sweeps)
WIDTHS = (48, 128, 576, 768, 2048, 4096, 8192, 12288)


def kernel_jobs():
    """(kernel, signature, constexprs, attrs, num_warps, label) for every distinct config the
    launchers' block_config heuristics choose over WIDTHS × DTYPES, as the launchers call them."""
    import torch
    import triton.language as tl
    from lgsae.kernels import decoder_norm, sparse_decode, topk_encode

    acc = tl.float32  # fp64 inputs switch ACC to fp64; not a training dtype, not compiled here
    jobs = {}
    for D in WIDTHS:
        for dt in DTYPES:
            p = f"*{dt}"
            c = sparse_decode.block_config(D)
            blocks = {"BLOCK_K": c["BLOCK_K"], "BLOCK_D": c["BLOCK_D"]}
            dw_blocks = {"BLOCK_P": c["BLOCK_K"], "BLOCK_D": c["BLOCK_D"]}
            label = f"BK={c['BLOCK_K']} BD={c['BLOCK_D']} w={c['num_warps']}"
            sigs = [
                (sparse_decode._decode_fwd_kernel, ["*i64", p, p, p, "i32", "i32"], blocks),
                (sparse_decode._decode_dacts_kernel, [p, "*i64", p, p, "i32", "i32"], blocks),
                (sparse_decode._decode_dw_kernel, [p, p, "*i64", "*i64", p, "i32", "i32"],
                 dw_blocks),
            ]
            for fn, types, consts in sigs:
                jobs[(fn.__name__, label, dt, D % 16 == 0)] = (
                    fn, types, {"ACC": acc, **consts}, c["num_warps"], label)
            c = decoder_norm.block_config(D)
            consts = {k: c[k] for k in ("BLOCK_M", "BLOCK_D", "ONE_SWEEP")}
            label = (f"BM={c['BLOCK_M']} BD={c['BLOCK_D']} sweeps={1 if c['ONE_SWEEP'] else 2} "
                     f"w={c['num_warps']}")
            tiny = torch.finfo(torch.float32).tiny
            for fn, types, extra in (
                (decoder_norm._project_grad_kernel, [p, p, "i32", "i32"], {}),
                (decoder_norm._renorm_kernel, [p, "i32", "i32"], {"TINY": tiny}),
            ):
                jobs[(fn.__name__, label, dt, D % 16 == 0)] = (
                    fn, types, {"ACC": acc, **consts, **extra}, c["num_warps"], label)
    _topk_encode_jobs(topk_encode, jobs)
    out = []
    for (_, _, dt, d16), (fn, types, consts, warps, label) in jobs.items():
        names = fn.arg_names
        signature = {n: types[i] if i < len(types) else "constexpr" for i, n in enumerate(names)}
        # the launcher's specialization: torch allocations are 16-byte aligned, D % 16 == 0 here
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if t[0] == "*"}
        if d16:
            attrs[(names.index("D"),)] = [["tt.divisibility", 16]]
        label = f"{label} {dt}" + (" D%16" if d16 else "")
        out.append((fn, signature, consts, attrs, warps, label))
    return out


def _topk_encode_jobs(mod, jobs):
    """The fused encoder at every candidate width its launcher can pick, sweeping all latents
    (top-k) or gathered ones (AuxK), for every dtype and key width, plus db_enc's segment sum.
    D only sets BLOCK_D, so it is looped over WIDTHS like the other kernels."""
    import triton.language as tl

    widths = []
    w = mod.MIN_WIDTH
    while w <= mod.MAX_FUSED_AUX_16BIT:
        widths.append(w)
        w *= 2
    for D in WIDTHS:
        for KP in widths:
            c = mod.block_config(D, KP)
            blocks = {k: c[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_D")}
            for gather in (False, True):
                label = (f"KP={KP}{' gather' if gather else ''} BN={c['BLOCK_N']} "
                         f"BM={c['BLOCK_M']} BD={c['BLOCK_D']} w={c['num_warps']}")
                # past MAX_FUSED_K only the AuxK sweep (gather) of 16-bit inputs is fused
                wide = KP > mod.MAX_FUSED_K
                for dt in DTYPES if not wide else (("fp16", "bf16") if gather else ()):
                    p = f"*{dt}"
                    types = [p, p, p, p, "*i64", p, "*i64"] + ["i32"] * 4
                    # 16-bit inputs rank int32 keys up to 2**16 latents, int64 keys past that
                    for key16 in (False,) if dt == "fp32" else (True, False):
                        consts = {"KP": KP, "GATHER": gather, "KEY16": key16, **blocks}
                        lab = f"{label} key{32 if key16 else 64}"
                        jobs[(mod._topk_encode_kernel.__name__, lab, dt, D % 16 == 0)] = (
                            mod._topk_encode_kernel, types, consts, c["num_warps"], lab)
    for dt in DTYPES:
        jobs[(mod._segment_sum_kernel.__name__, "", dt, False)] = (
            mod._segment_sum_kernel, [f"*{dt}", "*i64", "*i64", f"*{dt}"],
            {"ACC": tl.float32, "BLOCK_P": mod.SEGMENT_BLOCK}, 1, f"BP={mod.SEGMENT_BLOCK} w=1")


def compile_and_measure(job, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, consts, attrs, warps, label = job
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", dump))
    if set(usage) != {"REG", "STACK", "SHARED", "LOCAL"}:
        raise RuntimeError(f"unexpected cuobjdump output for {fn.__name__}:\n{dump}")
    return {"kernel": fn.__name__, "config": label, "arch": f"sm_{arch}",
            "reg": int(usage["REG"]), "smem_dyn": compiled.metadata.shared,
            "smem_static": int(usage["SHARED"]), "stack": int(usage["STACK"]),
            "local": int(usage["LOCAL"])}


def main():
    from concurrent.futures import ProcessPoolExecutor

    jobs = kernel_jobs()
    work = [(j, a) for j in range(len(jobs)) for a in ARCHS]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:  # fork: jobs are inherited
        for row in pool.map(_run, work):
            print(json.dumps(row), flush=True)
    print(json.dumps({"total": len(work)}))


def _run(item):
    j, arch = item
    return compile_and_measure(kernel_jobs()[j], arch)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_every_kernel_config_compiles_without_spills(capsys):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows, total = lines[:-1], lines[-1]["total"]
    assert len(rows) == total > 0
    head = (f"{'kernel':22} {'config':58} {'arch':6} {'regs':>4} {'smem dyn':>8} "
            f"{'smem static':>11} {'stack':>5} {'local':>5}")
    table = [head] + [
        f"{r['kernel']:22} {r['config']:58} {r['arch']:6} {r['reg']:4d} {r['smem_dyn']:8d} "
        f"{r['smem_static']:11d} {r['stack']:5d} {r['local']:5d}" for r in rows
    ]
    with capsys.disabled():
        print("\n" + "\n".join(table))
    spilled = [r for r in rows if r["local"] != 0]
    assert not spilled, f"register spills (LOCAL bytes > 0): {spilled}"
    # ptxas never exceeds 255 registers, so a `reg <= 255` check would test nothing. What matters
    # is occupancy: the default GPU training config (bf16/fp16, K = 32: candidate width 32, int32
    # keys, 8 warps) must keep two programs per SM (2 x 256 threads x regs <= 65,536 registers,
    # kernels/NOTES.md), else the fused encoder loses half its latency hiding.
    hot = [r for r in rows if r["kernel"] == "_topk_encode_kernel"
           and r["config"].startswith("KP=32 BN") and " key32 " in r["config"]]
    assert len(hot) == 4, [r["config"] for r in hot]  # fp16, bf16 x sm_80, sm_90
    assert all(2 * 32 * 8 * r["reg"] <= 65536 for r in hot), hot
    # the 16-bit AuxK sweep at width 512 (the paper's k_aux = 384) must fit one block's shared
    # memory on A100 (163 KB opt-in) and H100/H200 (227 KB); fp32 at 512 would need 275 KB
    wide = [r for r in rows if r["config"].startswith("KP=512")]
    # fp16/bf16 x key32/key64 x sm_80/sm_90 (every WIDTHS entry is a multiple of 16)
    assert len(wide) == 8 and all(" gather " in r["config"] for r in wide), wide
    limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    assert all(r["smem_dyn"] + r["smem_static"] <= limit[r["arch"]] for r in wide), wide


if __name__ == "__main__":
    main()
