"""Per-op benchmarks: provider (dense, reference, triton, sparsify) × mode for the three ops.

    pytest bench/bench_kernels.py --benchmark-only [--scale small|paper]

encode: fwd = pre-activations + ReLU + top-k; bwd = gradients of W_enc, b_enc from d(chosen acts).
decode: fwd = Σ_j a_j·W_dec[i_j]; bwd = d(acts) and dW_dec from d(out).
decoder_norm: project = remove the row-parallel gradient; renorm = rows to unit norm.
`triton` runs the lgsae.kernels launchers (CUDA only, skipped on CPU), `reference` their
lgsae.reference twins (the CPU engine; its decode forward is F.embedding_bag, so on CUDA
`reference` is the embedding_bag baseline of issue 3), `dense` the plain torch formulation with N×M
tensors, `sparsify` the same op in sparsify's SparseCoder holding the same weights: encode = its
FusedEncoder (`encode`; bwd through its autograd with b_dec frozen, so it computes dW_enc and
db_enc like ours), decode = its decoder_impl (Triton on CUDA, embedding_bag on CPU), decoder_norm =
remove_gradient_parallel_to_decoder_directions / set_decoder_norm_to_unit_norm.
The first provider of a group (`dense`) is the denominator of the ratio table.
Scale small: N=4096, D=576, M=9216, K=32 (fp32; default on CPU); paper: N=16384, D=768,
M=12288, K=32 and 128 (bf16 on CUDA; default there). peak_memory_mb: conftest.peak_memory_mb of
one extra call (the reference encoder's reused workspace is freed first, so it is counted).
"""

import pytest
import torch
from conftest import (
    DEVICE,
    device_name,
    import_sparsify,
    peak_memory_mb,
    scale,
    sparsify_coder,
    sync,
)

from lgsae import reference

SHAPES = {"tiny": [(512, 64, 512, 8)], "small": [(4096, 576, 9216, 32)],
          "paper": [(16384, 768, 12288, 32), (16384, 768, 12288, 128)]}[scale()]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
PROVIDERS = ["dense", "reference", "triton", "sparsify"]


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


def _coder(W, b_enc, b_dec, K):
    """sparsify's SparseCoder holding W as encoder and decoder (as GroupSAE starts)."""
    return sparsify_coder({"encoder.weight": W.clone(), "encoder.bias": b_enc.clone(),
                           "W_dec": W.clone(), "b_dec": b_dec.clone()}, K)


def _run(benchmark, record, op, mode, provider, shape, fn, bytes_moved, flops):
    def timed():
        out = fn()
        sync()
        return out

    benchmark.pedantic(timed, warmup_rounds=1, rounds=10 if DEVICE.type == "cuda" else 5)
    N, D, M, K = shape
    record(benchmark, f"{op} {mode} N={N} D={D} M={M} K={K}", provider)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to report
        return
    reference.free_workspace()
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(
        op=op, mode=mode, N=N, D=D, M=M, K=K, dtype=str(DTYPE).removeprefix("torch."),
        device=device_name(), scale=scale(), flops=flops, flop_per_s=flops / t,
        gb_per_s=bytes_moved / t / 1e9, peak_memory_mb=peak_memory_mb(timed))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[3]}")
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_encode(benchmark, record, provider, mode, shape):
    N, D, M, K = shape
    x, W, b_enc, b_dec, _ = _data(*shape)
    es = DTYPE.itemsize
    if provider in ("dense", "sparsify"):
        if provider == "dense":
            Wg, bg = W.clone().requires_grad_(), b_enc.clone().requires_grad_()

            def fwd():
                return torch.relu((x - b_dec) @ Wg.t() + bg).topk(K, dim=1)
        else:
            sc = _coder(W, b_enc, b_dec, K)
            sc.b_dec.requires_grad_(False)
            Wg, bg = sc.encoder.weight, sc.encoder.bias

            def fwd():
                return sc.encode(x)[:2]

        if mode == "fwd":
            fn = fwd
        else:
            vals, _ = fwd()
            g = torch.randn_like(vals)

            def fn():
                return torch.autograd.grad(vals, [Wg, bg], g, retain_graph=True)
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
@pytest.mark.parametrize("provider", PROVIDERS)
def test_decode(benchmark, record, provider, mode, shape):
    N, D, M, K = shape
    _, W, b_enc, b_dec, g = _data(*shape)
    idx = torch.randint(0, M, (N, K), device=DEVICE)
    acts = torch.rand(N, K, device=DEVICE, dtype=DTYPE)
    if provider in ("dense", "sparsify"):
        ag = acts.clone().requires_grad_()
        if provider == "dense":
            Wg = W.clone().requires_grad_()

            def fwd():
                return torch.zeros(N, M, device=DEVICE, dtype=DTYPE).scatter(1, idx, ag) @ Wg
        else:
            Wg = _coder(W, b_enc, b_dec, K).W_dec
            decoder_impl = import_sparsify().sparse_coder.decoder_impl  # the one it chose

            def fwd():
                return decoder_impl(idx, ag, Wg.mT)

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
@pytest.mark.parametrize("provider", PROVIDERS)
def test_decoder_norm(benchmark, record, provider, mode):
    shape = SHAPES[0]
    N, D, M, K = shape
    _, W, b_enc, b_dec, _ = _data(*shape)
    grad = torch.randn_like(W)
    if provider == "dense":  # the textbook two-line formulation
        def fn():
            if mode == "project":
                return grad.sub_((grad * W).sum(1, keepdim=True) * W)
            return W.div_(W.norm(dim=1, keepdim=True))
    elif provider == "sparsify":
        sc = _coder(W, b_enc, b_dec, K)
        sc.W_dec.grad = grad

        def fn():
            if mode == "project":
                return sc.remove_gradient_parallel_to_decoder_directions()
            return sc.set_decoder_norm_to_unit_norm()
    else:
        ops = _impl(provider)

        def fn():
            if mode == "project":
                return ops["project_decoder_grad_"](W, grad)
            return ops["renorm_decoder_"](W)
    moved = (3 if mode == "project" else 2) * M * D * DTYPE.itemsize
    _run(benchmark, record, "decoder_norm", mode, provider, shape, fn, moved, 4 * M * D)
