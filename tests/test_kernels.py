"""Triton launchers (topk_encode, sparse_decode, decoder_norm) vs their `lgsae.reference` twins.

CPU: the kernels run in Triton's interpreter (DESIGN §6), fp32 and fp16 (the interpreter gets bf16
wrong). GPU (marker `gpu`): the compiled kernels, bf16 included, up to the paper's shape.
Errors are judged against torch's own error in the same dtype: with an fp64 reference r64 and the
reference r in the tested dtype, require |kernel − r64| ≤ 2·max|r − r64| + eps(dtype).
"""

import os
import sys

import torch

# Triton reads TRITON_INTERPRET when triton.language is first imported (its own jit helpers such as
# tl.sum) and when each kernel module is decorated, so the variable has to be set before both. On a
# machine without CUDA nothing in this process needs compiled kernels: interpret here. With CUDA,
# lgsae.ops and the gpu tests need them compiled, so the CPU checks run in a child process instead.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402

import pytest  # noqa: E402
from conftest import assert_close  # noqa: E402

from lgsae import reference  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from lgsae.kernels import decoder_norm as NORM  # noqa: E402
from lgsae.kernels import sparse_decode as DECODE  # noqa: E402
from lgsae.kernels import topk_encode as ENCODE  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

KERNELS = [DECODE._decode_fwd_kernel, DECODE._decode_dacts_kernel, DECODE._decode_dw_kernel,
           NORM._project_grad_kernel, NORM._renorm_kernel, ENCODE._topk_encode_kernel,
           ENCODE._segment_sum_kernel]
# triton's own helpers (tl.sum) must be interpreted too, not only our kernels
INTERPRETED = all(isinstance(f, InterpretedFunction) for f in KERNELS + [triton.language.sum])
interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton compiled in this process: test_cpu_checks_in_child_process"
)


def check_vs_reference(name, out, ref, ref64):
    """Kernel error at most twice torch's own error in that dtype, plus one eps."""
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != reference {ref.dtype}"
    err_ref = (ref.double() - ref64).abs().max().item() if ref.numel() else 0.0
    atol = 2 * err_ref + torch.finfo(ref.dtype).eps
    assert_close(out, ref64, atol=atol, name=f"{name} ({ref.dtype})")


def make_indices(N, K, M, pattern, device="cpu"):
    if pattern == "random":
        return torch.randint(0, M, (N, K), device=device)
    if pattern == "perm":  # K == M: every latent once per row, in a different order per row
        return torch.stack([torch.randperm(M, device=device) for _ in range(N)])
    if pattern == "same":  # every token picks latent 11 in every slot: one long segment
        return torch.full((N, K), 11, device=device)
    if pattern == "dups":  # few distinct latents: duplicates within rows and across tokens
        return torch.randint(0, 5, (N, K), device=device)
    raise ValueError(pattern)


def decode_case(mod, N, K, M, D, pattern, dtype, device="cpu"):
    idx = make_indices(N, K, M, pattern, device)
    acts = torch.randn(N, K, device=device).relu().to(dtype)
    W = (torch.randn(M, D, device=device) / D**0.5).to(dtype)
    g = torch.randn(N, D, device=device).to(dtype)
    d64 = [t.double() for t in (acts, W)]

    out = mod.sparse_decode(idx, acts, W)
    check_vs_reference("x_hat", out, reference.sparse_decode(idx, acts, W),
                       reference.sparse_decode(idx, *d64))
    d_acts, dW = mod.sparse_decode_backward(g, idx, acts, W)
    r_acts, r_W = reference.sparse_decode_backward(g, idx, acts, W)
    r64_acts, r64_W = reference.sparse_decode_backward(g.double(), idx, *d64)
    check_vs_reference("d_acts", d_acts, r_acts, r64_acts)
    check_vs_reference("dW_dec", dW, r_W, r64_W)
    return idx, acts, W, g


# (N, K, M, D, pattern): D=48 and 300 (not a multiple of the 256 D tile), M=100 and 37 (not a
# multiple of any block), K=1, K=20 (past one 16-slot block), K=M, N=1, one shared latent,
# duplicates within rows, and K=0.
DECODE_SHAPES = [
    (7, 5, 100, 48, "random"),
    (1, 1, 37, 48, "random"),
    (3, 37, 37, 48, "perm"),
    (9, 4, 37, 48, "same"),
    (6, 8, 100, 48, "dups"),
    (3, 20, 37, 300, "random"),
    (4, 0, 37, 48, "random"),
]


@interpreter
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_decode_matches_reference(shape, dtype):
    decode_case(DECODE, *shape, dtype)


@interpreter
def test_sparse_decode_backward_skips_unneeded_grads():
    idx, acts, W, g = decode_case(DECODE, 4, 3, 37, 48, "random", torch.float32)
    assert DECODE.sparse_decode_backward(g, idx, acts, W, need_acts_grad=False)[0] is None
    assert DECODE.sparse_decode_backward(g, idx, acts, W, need_W_grad=False)[1] is None


@interpreter
def test_backward_launchers_write_a_wider_masters_gradients_directly():
    """Mixed precision (lgsae.ops with fp32 masters): grad_dtype=float32 makes the kernels store
    their fp32 sums as the fp32 gradients, not rounded to the 16-bit weights' dtype. They match
    the reference's fp32 sums, and rounded they are exactly the default call's gradients."""
    f32 = torch.float32
    idx, acts, W, g = decode_case(DECODE, 6, 8, 100, 48, "dups", torch.float16)
    d_acts, dW = DECODE.sparse_decode_backward(g, idx, acts, W, True, True, f32)
    assert (d_acts.dtype, dW.dtype) == (torch.float16, f32)
    want = reference.sparse_decode_backward(g, idx, acts, W, True, True, f32)[1]
    assert_close(dW, want, atol=1e-6 * float(want.abs().max()), name="dW_dec fp32")
    assert torch.equal(dW.half(), DECODE.sparse_decode_backward(g, idx, acts, W)[1])
    assert not torch.equal(dW, dW.half().float())  # finer than fp16: not a widened rounding

    xc = torch.randn(9, 48).half()
    W = (torch.randn(37, 48) / 48**0.5).half()
    idx, gp = torch.randint(0, 37, (9, 6)), torch.randn(9, 6).half()
    _, dW, db = ENCODE.topk_encode_backward(xc, W, idx, gp, False, f32)
    assert dW.dtype == db.dtype == f32
    _, rW, rb = reference.topk_encode_backward(xc, W, idx, gp, False, f32)
    assert_close(dW, rW, atol=1e-6 * float(rW.abs().max()), name="dW_enc fp32")
    assert_close(db, rb, atol=1e-6 * float(rb.abs().max()), name="db_enc fp32")
    _, dW16, db16 = ENCODE.topk_encode_backward(xc, W, idx, gp)
    assert torch.equal(dW.half(), dW16) and torch.equal(db.half(), db16)


@interpreter
def test_sparse_decode_rejects_bad_inputs():
    idx, acts, W = torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3), torch.ones(5, 48)
    with pytest.raises(ValueError, match="int64"):
        DECODE.sparse_decode(idx.int(), acts, W)
    with pytest.raises(ValueError, match="contiguous"):
        DECODE.sparse_decode(idx, acts, torch.ones(48, 5).t())
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        DECODE.sparse_decode(idx, acts[:, :2].contiguous(), W)


def unit_rows(M, D, dtype, device="cpu"):
    W = torch.randn(M, D, device=device, dtype=torch.float64)
    return (W / W.norm(dim=1, keepdim=True)).to(dtype)


def norm_case(mod, M, D, dtype, device="cpu"):
    W = unit_rows(M, D, dtype, device)
    grad = torch.randn(M, D, device=device).to(dtype)
    out = mod.project_decoder_grad_(W, grad.clone())
    ref = reference.project_decoder_grad_(W, grad.clone())
    check_vs_reference("projected grad", out, ref,
                       reference.project_decoder_grad_(W.double(), grad.double()))
    # off-unit rows with a wide spread of norms, and (fp32 only: the fp16 reference divides by a
    # norm that underflows to 0) one all-zero row that must stay zero
    W = (torch.randn(M, D, device=device) * torch.rand(M, 1, device=device) * 4).to(dtype)
    if dtype == torch.float32:
        W[M // 2] = 0
    out = mod.renorm_decoder_(W.clone())
    check_vs_reference("renormed W_dec", out, reference.renorm_decoder_(W.clone()),
                       reference.renorm_decoder_(W.double()))
    if dtype == torch.float32:
        assert not out[M // 2].any(), "an all-zero row must stay zero"


@interpreter
@pytest.mark.parametrize("shape", [(100, 48), (37, 48), (1, 48), (37, 300), (3, 4100)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sweeps", ["one", "two"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decoder_norm_matches_reference(shape, sweeps, dtype, monkeypatch):
    if sweeps == "two":  # rows wider than the register block: reduce, then update, in D chunks
        monkeypatch.setattr(NORM, "MAX_ROW_BLOCK", 32)
    assert NORM.block_config(shape[1])["ONE_SWEEP"] == (sweeps == "one")
    norm_case(NORM, *shape, dtype)


@interpreter
def test_decoder_norm_is_in_place():
    W, grad = unit_rows(37, 48, torch.float32), torch.randn(37, 48)
    assert NORM.project_decoder_grad_(W, grad) is grad
    assert grad.mul(W).sum(1).abs().max() < 1e-5, "grad must be orthogonal to the rows after"
    W2 = 3 * torch.randn(37, 48)
    assert NORM.renorm_decoder_(W2) is W2
    assert_close(W2.norm(dim=1), torch.ones(37), atol=1e-6, name="row norms")


def test_cpu_checks_in_child_process():
    """Where this process cannot interpret (CUDA present, or triton imported before this file could
    set the variable), run this file's CPU tests in a child process with the interpreter on."""
    if INTERPRETED:
        pytest.skip("the CPU tests ran in this process, under the interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__),
    )
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", DECODE_SHAPES + [(16384, 128, 12288, 768, "random"), (4096, 32, 9216, 576, "same")],
    ids=lambda s: "-".join(map(str, s)),
)
def test_sparse_decode_cuda(shape, dtype):
    mod = DECODE
    idx, acts, W, g = decode_case(mod, *shape, dtype, device="cuda")
    # sort + segment reduction: no atomics, so two runs agree bit for bit
    assert torch.equal(mod.sparse_decode_backward(g, idx, acts, W)[1],
                       mod.sparse_decode_backward(g, idx, acts, W)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(100, 48), (37, 300), (12288, 768), (4096, 8192), (64, 9000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_decoder_norm_cuda(shape, dtype):
    norm_case(NORM, *shape, dtype, device="cuda")


def make_dead(M, kind, device="cpu"):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(M, dtype=torch.bool, device=device)
    dead = torch.zeros(M, dtype=torch.bool, device=device)
    n = {"few": 2, "some": max(1, M // 3), "1pct": max(1, M // 100)}[kind]
    dead[torch.randperm(M, device=device)[:n]] = True
    return dead


def check_selection(name, acts, idx, pre64, allowed, atol):
    """acts/idx[N, J] must be a valid top-J of ReLU(pre64) over the `allowed` latents: distinct
    allowed ids, acts = ReLU(pre) there, and the smallest chosen ≥ every unchosen allowed one.
    Indices may legitimately differ from the reference's where values tie."""
    N, J = idx.shape
    if J == 0:
        return
    assert idx.dtype == torch.int64
    s = idx.sort(1).values
    assert bool((s[:, 1:] != s[:, :-1]).all()), f"{name}: a latent chosen twice in one row"
    assert bool(allowed[idx].all()), f"{name}: chose a latent outside the allowed set"
    relu64 = pre64.relu()
    assert_close(acts, relu64.gather(1, idx), atol=atol, name=f"{name} vs fp64 pre at its indices")
    rest = relu64.masked_fill(~allowed, -torch.inf).scatter(1, idx, -torch.inf)
    worst_chosen = acts.double().min(1).values
    gap = (rest.max(1).values - worst_chosen).max().item()
    assert gap <= atol, f"{name}: an unchosen latent beats the k-th chosen by {gap:.3g}"


def encode_case(mod, N, D, M, k, dead_kind, k_aux, hot, dtype, device="cpu"):
    x = torch.randn(N, D, device=device).to(dtype)
    W = (torch.randn(M, D, device=device) / D**0.5).to(dtype)
    b_enc = 0.1 * torch.randn(M, device=device)
    if hot:  # one latent chosen by every token: one long segment in the backward
        b_enc[M // 2] = 50.0
    b_enc, b_dec = b_enc.to(dtype), (0.1 * torch.randn(D, device=device)).to(dtype)
    dead = make_dead(M, dead_kind, device)
    args = (x, W, b_enc, b_dec, k, dead, k_aux)
    args64 = tuple(t.double() for t in args[:4]) + args[4:]
    out = mod.topk_encode(*args)
    ref, ref64 = reference.topk_encode(*args), reference.topk_encode(*args64)
    for got, want, field in zip(out, ref, out._fields):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), (
            f"{field}: {tuple(got.shape)} {got.dtype} != reference {tuple(want.shape)} "
            f"{want.dtype}")
    pre64 = (x.double() - b_dec.double()) @ W.double().t() + b_enc.double()
    for acts, idx, allowed, field in (
        (out.top_acts, out.top_indices, torch.ones(M, dtype=torch.bool, device=device), "top"),
        (out.aux_acts, out.aux_indices, dead, "aux"),
    ):
        r = getattr(ref, f"{field}_acts").sort(1, descending=True).values
        r64 = getattr(ref64, f"{field}_acts").sort(1, descending=True).values
        srt = acts.sort(1, descending=True).values
        check_vs_reference(f"{field}_acts sorted", srt, r, r64)
        atol = 2 * ((r.double() - r64).abs().max().item() if r.numel() else 0.0)
        atol += 4 * torch.finfo(dtype).eps * max(1.0, pre64.abs().max().item())
        check_selection(field, acts, idx, pre64.to(device), allowed, atol)

    # backward at the chosen entries, top and AuxK together as lgsae.ops passes them
    idx = torch.cat([out.top_indices, out.aux_indices], 1)
    g = torch.randn(idx.shape, device=device).to(dtype)
    xc = x - b_dec
    got = mod.topk_encode_backward(xc, W, idx, g, need_x_grad=True)
    want = reference.topk_encode_backward(xc, W, idx, g, True)
    want64 = reference.topk_encode_backward(xc.double(), W.double(), idx, g.double(), True)
    for name, a, b, c in zip(("dxc", "dW_enc", "db_enc"), got, want, want64):
        check_vs_reference(name, a, b, c)
    assert mod.topk_encode_backward(xc, W, idx, g)[0] is None
    return out


# (N, D, M, k, dead, k_aux, hot): D=48, M=100 and 37 (not a multiple of any block), K=1, K=M,
# N=1, every token picking the same latent, no / some / all dead, fewer dead than k_aux.
ENCODE_SHAPES = [
    (7, 48, 100, 5, "none", 0, False),
    (1, 48, 37, 1, "some", 4, False),
    (3, 48, 37, 37, "all", 8, False),
    (9, 48, 100, 3, "few", 6, True),
    (17, 48, 100, 20, "some", 17, False),
]


@pytest.fixture
def small_encode_tiles(monkeypatch):
    """The interpreter pays per element of every sort stage (its reductions loop in Python): run
    the same kernel with the smallest tiles tl.dot takes. One test keeps the real heuristic."""
    def small(D, KP):
        return {"BLOCK_N": 16, "BLOCK_M": max(KP, 16), "BLOCK_D": 32, "num_warps": 4}
    monkeypatch.setattr(ENCODE, "block_config", small)


@interpreter
@pytest.mark.parametrize("shape", ENCODE_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_encode_matches_reference(shape, dtype, small_encode_tiles):
    encode_case(ENCODE, *shape, dtype)


@interpreter
def test_topk_encode_heuristic_tiles():
    widths = sorted({ENCODE.candidate_width(k) for k in
                     range(1, ENCODE.MAX_FUSED_AUX_16BIT + 1)})
    last_n = None
    for KP in widths:
        for D in (8, 48, 576, 2304):
            cfg = ENCODE.block_config(D, KP)
            # a tile must hold a whole candidate set for tl.topk: BLOCK_M >= KP, powers of two
            assert cfg["BLOCK_M"] >= KP and cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1) == 0, cfg
            assert cfg["BLOCK_D"] == min(max(triton.next_power_of_2(D), 16), 64), (D, cfg)
        # register pressure grows with BLOCK_N·(BLOCK_M + 2·KP): BLOCK_N never grows with KP
        assert last_n is None or cfg["BLOCK_N"] <= last_n, (KP, cfg)
        last_n = cfg["BLOCK_N"]
    # the default shape (K = 32, D = 576): the tiles the AOT occupancy check compiles
    assert ENCODE.block_config(576, ENCODE.candidate_width(32)) == \
        {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "num_warps": 8}
    with pytest.raises(ValueError, match="exceeds MAX_FUSED_AUX_16BIT"):
        ENCODE.block_config(576, 2 * ENCODE.MAX_FUSED_AUX_16BIT)
    encode_case(ENCODE, 5, 48, 64, 20, "some", 10, False, torch.float32)  # one 64-latent tile


@interpreter
def test_topk_encode_explicit_config(monkeypatch):
    """`config=` (bench/sweep_encode.py's variants) replaces block_config's tiles for the top-k
    sweep, and a BLOCK_M narrower than the candidate set gets one clear error."""
    cfg = {"BLOCK_N": 16, "BLOCK_M": 32, "BLOCK_D": 16, "num_warps": 4}
    asked = []  # block_config serves the AuxK sweep (width 16 here) but not the top-k one (32)
    monkeypatch.setattr(ENCODE, "block_config", lambda D, KP: asked.append(KP) or {**cfg,
                        "BLOCK_M": KP})
    mod = type("Configured", (), {
        "topk_encode": staticmethod(lambda *a: ENCODE.topk_encode(*a, config=cfg)),
        "topk_encode_backward": staticmethod(ENCODE.topk_encode_backward)})
    encode_case(mod, 5, 48, 100, 20, "some", 10, False, torch.float16)  # KP = 32 = BLOCK_M
    assert set(asked) == {16}, asked
    x, W, b, bd = torch.randn(2, 48), torch.randn(37, 48), torch.zeros(37), torch.zeros(48)
    with pytest.raises(ValueError, match="BLOCK_M = 16 must be >= the candidate width 32"):
        ENCODE.topk_encode(x, W, b, bd, 20, config={**cfg, "BLOCK_M": 16})
    with pytest.raises(ValueError, match="powers of two >= 16"):
        ENCODE.topk_encode(x, W, b, bd, 20, config={**cfg, "BLOCK_M": 48})


@interpreter
def test_topk_encode_wide_k_falls_back(monkeypatch, small_encode_tiles):
    """Past MAX_FUSED_K the launcher uses the reference in row chunks (top-k), or the fused top-k
    plus the reference on the dead latents' rows (AuxK): still the right answer."""
    monkeypatch.setattr(ENCODE, "MAX_FUSED_K", 16)
    monkeypatch.setattr(ENCODE, "FALLBACK_ELEMENTS", 250)  # 2 rows per chunk at M=100
    encode_case(ENCODE, 5, 48, 100, 20, "some", 10, False, torch.float32)  # top-k too wide
    out = encode_case(ENCODE, 5, 48, 100, 3, "some", 20, False, torch.float32)  # only AuxK too wide
    assert out.aux_acts.shape == (5, 20)
    x, W = torch.randn(3, 48, dtype=torch.float64), torch.randn(37, 48, dtype=torch.float64)
    b, bd = torch.randn(37, dtype=torch.float64), torch.zeros(48, dtype=torch.float64)
    got, want = ENCODE.topk_encode(x, W, b, bd, 4), reference.topk_encode(x, W, b, bd, 4)
    assert_close(got.top_acts.sort(1).values, want.top_acts.sort(1).values, atol=1e-12,
                 name="fp64 (reference path)")


@interpreter
def test_topk_encode_wide_auxk_is_fused_for_16_bit_inputs(monkeypatch, small_encode_tiles):
    """min(k_aux, #dead) in (256, 512]: one fused AuxK sweep at width 512 for fp16/bf16 inputs
    (the paper's k_aux = 384), the reference on the dead rows for fp32; both right."""
    widths = []
    sweep = ENCODE._sweep
    monkeypatch.setattr(ENCODE, "_sweep", lambda x, W, b, bd, k, ids, cfg: widths.append(
        (ENCODE.candidate_width(k), ids is not None)) or sweep(x, W, b, bd, k, ids, cfg))
    for dtype, fused in ((torch.float16, True), (torch.float32, False)):
        widths.clear()
        out = encode_case(ENCODE, 3, 48, 320, 4, "all", 300, False, dtype)
        assert out.aux_acts.shape == (3, 300)
        assert ((512, True) in widths) == fused, (dtype, widths)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_encode_serves_a_group_sae_with_per_layer_parameters(dtype, small_encode_tiles):
    """GroupSAE's per-member-layer options reach the kernel as a plain call: centred, gained
    rows with a one-hot layer embedding appended (D + L padded to a multiple of 16) and the
    encoder with Δb_encᵀ columns; the kernel matches the reference on exactly those arguments,
    forward and backward."""
    from lgsae import GroupSAE

    sae = GroupSAE(48, k=4, num_latents=37, layers=[1, 4, 6], scales=[0.7, 1.0, 1.9], seed=0,
                   layer_params=["b_dec", "b_enc", "scale"])
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
    layer = torch.tensor([1, 4, 6])[torch.randint(3, (9,))]
    pos = sae.layer_pos(layer, 9)
    xs = torch.randn(9, 48) * sae.scale_for(layer, 9)
    W_enc, b_enc, _, b_dec = sae._weights()
    x, W, be, bd = (t.detach().to(dtype).contiguous()
                    for t in sae._encoder_args(xs, pos, W_enc, b_enc, b_dec))
    assert x.shape == (9, 64) and W.shape == (37, 64) and bd.shape == (64,)
    assert torch.equal(x[:, 48:51].argmax(1), pos) and not bool(x[:, 51:].any())
    dead = make_dead(37, "some")
    out = ENCODE.topk_encode(x, W, be, bd, 4, dead, 6)
    ref64 = reference.topk_encode(x.double(), W.double(), be.double(), bd.double(), 4, dead, 6)
    ref = reference.topk_encode(x, W, be, bd, 4, dead, 6)
    for field in ("top_acts", "aux_acts"):
        check_vs_reference(field, getattr(out, field).sort(1).values,
                           getattr(ref, field).sort(1).values,
                           getattr(ref64, field).sort(1).values)
    idx = torch.cat([out.top_indices, out.aux_indices], 1)
    g = torch.randn(idx.shape).to(dtype)
    got = ENCODE.topk_encode_backward(x - bd, W, idx, g, need_x_grad=True)
    want = reference.topk_encode_backward(x - bd, W, idx, g, True)
    want64 = reference.topk_encode_backward((x - bd).double(), W.double(), idx, g.double(), True)
    for name, a, b, c in zip(("dxc", "dW_enc", "db_enc"), got, want, want64):
        check_vs_reference(name, a, b, c)


@interpreter
def test_topk_encode_rejects_bad_inputs():
    x, W, b, bd = torch.randn(2, 48), torch.randn(37, 48), torch.zeros(37), torch.zeros(48)
    with pytest.raises(ValueError, match=r"k must be in \[1, 37\]"):
        ENCODE.topk_encode(x, W, b, bd, 38)
    with pytest.raises(ValueError, match="contiguous"):
        ENCODE.topk_encode(x, torch.randn(48, 37).t(), b, bd, 3)
    with pytest.raises(ValueError, match="one dtype among"):
        ENCODE.topk_encode(x.half(), W, b, bd, 3)
    with pytest.raises(ValueError, match="bool"):
        ENCODE.topk_encode(x, W, b, bd, 3, torch.zeros(37), 4)


@triton.jit
def _key_roundtrip_kernel(vals_ptr, ids_ptr, acts_ptr, idx_ptr, K, KEY16: tl.constexpr,
                          BN: tl.constexpr, BM: tl.constexpr):
    """Pack [BN, BM] fp32 values with [BM] latent ids as the encoder does, sort the keys ascending
    (as its running top-k set is kept) and store the top K as the encoder stores them."""
    block = tl.program_id(0).to(tl.int64)
    rows = block * BN + tl.arange(0, BN)
    cols = tl.arange(0, BM)
    vals = tl.load(vals_ptr + rows[:, None] * BM + cols[None, :])
    salt = ENCODE._tie_salt(block, KEY16)
    keys = ENCODE._pack(vals, tl.load(ids_ptr + cols), salt, KEY16, acts_ptr.dtype.element_ty)
    ENCODE._store_top(tl.sort(keys), rows, salt, rows >= 0, acts_ptr, idx_ptr, K, BM, KEY16,
                      acts_ptr.dtype.element_ty)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_keys_order_by_value_then_salted_id(dtype):
    """The packed keys rank (value in the input dtype, id ^ salt(block)) and unpack to both
    exactly: ids past 2**15 (the sign bit of a 16-bit id field) and 2**16 − 1, negative values,
    values that tie once rounded to fp16, whole rows of ties. Tied values are ordered by a
    permutation of the ids that differs between blocks of rows, not by the ids themselves. The
    kernel tests' M stays far below 2**15. bf16 uses values bf16 holds exactly: the interpreter
    truncates fp32 -> bf16 where GPUs round."""
    key16 = ENCODE.key16(dtype, ENCODE.MAX_KEY16_LATENTS)
    assert key16 == (dtype != torch.float32) and not ENCODE.key16(dtype, 2**16 + 1)
    G, BN, BM, K = 3, 4, 16, 9  # G blocks (programs) of BN rows
    top_id = 2**16 - 1 if key16 else 2**31 - 1
    ids = torch.cat([torch.tensor([0, 2**15 - 1, 2**15, top_id]),
                     torch.randperm(1000)[:BM - 4] * (top_id // 1000) + 1])  # distinct
    # steps of 1/8 away from 0 (no ±0 ties), jittered below one fp16 ulp: ties after rounding
    vals = (torch.randint(-3, 3, (G * BN, BM)) + 0.5) / 8
    if dtype != torch.bfloat16:
        vals += torch.rand(G * BN, BM) * 1e-4
    vals[1::BN] = vals[1, 0]  # row 1 of each block: all tied, the same values in every block
    acts = torch.full((G * BN, K), float("nan"), dtype=dtype)
    idx = torch.full((G * BN, K), -1, dtype=torch.int64)
    _key_roundtrip_kernel[(G,)](vals, ids, acts, idx, K, KEY16=key16, BN=BN, BM=BM)
    rounded = vals.to(dtype).float()
    salt = ENCODE.tie_salt(torch.arange(G), key16)
    assert len(set(salt.tolist())) == G, "blocks should get different tie orders"
    tied = {tuple(idx[1 + g * BN].tolist()) for g in range(G)}
    assert len(tied) > 1, "identical tied rows in different blocks chose the same latents"
    for r in range(G * BN):
        want = sorted(zip(rounded[r].tolist(), (ids ^ salt[r // BN]).tolist(), ids.tolist()),
                      reverse=True)[:K]
        assert idx[r].tolist() == [i for *_, i in want], f"row {r}: wrong order or ids"
        assert acts[r].float().tolist() == [max(v, 0.0) for v, *_ in want], f"row {r}: values"


def nan_latent_case(mod, dtype, device="cpu"):
    """A NaN row of W_enc: torch ranks NaN above every number and relu keeps it, so every token
    must pick that latent first with a NaN activation, and the rest as without it."""
    N, D, M, k = 5, 48, 100, 4
    x = torch.randn(N, D, device=device).to(dtype)
    W = (torch.randn(M, D, device=device) / D**0.5).to(dtype)
    b_enc, b_dec = torch.zeros(M, device=device, dtype=dtype), torch.zeros(D, device=device,
                                                                           dtype=dtype)
    W[37] = float("nan")
    out = mod.topk_encode(x, W, b_enc, b_dec, k)
    assert (out.top_indices[:, 0] == 37).all() and out.top_acts[:, 0].isnan().all(), (
        f"NaN latent not first or not NaN: {out.top_indices[:, 0]}, {out.top_acts[:, 0]}")
    rest = mod.topk_encode(x, W[torch.arange(M, device=device) != 37].contiguous(),
                           b_enc[:-1].contiguous(), b_dec, k - 1)
    assert_close(out.top_acts[:, 1:].float(), rest.top_acts.float(), atol=0, rtol=0,
                 name="the other latents")


@interpreter
def test_topk_encode_nan_latent(small_encode_tiles):
    nan_latent_case(ENCODE, torch.float16)


# the paper's shape (N=16384, D=768, M=12288, K=32 and 128) with 1% dead (AuxK fused) and a third
# dead (k_aux=384: AuxK fused at width 512 in fp16/bf16, on the reference path in fp32); K=300
# (top-k on the reference path)
PAPER_ENCODE_SHAPES = [
    (16384, 768, 12288, 32, "1pct", 384, False),
    (16384, 768, 12288, 128, "1pct", 384, False),
    (16384, 768, 12288, 32, "some", 384, False),
    (4096, 576, 9216, 32, "none", 0, True),
    (64, 48, 1000, 300, "some", 20, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ENCODE_SHAPES + PAPER_ENCODE_SHAPES,
                         ids=lambda s: "-".join(map(str, s)))
def test_topk_encode_cuda(shape, dtype):
    out = encode_case(ENCODE, *shape, dtype, device="cuda")
    # sort + segment reductions: no atomics, so two backward runs agree bit for bit
    idx = out.top_indices
    g = torch.randn(idx.shape, device="cuda").to(dtype)
    W = torch.randn(shape[2], shape[1], device="cuda").to(dtype)
    xc = torch.randn(shape[0], shape[1], device="cuda").to(dtype)
    first, second = (ENCODE.topk_encode_backward(xc, W, idx, g) for _ in range(2))
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_encode_cuda_nan_latent(dtype):
    """Compiled, tl.maximum would turn NaN into 0 unless told to propagate it."""
    nan_latent_case(ENCODE, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("k", [32, 128])
def test_topk_encode_cuda_never_writes_pre(k):
    """The fused forward's extra memory is its outputs: far below the N×M×4 bytes of pre."""
    N, D, M = 16384, 768, 12288
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    W = (torch.randn(M, D, device="cuda") / D**0.5).to(torch.bfloat16)
    b_enc = torch.zeros(M, device="cuda", dtype=torch.bfloat16)
    b_dec = torch.zeros(D, device="cuda", dtype=torch.bfloat16)
    dead = make_dead(M, "1pct", "cuda")
    ENCODE.topk_encode(x, W, b_enc, b_dec, k, dead, 384)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ENCODE.topk_encode(x, W, b_enc, b_dec, k, dead, 384)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert out.aux_acts.shape[1] == int(dead.sum())
    assert extra < N * M * 4 / 10, f"{extra / 2**20:.0f} MiB extra: pre-activations materialized?"


SELF_CHECK_OPS = {"topk_encode": ENCODE, "topk_encode_backward": ENCODE,
                  "sparse_decode": DECODE, "sparse_decode_backward": DECODE,
                  "project_decoder_grad_": NORM, "renorm_decoder_": NORM}


def _call_args(op):
    """One CPU fp32 call of `op` (D = 48, K = 7, AuxK on)."""
    N, D, M, K = 20, 48, 100, 7
    W = torch.randn(M, D) / D ** 0.5
    idx = torch.randint(0, M, (N, K))
    return {"topk_encode": (torch.randn(N, D), W, torch.randn(M) * 0.1, torch.randn(D) * 0.1, K,
                            torch.rand(M) < 0.3, 24),
            "topk_encode_backward": (torch.randn(N, D), W, idx, torch.randn(N, K), True),
            "sparse_decode": (idx, torch.randn(N, K), W),
            "sparse_decode_backward": (torch.randn(N, D), idx, torch.randn(N, K), W, True, True),
            "project_decoder_grad_": (W, torch.randn(M, D)),
            "renorm_decoder_": (W,)}[op]


def _broken(op, real):
    """`real` with a 10 % error in what it returns or writes."""
    def launcher(*args):
        out = real(*args)
        if op in ("project_decoder_grad_", "renorm_decoder_"):
            args[-1].mul_(1.1)
            return out
        first = out[0]
        first.mul_(1.1)
        return out
    return launcher


@interpreter
@pytest.mark.parametrize("op", list(SELF_CHECK_OPS))
def test_self_check_trusts_each_kernel_and_catches_a_broken_one(op):
    import warnings

    from lgsae import selfcheck

    real = getattr(SELF_CHECK_OPS[op], op)
    selfcheck.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real (interpreted) kernel passes without a warning
        assert selfcheck.choose(op, real, _call_args(op)) is real
        assert selfcheck.choose(op, real, _call_args(op)) is real  # probed once per class
    assert [r["ok"] for r in selfcheck.RESULTS] == [True]
    selfcheck.reset()
    with pytest.warns(RuntimeWarning, match=f"the Triton kernel for {op} does not match its "
                                            "reference on cpu"):
        fn = selfcheck.choose(op, _broken(op, real), _call_args(op))
    assert fn is getattr(reference, op)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls take the reference silently
        assert selfcheck.choose(op, _broken(op, real), _call_args(op)) is fn
    selfcheck.reset()


@interpreter
def test_a_broken_launcher_falls_back_through_ops(monkeypatch):
    from lgsae import ops, selfcheck

    selfcheck.reset()
    broken = _broken("sparse_decode", DECODE.sparse_decode)
    monkeypatch.setattr(ops, "triton_launcher",
                        lambda op, t: broken if op == "sparse_decode" else None)
    idx, acts, W = _call_args("sparse_decode")
    with pytest.warns(RuntimeWarning, match="sparse_decode does not match"):
        out = ops.sparse_decode(idx, acts, W)
    assert_close(out, reference.sparse_decode(idx, acts, W), atol=1e-6, name="fallback")
    monkeypatch.setenv("LGSAE_KERNEL_CHECK", "0")  # skipped: the launcher runs unchecked
    selfcheck.reset()
    assert not torch.allclose(ops.sparse_decode(idx, acts, W),
                              reference.sparse_decode(idx, acts, W))
    selfcheck.reset()
