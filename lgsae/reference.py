"""Pure-torch twins of the Triton launchers in `lgsae.kernels`.

One definition, three uses: the test oracle for the kernels, the CPU engine, and the benchmark
baseline. Shape letters everywhere: N tokens, D model width, M latents, K active latents per token.

Every function here is sparse in the sense of DESIGN §4: the only O(N·D·M) work is the encoder GEMM
in `topk_encode`; everything else is O(N·K·D) or O(M·D). Reductions over (token, slot) pairs are
done as sparse-matrix products (CSR × dense, and sampled dense × dense), which torch runs on MKL or
cuSPARSE; half-precision inputs are reduced in fp32 and cast at the end.
"""

from __future__ import annotations

import threading
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# torch warns once per process that CSR support is "beta"; the two ops used here are long stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class EncodeOut(NamedTuple):
    """When fewer than K pre-activations of a row are positive, some chosen latents have act 0:
    count a latent as firing from `top_acts > 0`, not from its presence in `top_indices`."""

    top_acts: Tensor  # [N, K] post-ReLU activations of the chosen latents
    top_indices: Tensor  # [N, K] int64 latent ids
    aux_acts: Tensor  # [N, K_aux] post-ReLU activations of the top dead latents (K_aux may be 0)
    aux_indices: Tensor  # [N, K_aux] int64; one row as a stride-0 view when all dead are chosen


_workspace = threading.local()


def _pre_buffer(N: int, M: int, like: Tensor) -> Tensor | None:
    """A reused [N, M] buffer for the pre-activations on CPU (None elsewhere).

    A fresh N×M tensor is far above glibc's mmap threshold, so each step would map, first-touch
    (page-fault) and unmap ~150 MB at the benchmark shape: about 35 ms of a 250 ms GEMM. One
    buffer per thread is kept instead. CUDA's caching allocator already reuses memory.
    """
    if like.device.type != "cpu":
        return None
    buf = getattr(_workspace, "pre", None)
    if buf is None or buf.numel() < N * M or buf.dtype != like.dtype:
        _workspace.pre = None  # free the old one before allocating the new
        # a normal tensor even if the first call runs under inference_mode, so later calls
        # outside it can still write into it
        with torch.inference_mode(False):
            buf = _workspace.pre = torch.empty(N * M, dtype=like.dtype)
    return buf[: N * M].view(N, M)


def free_workspace() -> None:
    """Release this thread's reused pre-activation buffer (N×M of the largest batch seen) and
    its last sorted index pattern."""
    _workspace.pre = _workspace.order = None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradient checks); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def same_on_every_row(indices: Tensor) -> bool:
    """Whether indices[N, J] is one row repeated as a stride-0 view (topk_encode's AuxK indices
    when every dead latent is chosen): products over it are dense over those J latents."""
    return indices.dim() == 2 and indices.shape[1] > 0 and indices.stride(0) == 0


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> EncodeOut:
    """topk_encode(x[N,D], W_enc[M,D], b_enc[M], b_dec[D], k) -> EncodeOut.

    Equals `ReLU((x - b_dec) @ W_enc.T + b_enc).topk(k)` (values and indices, unsorted). With a
    `dead_mask[M]` (bool) and `k_aux > 0`, also the top-min(k_aux, #dead) latents among the dead
    ones, for the AuxK loss. ReLU commutes with top-k (it is monotone), so it is applied to the K
    chosen values only, never to the N×M pre-activations.
    """
    N, D = x.shape
    M = W_enc.shape[0]
    if not 1 <= k <= M:
        raise ValueError(f"k must be in [1, {M}] (the number of latents), got {k}")
    # [N, M]: the one dense GEMM of a step. Only top-k reads it, so a reused buffer is safe.
    pre = torch.addmm(b_enc, x - b_dec, W_enc.t(), out=_pre_buffer(N, M, x))
    top_vals, top_idx = pre.topk(k, dim=1, sorted=False)
    aux_acts = x.new_empty(N, 0)
    aux_idx = top_idx.new_empty(N, 0)
    if dead_mask is not None and k_aux > 0:
        # a host mask (the trainer's) gives the indices without a device read
        dead = dead_mask.nonzero().squeeze(1).to(pre.device, non_blocking=True)
        kk = min(k_aux, dead.numel())
        if kk > 0 and kk == dead.numel():
            # k_aux covers every dead latent (the usual case: k_aux = D/2 against 1-3 % of M):
            # no selection to make. The indices are the same on every row, returned as a
            # stride-0 view, which lgsae.ops and GroupSAE take as "dense over the dead set" and
            # turn into GEMMs instead of N·kk-pair gathers and scatters.
            aux_acts, aux_idx = pre.index_select(1, dead).relu_(), dead.expand(N, kk)
        elif kk > 0:
            # Gather only the dead columns: cheaper than masking all N×M entries when few are dead.
            vals, j = pre.index_select(1, dead).topk(kk, dim=1, sorted=False)
            aux_acts, aux_idx = vals.relu_(), dead[j]
    return EncodeOut(top_vals.relu_(), top_idx, aux_acts, aux_idx)


def _latent_order(indices: Tensor, M: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, crow, cols) of the (token, slot) pairs of indices[N, J] sorted by latent: CSR row
    pointers over M latents and each sorted pair's token.

    Kept for the last `indices` seen on this thread: a step's decoder and encoder backward both
    reduce over the same top-k indices, and the sort is most of the pattern's cost. The entry
    holds that tensor, so its memory cannot be reused while the entry lives: a matching pointer,
    version and shape is the same, unchanged tensor.
    """
    # inference tensors have no version counter: not kept
    key = None if indices.is_inference() else (
        indices.data_ptr(), indices._version, tuple(indices.shape), tuple(indices.stride()),
        indices.device, M)
    hit = getattr(_workspace, "order", None)
    if key is not None and hit is not None and hit[0] == key:
        return hit[2]
    J = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(M + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(flat, minlength=M), 0, out=crow[1:])
    cols = torch.div(order, J, rounding_mode="floor")  # the token each sorted pair came from
    _workspace.order = None if key is None else (key, indices, (order, crow, cols))
    return order, crow, cols


def _pairs_by_latent(indices: Tensor, weights: Tensor, M: int, acc: torch.dtype) -> Tensor:
    """The [M, N] CSR matrix S with S[indices[n, j], n] += weights[n, j] (duplicates add up)."""
    order, crow, cols = _latent_order(indices, M)
    vals = weights.reshape(-1).to(acc)[order]
    return torch.sparse_csr_tensor(crow, cols, vals, (M, indices.shape[0]),
                                   check_invariants=False)


def scatter_rows(indices: Tensor, weights: Tensor, rows: Tensor, M: int) -> Tensor:
    """out[M, D] with out[m] = Σ_{(n,j): indices[n,j]=m} weights[n,j]·rows[n], in the accumulation
    dtype. The per-latent segment reduction behind dW_enc and dW_dec."""
    acc = _acc_dtype(rows.dtype)
    if indices.numel() == 0:
        return rows.new_zeros(M, rows.shape[1], dtype=acc)
    return _pairs_by_latent(indices, weights, M, acc) @ rows.to(acc)


def gather_dot(indices: Tensor, rows: Tensor, table: Tensor) -> Tensor:
    """out[N, J] with out[n, j] = ⟨rows[n], table[indices[n, j]]⟩ (sampled dense-dense product)."""
    N, J = indices.shape
    acc = _acc_dtype(rows.dtype)
    if indices.numel() == 0:
        return rows.new_zeros(N, J, dtype=acc)
    crow = torch.arange(0, N * J + 1, J, device=indices.device)
    pattern = torch.sparse_csr_tensor(
        crow, indices.reshape(-1), rows.new_zeros(N * J, dtype=acc), (N, table.shape[0]),
        check_invariants=False,
    )
    out = torch.sparse.sampled_addmm(pattern, rows.to(acc), table.to(acc).t(), beta=0.0)
    return out.values().view(N, J)


def topk_encode_backward(
    xc: Tensor, W_enc: Tensor, indices: Tensor, grad_pre: Tensor, need_x_grad: bool = False,
    grad_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of the encoder given the gradient at the chosen pre-activations.

    xc[N,D] = x − b_dec, indices[N,J], grad_pre[N,J] (already zero where ReLU was inactive).
    Returns (dxc[N,D] or None, dW_enc[M,D], db_enc[M]), the parameter gradients in `grad_dtype`
    (default W_enc's: a wider master's dtype skips the rounding to W_enc's); equals autograd of
    `pre = xc @ W_enc.T + b_enc` with d(pre) scattered from grad_pre, without forming d(pre).
    """
    M = W_enc.shape[0]
    acc = _acc_dtype(W_enc.dtype)
    out = grad_dtype or W_enc.dtype
    dW = scatter_rows(indices, grad_pre, xc, M).to(out)
    db = torch.bincount(indices.reshape(-1), grad_pre.reshape(-1).to(acc), minlength=M)
    dxc = None
    if need_x_grad:
        dxc = sparse_decode(indices, grad_pre.to(W_enc.dtype), W_enc).to(xc.dtype)
    return dxc, dW, db.to(out)


def sparse_decode(indices: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
    """sparse_decode(indices[N,K], acts[N,K], W_dec[M,D]) -> [N,D] (no bias).

    Equals `F.embedding_bag(indices, W_dec, per_sample_weights=acts, mode='sum')`, i.e.
    Σ_j acts[n,j]·W_dec[indices[n,j]].
    """
    N, K = indices.shape
    if K == 0:
        return W_dec.new_zeros(N, W_dec.shape[1])
    return F.embedding_bag(indices, W_dec, per_sample_weights=acts.to(W_dec.dtype), mode="sum")


def sparse_decode_backward(
    grad_out: Tensor,
    indices: Tensor,
    acts: Tensor,
    W_dec: Tensor,
    need_acts_grad: bool = True,
    need_W_grad: bool = True,
    grad_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(d_acts[N,K], dW_dec[M,D]) for `sparse_decode`: d_acts[n,j] = ⟨g[n], W_dec[i_nj]⟩ and
    dW_dec[m] = Σ_{(n,j): i_nj=m} acts[n,j]·g[n], in `grad_dtype` (default W_dec's)."""
    grad_out = grad_out.to(_acc_dtype(W_dec.dtype))  # once, for both products
    d_acts = gather_dot(indices, grad_out, W_dec).to(acts.dtype) if need_acts_grad else None
    dW = None
    if need_W_grad:
        dW = scatter_rows(indices, acts, grad_out, W_dec.shape[0]).to(grad_dtype or W_dec.dtype)
    return d_acts, dW


@torch.no_grad()
def project_decoder_grad_(W_dec: Tensor, grad: Tensor) -> Tensor:
    """In place: grad[m] −= ⟨grad[m], W_dec[m]⟩·W_dec[m] (rows of W_dec have unit norm), so a step
    does not change row norms to first order. Returns grad."""
    acc = _acc_dtype(grad.dtype)
    # vecdot: one fused multiply-and-reduce per row (einsum's batched 1×D·D×1 GEMMs cost ~4x)
    par = torch.linalg.vecdot(grad.to(acc), W_dec.to(acc))
    grad.addcmul_(par.to(grad.dtype).unsqueeze(1), W_dec, value=-1)
    return grad


@torch.no_grad()
def renorm_decoder_(W_dec: Tensor) -> Tensor:
    """In place: every row of W_dec scaled to unit L2 norm. Returns W_dec."""
    norm = torch.linalg.vector_norm(W_dec, dim=1, keepdim=True, dtype=_acc_dtype(W_dec.dtype))
    W_dec.div_(norm.clamp_min(torch.finfo(norm.dtype).tiny).to(W_dec.dtype))
    return W_dec


class DenseOut(NamedTuple):
    """Same fields as `lgsae.sae.ForwardOutput`, so either can feed a training step."""

    recon: Tensor  # [N, D] in the input's space (scaled, if the caller scaled)
    top_acts: Tensor  # [N, K]
    top_indices: Tensor  # [N, K]
    fvu: Tensor
    auxk_loss: Tensor


def dense_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> DenseOut:
    """The same TopK SAE written densely, differentiated by plain autograd: N×M latents, a dense
    decoder GEMM. The oracle for the sparse path's gradients and the `dense` benchmark provider."""
    pre = torch.relu((x - b_dec) @ W_enc.t() + b_enc)
    vals, idx = pre.topk(k, dim=1, sorted=False)
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    recon = z @ W_dec + b_dec
    acc = _acc_dtype(x.dtype)
    x32, resid = x.to(acc), (x - recon).to(acc)
    total_var = (x32 - x32.mean(0)).pow(2).sum()
    fvu = resid.pow(2).sum() / total_var
    auxk = fvu.new_zeros(())
    num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
    if k_aux > 0 and num_dead > 0:
        kk = min(k_aux, num_dead)
        masked = torch.where(dead_mask.to(pre.device), pre, torch.full_like(pre, -torch.inf))
        a_vals, a_idx = masked.topk(kk, dim=1, sorted=False)
        e_hat = torch.zeros_like(pre).scatter(1, a_idx, a_vals) @ W_dec
        auxk = (e_hat.to(acc) - resid.detach()).pow(2).sum() / total_var
        auxk = min(num_dead / k_aux, 1.0) * auxk
    return DenseOut(recon, vals, idx, fvu, auxk)
