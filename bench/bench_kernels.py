"""Per-op benchmarks: provider (triton, reference, dense) × mode for the three ops.

    pytest bench/bench_kernels.py --benchmark-only

encode: fwd = pre-activations + ReLU + top-k; bwd = gradients of W_enc, b_enc from d(chosen acts).
decode: fwd = Σ_j a_j·W_dec[i_j]; bwd = d(acts) and dW_dec from d(out).
decoder_norm: project = remove the row-parallel gradient; renorm = rows to unit norm.
`triton` runs the lgsae.kernels launchers (CUDA only, skipped on CPU), `reference` their
lgsae.reference twins (the CPU engine), `dense` the plain torch formulation with N×M tensors.
Scale: LGSAE_BENCH_SCALE=small (default on CPU) or paper (N=16384, D=768, M=12288; default on CUDA).
"""

import os

import pytest
import torch
from conftest import device_name, sync

from lgsae import reference

DEVICE = torch.device(os.environ.get("LGSAE_BENCH_DEVICE", "cuda" if torch.cuda.is_available()
                                     else "cpu"))
SCALE = os.environ.get("LGSAE_BENCH_SCALE", "paper" if DEVICE.type == "cuda" else "small")
SHAPES = {"small": [(4096, 576, 9216, 32)],
          "paper": [(16384, 768, 12288, 32), (16384, 768, 12288, 128)]}[SCALE]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _impl(provider: str):
    if provider == "triton":
        if DEVICE.type != "cuda":
            pytest.skip("Triton providers need a CUDA device (the interpreter is for tests)")
        from lgsae.kernels import decoder_norm, sparse_decode, topk_encode

        return {"topk_encode": topk_encode.topk_encode,
                "topk_encode_backward": topk_encode.topk_encode_backward,
                "sparse_decode": sparse_decode.sparse_decode,
                "sparse_decode_backward": sparse_decode.sparse_decode_backward,
                "project_decoder_grad_": decoder_norm.project_decoder_grad_,
                "renorm_decoder_": decoder_norm.renorm_decoder_}
    return {n: getattr(reference, n) for n in (
        "topk_encode", "topk_encode_backward", "sparse_decode", "sparse_decode_backward",
        "project_decoder_grad_", "renorm_decoder_")}


def _data(N, D, M, K):
    g = torch.Generator(device="cpu").manual_seed(0)
    W = torch.randn(M, D, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    x = torch.randn(N, D, generator=g)
    to = dict(device=DEVICE, dtype=DTYPE)
    return (x.to(**to), W.to(**to), torch.zeros(M, **to), torch.zeros(D, **to),
            torch.randn(N, D, generator=g).to(**to))


def _run(benchmark, record, op, mode, provider, shape, fn, bytes_moved, flops):
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)

    def timed():
        out = fn()
        sync(DEVICE)
        return out

    benchmark.pedantic(timed, warmup_rounds=1, rounds=10 if DEVICE.type == "cuda" else 5)
    N, D, M, K = shape
    record(benchmark, f"{op} {mode} N={N} D={D} M={M} K={K}", provider)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(
        op=op, mode=mode, provider=provider, N=N, D=D, M=M, K=K, dtype=str(DTYPE),
        device=device_name(DEVICE), tflops_per_s=flops / t / 1e12, gb_per_s=bytes_moved / t / 1e9,
        peak_memory_mb=(torch.cuda.max_memory_allocated(DEVICE) / 2**20
                        if DEVICE.type == "cuda" else None))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[3]}")
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("provider", ["dense", "reference", "triton"])
def test_encode(benchmark, record, provider, mode, shape):
    N, D, M, K = shape
    x, W, b_enc, b_dec, _ = _data(*shape)
    es = DTYPE.itemsize
    if provider == "dense":
        Wg = W.clone().requires_grad_()

        def fwd():
            return torch.relu((x - b_dec) @ Wg.t() + b_enc).topk(K, dim=1)

        if mode == "fwd":
            fn = fwd
        else:
            vals, _ = fwd()
            g = torch.randn_like(vals)

            def fn():
                return torch.autograd.grad(vals, Wg, g, retain_graph=True)
    else:
        ops = _impl(provider)
        enc = ops["topk_encode"](x, W, b_enc, b_dec, K)
        if mode == "fwd":
            def fn():
                return ops["topk_encode"](x, W, b_enc, b_dec, K)
        else:
            g = torch.randn_like(enc.top_acts)
            xc = x - b_dec

            def fn():
                return ops["topk_encode_backward"](xc, W, enc.top_indices, g, False)
    flops = 2 * N * D * M if mode == "fwd" else 2 * N * K * D
    _run(benchmark, record, "encode", mode, provider, shape, fn, (N * D + M * D) * es, flops)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[3]}")
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("provider", ["dense", "reference", "triton"])
def test_decode(benchmark, record, provider, mode, shape):
    N, D, M, K = shape
    _, W, _, _, g = _data(*shape)
    idx = torch.randint(0, M, (N, K), device=DEVICE)
    acts = torch.rand(N, K, device=DEVICE, dtype=DTYPE)
    if provider == "dense":
        Wg = W.clone().requires_grad_()
        ag = acts.clone().requires_grad_()

        def fwd():
            return torch.zeros(N, M, device=DEVICE, dtype=DTYPE).scatter(1, idx, ag) @ Wg

        if mode == "fwd":
            fn = fwd
        else:
            out = fwd()

            def fn():
                return torch.autograd.grad(out, [ag, Wg], g, retain_graph=True)
    else:
        ops = _impl(provider)
        if mode == "fwd":
            def fn():
                return ops["sparse_decode"](idx, acts, W)
        else:
            def fn():
                return ops["sparse_decode_backward"](g, idx, acts, W, True, True)
    flops = 2 * N * K * D * (1 if mode == "fwd" else 2)
    _run(benchmark, record, "decode", mode, provider, shape, fn,
         N * K * D * DTYPE.itemsize, flops)


@pytest.mark.parametrize("mode", ["project", "renorm"])
@pytest.mark.parametrize("provider", ["dense", "reference", "triton"])
def test_decoder_norm(benchmark, record, provider, mode):
    shape = SHAPES[0]
    N, D, M, K = shape
    _, W, _, _, _ = _data(*shape)
    grad = torch.randn_like(W)
    if provider == "dense":  # the textbook two-line formulation (sparsify's, via einsum)
        def fn():
            if mode == "project":
                return grad.sub_((grad * W).sum(1, keepdim=True) * W)
            return W.div_(W.norm(dim=1, keepdim=True))
    else:
        ops = _impl(provider)

        def fn():
            if mode == "project":
                return ops["project_decoder_grad_"](W, grad)
            return ops["renorm_decoder_"](W)
    moved = (3 if mode == "project" else 2) * M * D * DTYPE.itemsize
    _run(benchmark, record, "decoder_norm", mode, provider, shape, fn, moved, 4 * M * D)
