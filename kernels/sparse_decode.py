"""Sparse decode: x̂[n] = Σ_j acts[n,j]·W_dec[idx[n,j]] and its two gradients (DESIGN §4).

All three kernels are O(N·K·D) gathers with fp32 accumulation (fp64 for fp64 inputs). dW_dec is a
per-latent segment reduction over (token, slot) pairs sorted by latent, in the spirit of the
CSR × dense product of `lgsae.reference.scatter_rows`: each program owns one latent row and one D
tile and writes it once, so the result is deterministic and needs no zero-fill and no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _decode_fwd_kernel(
    idx_ptr,  # [N, K] int64
    acts_ptr,  # [N, K] float
    w_ptr,  # [M, D] float
    out_ptr,  # [N, D] dtype of W_dec
    K,
    D,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=0)
        a = tl.load(acts_ptr + n * K + offs_k, mask=mask_k, other=0).to(ACC)
        # a [BLOCK_K, BLOCK_D] tile of gathered decoder rows: K loads in flight, not one at a time
        w = tl.load(
            w_ptr + rows[:, None] * D + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0,
        ).to(ACC)
        acc += tl.sum(a[:, None] * w, axis=0)
    tl.store(out_ptr + n * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _decode_dacts_kernel(
    grad_ptr,  # [N, D] float
    idx_ptr,  # [N, K] int64
    w_ptr,  # [M, D] float
    dacts_ptr,  # [N, K] dtype of acts
    K,
    D,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rows = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=0)
    acc = tl.zeros([BLOCK_K], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(grad_ptr + n * D + offs_d, mask=mask_d, other=0).to(ACC)
        w = tl.load(
            w_ptr + rows[:, None] * D + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0,
        ).to(ACC)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(dacts_ptr + n * K + offs_k, acc.to(dacts_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _decode_dw_kernel(
    grad_ptr,  # [N, D] float
    acts_ptr,  # [N, K] float
    order_ptr,  # [N*K] int64: flat (n, j) pair ids sorted by latent
    starts_ptr,  # [M + 1] int64: latent m owns order[starts[m]:starts[m+1]]
    dw_ptr,  # [M, D] dtype of W_dec
    K,
    D,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(starts_ptr + m)
    end = tl.load(starts_ptr + m + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        pair = tl.load(order_ptr + offs_p, mask=mask_p, other=0)
        a = tl.load(acts_ptr + pair, mask=mask_p, other=0).to(ACC)
        token = pair // K
        g = tl.load(
            grad_ptr + token[:, None] * D + offs_d[None, :],
            mask=mask_p[:, None] & mask_d[None, :],
            other=0,
        ).to(ACC)
        acc += tl.sum(a[:, None] * g, axis=0)
    tl.store(dw_ptr + m * D + offs_d, acc.to(dw_ptr.dtype.element_ty), mask=mask_d)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_config(D: int) -> dict:
    """Block sizes for all three kernels, from D alone (K only sets the loop count).

    A [16, BLOCK_D] tile of gathered rows keeps 16 loads in flight per program; BLOCK_D ≤ 256 keeps
    that tile at 32 fp32 registers per thread with 4 warps and gives N·⌈D/256⌉ programs.
    """
    return {"BLOCK_K": 16, "BLOCK_D": min(triton.next_power_of_2(D), 256), "num_warps": 4}


def _check(indices: Tensor, acts: Tensor, W_dec: Tensor) -> None:
    if indices.dim() != 2 or acts.shape != indices.shape:
        raise ValueError(
            f"indices and acts must both be [N, K]; got {tuple(indices.shape)} and "
            f"{tuple(acts.shape)}"
        )
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [M, D]; got {tuple(W_dec.shape)}")
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64 (call .long()); got {indices.dtype}")
    for name, t in (("indices", indices), ("acts", acts)):
        if t.device != W_dec.device:
            raise ValueError(f"{name} is on {t.device} but W_dec on {W_dec.device}: move it")
    if not W_dec.is_contiguous():
        raise ValueError("W_dec must be contiguous (call .contiguous() once after loading)")
    if not (acts.is_floating_point() and W_dec.is_floating_point()):
        raise ValueError(f"acts and W_dec must be floating point; got {acts.dtype}, {W_dec.dtype}")


def sparse_decode(indices: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
    """sparse_decode(indices[N,K] int64, acts[N,K], W_dec[M,D]) -> [N,D] in W_dec's dtype.

    Equals `F.embedding_bag(indices, W_dec, per_sample_weights=acts, mode='sum')` (no bias);
    duplicated latents within a row add up. Indices must lie in [0, M): they are not bounds-checked.
    """
    _check(indices, acts, W_dec)
    indices, acts = indices.contiguous(), acts.contiguous()  # [N, K]: cheap next to the gather
    N, K = indices.shape
    D = W_dec.shape[1]
    if K == 0 or N == 0 or D == 0:
        return W_dec.new_zeros(N, D)
    out = torch.empty(N, D, dtype=W_dec.dtype, device=W_dec.device)
    cfg = block_config(D)
    grid = (N, triton.cdiv(D, cfg["BLOCK_D"]))
    _decode_fwd_kernel[grid](indices, acts, W_dec, out, K, D, ACC=_acc(W_dec.dtype), **cfg)
    return out


def sparse_decode_backward(
    grad_out: Tensor,
    indices: Tensor,
    acts: Tensor,
    W_dec: Tensor,
    need_acts_grad: bool = True,
    need_W_grad: bool = True,
    grad_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of `sparse_decode`: grad_out[N,D] -> (d_acts[N,K] in acts' dtype or None,
    dW_dec[M,D] in `grad_dtype` (default W_dec's) or None).

    d_acts[n,j] = ⟨grad_out[n], W_dec[indices[n,j]]⟩, i.e.
    `(W_dec[indices] * grad_out[:, None]).sum(-1)`;
    dW_dec = `torch.zeros_like(W_dec).index_add_(0, indices.flatten(),
    (acts[..., None] * grad_out[:, None]).flatten(0, 1))`, reduced per latent without atomics.
    """
    _check(indices, acts, W_dec)
    indices, acts = indices.contiguous(), acts.contiguous()
    N, K = indices.shape
    M, D = W_dec.shape
    if grad_out.shape != (N, D):
        raise ValueError(f"grad_out must be [N, D] = {(N, D)}; got {tuple(grad_out.shape)}")
    if grad_out.device != W_dec.device or not grad_out.is_contiguous():
        raise ValueError("grad_out must be contiguous and on W_dec's device (call .contiguous())")
    cfg = block_config(D)
    acc = _acc(W_dec.dtype)
    d_acts = dW = None
    if need_acts_grad:
        d_acts = torch.zeros(N, K, dtype=acts.dtype, device=acts.device)
        if N * K > 0 and D > 0:
            grid = (N, triton.cdiv(K, cfg["BLOCK_K"]))
            _decode_dacts_kernel[grid](grad_out, indices, W_dec, d_acts, K, D, ACC=acc, **cfg)
    if need_W_grad:
        if N * K == 0 or D == 0 or M == 0:
            dW = torch.zeros_like(W_dec, dtype=grad_dtype or W_dec.dtype)
        else:
            flat = indices.reshape(-1)
            # stable: the summation order inside a latent is fixed, so runs are bit-identical
            order = torch.argsort(flat, stable=True)
            starts = torch.zeros(M + 1, dtype=torch.int64, device=W_dec.device)
            torch.cumsum(torch.bincount(flat, minlength=M), 0, out=starts[1:])
            dW = torch.empty_like(W_dec, dtype=grad_dtype or W_dec.dtype)
            grid = (M, triton.cdiv(D, cfg["BLOCK_D"]))
            _decode_dw_kernel[grid](
                grad_out, acts, order, starts, dW, K, D, ACC=acc,
                BLOCK_P=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
            )
    return d_acts, dW
