"""Decoder-row constraints of a TopK SAE (DESIGN §1, §4): before the optimizer step remove from each
row's gradient its component along the row; after it rescale rows to unit norm.

Each is one pass over M×D: a program owns BLOCK_M whole rows in registers, reduces along D in fp32
(fp64 for fp64 inputs) and writes in place. Rows wider than MAX_ROW_BLOCK are done in two sweeps
over D (reduce, then update), reading the row twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_ROW_BLOCK = 8192  # widest row held whole in registers (8192 fp32 over 8 warps: 32 per thread)


@triton.jit
def _project_grad_kernel(
    w_ptr,  # [M, D] float, rows of unit norm
    g_ptr,  # [M, D] float, updated in place
    M,
    D,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_SWEEP: tl.constexpr,  # BLOCK_D >= D: the rows stay in registers between reduce and update
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    if ONE_SWEEP:
        offs_d = tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (offs_d < D)[None, :]
        ptrs = rows[:, None] * D + offs_d[None, :]
        w = tl.load(w_ptr + ptrs, mask=mask, other=0).to(ACC)
        g = tl.load(g_ptr + ptrs, mask=mask, other=0).to(ACC)
        par = tl.sum(g * w, axis=1)
        tl.store(g_ptr + ptrs, (g - par[:, None] * w).to(g_ptr.dtype.element_ty), mask=mask)
    else:
        par = tl.zeros([BLOCK_M], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_m[:, None] & (offs_d < D)[None, :]
            ptrs = rows[:, None] * D + offs_d[None, :]
            w = tl.load(w_ptr + ptrs, mask=mask, other=0).to(ACC)
            g = tl.load(g_ptr + ptrs, mask=mask, other=0).to(ACC)
            par += tl.sum(g * w, axis=1)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_m[:, None] & (offs_d < D)[None, :]
            ptrs = rows[:, None] * D + offs_d[None, :]
            w = tl.load(w_ptr + ptrs, mask=mask, other=0).to(ACC)
            g = tl.load(g_ptr + ptrs, mask=mask, other=0).to(ACC)
            tl.store(g_ptr + ptrs, (g - par[:, None] * w).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _renorm_kernel(
    w_ptr,  # [M, D] float, updated in place
    M,
    D,
    ACC: tl.constexpr,
    TINY: tl.constexpr,  # smallest normal of ACC: the norm is clamped there, like the reference
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_SWEEP: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    if ONE_SWEEP:
        offs_d = tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (offs_d < D)[None, :]
        ptrs = rows[:, None] * D + offs_d[None, :]
        w = tl.load(w_ptr + ptrs, mask=mask, other=0).to(ACC)
        norm = tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), TINY)
        tl.store(w_ptr + ptrs, (w / norm[:, None]).to(w_ptr.dtype.element_ty), mask=mask)
    else:
        sq = tl.zeros([BLOCK_M], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_m[:, None] & (offs_d < D)[None, :]
            w = tl.load(w_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0).to(ACC)
            sq += tl.sum(w * w, axis=1)
        norm = tl.maximum(tl.sqrt(sq), TINY)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_m[:, None] & (offs_d < D)[None, :]
            ptrs = rows[:, None] * D + offs_d[None, :]
            w = tl.load(w_ptr + ptrs, mask=mask, other=0).to(ACC)
            tl.store(w_ptr + ptrs, (w / norm[:, None]).to(w_ptr.dtype.element_ty), mask=mask)


def block_config(D: int) -> dict:
    """BLOCK_D = next power of two of D (capped at MAX_ROW_BLOCK, then looped); narrow rows are
    stacked BLOCK_M to a program so each program moves about 4K elements per tensor."""
    block_d = min(triton.next_power_of_2(max(D, 1)), MAX_ROW_BLOCK)
    block_m = max(1, min(16, 4096 // block_d))
    tile = block_m * block_d
    num_warps = 1 if tile <= 256 else 2 if tile <= 512 else 4 if tile <= 4096 else 8
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "ONE_SWEEP": block_d >= D,
            "num_warps": num_warps}


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_rows(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be [M, D]; got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point; got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() once after loading)")


def project_decoder_grad_(W_dec: Tensor, grad: Tensor) -> Tensor:
    """In place: grad[m] −= ⟨grad[m], W_dec[m]⟩·W_dec[m] for W_dec[M,D], grad[M,D]. Returns grad.

    Equals `grad.sub_((grad * W_dec).sum(1, keepdim=True) * W_dec)` with the dot in fp32.
    """
    _check_rows("W_dec", W_dec)
    _check_rows("grad", grad)
    if grad.shape != W_dec.shape:
        raise ValueError(f"grad {tuple(grad.shape)} must have W_dec's shape {tuple(W_dec.shape)}")
    if grad.device != W_dec.device:
        raise ValueError(f"grad is on {grad.device} but W_dec on {W_dec.device}: move it")
    M, D = W_dec.shape
    if M == 0 or D == 0:
        return grad
    cfg = block_config(D)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _project_grad_kernel[grid](W_dec, grad, M, D, ACC=_acc(grad.dtype), **cfg)
    return grad


def renorm_decoder_(W_dec: Tensor) -> Tensor:
    """In place: every row of W_dec[M,D] scaled to unit L2 norm. Returns W_dec.

    Equals `W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(tiny))` with the norm and the
    division in fp32 (`tiny` = fp32's smallest normal), so all-zero rows stay zero.
    """
    _check_rows("W_dec", W_dec)
    M, D = W_dec.shape
    if M == 0 or D == 0:
        return W_dec
    acc_dtype = torch.float64 if W_dec.dtype == torch.float64 else torch.float32
    cfg = block_config(D)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    tiny = torch.finfo(acc_dtype).tiny
    _renorm_kernel[grid](W_dec, M, D, ACC=_acc(W_dec.dtype), TINY=tiny, **cfg)
    return W_dec
