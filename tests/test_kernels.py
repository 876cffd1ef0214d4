"""Triton launchers (sparse_decode, decoder_norm) against their `lgsae.reference` twins.

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
from lgsae.kernels import decoder_norm as NORM  # noqa: E402
from lgsae.kernels import sparse_decode as DECODE  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

KERNELS = [DECODE._decode_fwd_kernel, DECODE._decode_dacts_kernel, DECODE._decode_dw_kernel,
           NORM._project_grad_kernel, NORM._renorm_kernel]
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
