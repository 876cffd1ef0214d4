"""Autograd layer: each Function only calls launchers, from `lgsae.kernels` or `lgsae.reference`.

The choice is made per call from the tensors (DESIGN §3): the Triton launcher when the tensor is on
CUDA, triton imports, the kernel module provides that launcher and `LGSAE_DISABLE_TRITON` is not
set; otherwise the pure-torch twin, which is also the CPU engine. A launcher runs only after it
matched the twin on a small probe of the call's class (lgsae.selfcheck; LGSAE_KERNEL_CHECK=0
skips that).
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from lgsae import reference, selfcheck
from lgsae.reference import EncodeOut

# launcher name -> module under lgsae.kernels that holds it (DESIGN §3: one file per op)
_KERNEL_MODULES = {
    "topk_encode": "topk_encode",
    "topk_encode_backward": "topk_encode",
    "sparse_decode": "sparse_decode",
    "sparse_decode_backward": "sparse_decode",
    "project_decoder_grad_": "decoder_norm",
    "renorm_decoder_": "decoder_norm",
}


@lru_cache(maxsize=None)
def _kernel_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"lgsae.kernels.{name}")
    except ImportError:  # triton missing, or that kernel not shipped in this version
        return None


def triton_disabled() -> bool:
    return os.environ.get("LGSAE_DISABLE_TRITON", "0") not in ("", "0", "false", "False")


def triton_launcher(op: str, t: Tensor):
    """The Triton launcher for `op` on tensors like `t`, or None (CPU tensor, no triton, the
    kernel not shipped, or LGSAE_DISABLE_TRITON)."""
    if t.is_cuda and not triton_disabled():
        mod = _kernel_module(_KERNEL_MODULES[op])
        if mod is not None and hasattr(mod, op):
            return getattr(mod, op)
    return None


def impl(op: str, t: Tensor):
    """The function that runs `op` for tensors like `t`: a Triton launcher (once it passed
    lgsae.selfcheck's probe for the call's class) or its reference twin."""
    launcher = triton_launcher(op, t)
    if launcher is None:
        return getattr(reference, op)
    return lambda *args: selfcheck.choose(op, launcher, args)(*args)


class TopKEncode(torch.autograd.Function):
    """top-k encode whose backward touches only the chosen entries (top-K and AuxK's).

    The parameters may be master copies in a wider dtype than x (mixed precision): the product
    runs on their casts to x's dtype, made here outside autograd, and their gradients come back
    in their own dtype straight from the fp32 accumulation (no round trip through x's dtype, and
    no autograd cast node that would copy the M×D gradient again)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, dead_mask, k_aux):
        ctx.dtypes = W_enc.dtype, b_enc.dtype, b_dec.dtype
        W_enc, b_enc, b_dec = (t.to(x.dtype) for t in (W_enc, b_enc, b_dec))
        out = impl("topk_encode", x)(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
        ctx.mark_non_differentiable(out.top_indices, out.aux_indices)
        ctx.save_for_backward(x, W_enc, b_dec, *out)
        return tuple(out)

    @staticmethod
    def backward(ctx, g_top, _g_idx, g_aux, _g_aux_idx):
        x, W_enc, b_dec, top_acts, top_idx, aux_acts, aux_idx = ctx.saved_tensors
        need_x, need_W, need_benc, need_bdec = ctx.needs_input_grad[:4]
        W_dtype, benc_dtype, bdec_dtype = ctx.dtypes
        # AuxK over every dead latent (the same indices on each row): dense over the dead set
        dense = g_aux if g_aux is not None and reference.same_on_every_row(aux_idx) else None
        grads, idx = [], []
        sparse = [(g_top, top_acts, top_idx)] + ([(g_aux, aux_acts, aux_idx)] if dense is None
                                                 else [])
        for g, acts, i in sparse:
            if g is not None and i.shape[1] > 0:
                grads.append(g * (acts > 0))  # ReLU's gradient, at the chosen entries only
                idx.append(i)
        if not grads and dense is None:
            return None, None, None, None, None, None, None
        xc = x - b_dec
        if grads:
            g, i = (grads[0], idx[0]) if len(grads) == 1 else \
                (torch.cat(grads, 1), torch.cat(idx, 1))
            dxc, dW, db = impl("topk_encode_backward", x)(xc, W_enc, i, g, need_x, W_dtype)
        else:
            dxc = torch.zeros_like(x) if need_x else None
            dW, db = (torch.zeros_like(W_enc, dtype=W_dtype),
                      W_enc.new_zeros(W_enc.shape[0], dtype=W_dtype))
        if dense is not None:
            # GEMMs over the kk dead latents in the accumulation dtype, as the sparse
            # reductions they replace: dW_enc[dead] += gᵀ·xc, db_enc[dead] += Σ_n g
            acc = torch.promote_types(W_dtype, torch.float32)
            g, cols = (dense * (aux_acts > 0)).to(acc), aux_idx[0]
            dW.index_add_(0, cols, (g.t() @ xc.to(acc)).to(dW.dtype))
            db.index_add_(0, cols, g.sum(0).to(db.dtype))
            if dxc is not None:
                dxc += (g @ W_enc[cols].to(acc)).to(dxc.dtype)
        if need_bdec:
            # x − b_dec: d b_dec = −Σ_n dxc[n] = −db_enc·W_enc, O(M·D) work instead of O(N·K·D)
            d_bdec = -dxc.sum(0) if dxc is not None else -(db.to(W_enc.dtype) @ W_enc)
        return (
            dxc if need_x else None,
            dW if need_W else None,
            db.to(benc_dtype) if need_benc else None,
            d_bdec.to(bdec_dtype) if need_bdec else None,
            None,
            None,
            None,
        )


class SparseDecode(torch.autograd.Function):
    """Σ_j acts[n,j]·W_dec[indices[n,j]] with a gather/segment-sum backward; W_dec may be a wider
    master copy, cast to `compute_dtype` here (see TopKEncode)."""

    @staticmethod
    def forward(ctx, indices, acts, W_dec, compute_dtype):
        ctx.W_dtype = W_dec.dtype
        W_dec = W_dec.to(compute_dtype or W_dec.dtype)
        ctx.save_for_backward(indices, acts, W_dec)
        return impl("sparse_decode", W_dec)(indices, acts, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        indices, acts, W_dec = ctx.saved_tensors
        _, need_acts, need_W, _ = ctx.needs_input_grad
        d_acts, dW = impl("sparse_decode_backward", W_dec)(
            grad_out.contiguous(), indices, acts, W_dec, need_acts, need_W, ctx.W_dtype
        )
        return None, d_acts, dW, None


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> EncodeOut:
    """Differentiable `reference.topk_encode` (see there for shapes and semantics). The product
    runs in x's dtype; W_enc, b_enc and b_dec may be wider masters (mixed precision), which get
    their gradients in their own dtype."""
    return EncodeOut(*TopKEncode.apply(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux))


def sparse_decode(indices: Tensor, acts: Tensor, W_dec: Tensor,
                  compute_dtype: torch.dtype | None = None) -> Tensor:
    """Differentiable `reference.sparse_decode`: [N,K] indices and acts, [M,D] W_dec -> [N,D] in
    `compute_dtype` (default W_dec's). With a narrower compute_dtype, W_dec is a master copy: the
    product runs on its cast and its gradient comes back in its own dtype."""
    return SparseDecode.apply(indices, acts, W_dec, compute_dtype)


def project_decoder_grad_(W_dec: Tensor, grad: Tensor) -> Tensor:
    """Remove from each decoder row's gradient its component along the row (in place)."""
    return impl("project_decoder_grad_", W_dec)(W_dec, grad)


def renorm_decoder_(W_dec: Tensor) -> Tensor:
    """Scale every decoder row to unit norm (in place)."""
    return impl("renorm_decoder_", W_dec)(W_dec)
