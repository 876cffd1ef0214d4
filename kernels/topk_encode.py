"""TopK encode: ReLU((x − b_dec)·W_encᵀ + b_enc).topk(k) per row, fused with the encoder GEMM so the
N×M pre-activations never reach global memory (DESIGN §4), and its sparse backward.

Forward design. A program owns BLOCK_N rows and sweeps all M latents in BLOCK_M tiles; each
[BLOCK_N, BLOCK_M] pre tile is a `tl.dot` over D in BLOCK_D chunks with fp32 accumulation (b_dec is
subtracted from the x chunk as it is loaded, b_enc added after; fp32 inputs use exact "ieee"
products, like torch's default). Each pre value is packed with its latent id into one integer key:
the value's bits made monotone (negative floats get their low bits flipped, so signed-int order is
float order) in the high half, the id in the low half. fp32 inputs use int64 keys (the fp32 value,
a 32-bit id). fp16/bf16 inputs with M ≤ 2**16 use int32 keys: the value rounded to the input dtype,
as torch's pre-activations are, and a 16-bit id. That halves the compare/select and shuffle work of
the sorting network, which is most of the kernel's instructions, and the registers (sm_90, bf16,
K=32, no AuxK: 2,176 SASS instructions per program instead of 3,368, 124 registers instead of 151);
wider SAEs fall back to int64 keys. A sort of keys therefore carries the index along, and keys are
unique. Equal values are ordered by id ^ salt(block), a hash permutation of the ids that changes
from one block of rows to the next: ties are common with bf16 keys (at M=65536, K=32, about half
the rows of N(0,1) pre-activations tie at the k-th value), and a fixed rule such as "the larger id
wins" would starve the low ids of gradient. The running top-K of each row is a [BLOCK_N, KP] key
tile kept sorted ascending (KP = next power of two ≥ max(k, 16); padding is the smallest key). Per
tile, `tl.topk(keys, KP)` gives the tile's best KP sorted descending; the elementwise max of an
ascending and a descending sorted list is a bitonic list holding the top KP of their union, and
`tl.bitonic_merge` sorts it again in log2(KP) compare-exchange rounds (the bitonic top-k of
Shanbhag et al., "Efficient Top-K Query Processing on Massively Parallel Hardware", which tl.topk
itself uses). ReLU is monotone, so it is applied to the chosen values at the store, as in the
reference. Outputs come sorted descending. tl.topk and tl.bitonic_merge exist, unchanged, in triton
3.6 and 3.7.

AuxK. With a dead mask and k_aux > 0 the same kernel runs a second time over the dead latents
only (GATHER: their ids are loaded per tile and their rows of W_enc gathered), with its own
candidate width KA and tiles. The dead latents' pre-activations are recomputed, which costs a
GEMM over #dead latents; carrying a second running set through the main sweep instead would cost a
KA-wide merge on every tile whatever the number of dead latents (in the sm_90 SASS, bf16, K=32
plus a 256-wide set: 3.6x the instructions per pre-activation of the top-k alone), while a few
percent of latents are dead in a healthy run.

Limits, never silent: the fused kernel holds KP ≤ MAX_FUSED_K (256) keys per row in registers,
and KA as many, or up to MAX_FUSED_AUX_16BIT (512) with 16-bit inputs: compiled for sm_80/sm_90
(D % 16, key32, 8 warps), that AuxK sweep takes 255/212 registers with no spills and 135 KB of
shared memory (A100: 163 KB, H100/H200: 227 KB; sm_86/89 lack it and fall back, warned); in fp32
the same tiles need 275 KB of shared memory, more than any of them has, and 16 warps halve the
registers per thread but spill (16-176 bytes of stack); so the paper's k_aux = 384 runs fused in
bf16 (the CUDA default) and on the unfused path in fp32. Larger k runs the reference (cuBLAS
GEMM + torch.topk) in row chunks, so its N×M buffer is bounded to about FALLBACK_ELEMENTS; a
larger min(k_aux, #dead) keeps the fused top-k and runs the AuxK selection that way on the dead
latents' rows of W_enc only. fp64 inputs (gradient checks)
run the reference: an fp64 value does not fit the packed key. A NaN pre-activation (positive NaN,
as GPU arithmetic makes it) ranks above every number, as in torch.topk, and is stored as NaN.

Backward: d(pre) is non-zero only at the chosen entries. dW_enc[m] = Σ_{(n,j): idx=m} g[n,j]·xc[n]
is dW_dec of `sparse_decode` with acts → grad_pre and grad_out → xc, so it reuses that module's
sorted-segment kernel (deterministic, no atomics); db_enc is the same segment sum of g alone, over
the same order; dxc = sparse_decode(idx, g, W_enc).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from lgsae.kernels import sparse_decode as _decode
from torch import Tensor
from triton.runtime.errors import OutOfResources

from lgsae import reference
from lgsae.reference import EncodeOut

MAX_FUSED_K = 256  # largest KP (and KA) the fused kernel keeps in registers without spilling
MAX_FUSED_AUX_16BIT = 512  # largest KA with 16-bit inputs (see the module docstring)
MIN_WIDTH = 16  # smallest KP / KA compiled
FALLBACK_ELEMENTS = 1 << 26  # pre-activations per row chunk on the fallback path (256 MB fp32)
SEGMENT_BLOCK = 32  # pairs per step of the db_enc segment sum (one warp)
MAX_KEY16_LATENTS = 1 << 16  # int32 keys hold the latent id in 16 bits
# block hash for the tie order: 2**64 / golden ratio as a signed int64 (int64 products wrap)
TIE_MULT = tl.constexpr(0x9E3779B97F4A7C15 - 2**64)


@triton.jit
def _tie_salt(block, KEY16: tl.constexpr):
    """int64 program id -> an int64 salt below 2**16 (KEY16) or 2**31: the top bits of a
    multiplicative hash of the block of rows.

    Keys carry `id ^ salt` instead of the id, so values that tie (common once rounded to bf16)
    are ordered by a permutation of the ids that changes from block to block: across a batch no
    latent is systematically preferred, as a fixed larger-id-wins rule would prefer the high ids.
    One salt per block rather than per row costs BLOCK_M XORs per tile instead of BLOCK_N·BLOCK_M
    (per row cost 50 more registers at K=128 on sm_90). `tie_salt` is the torch twin.
    """
    return ((block + 1) * TIE_MULT >> 33) & (0xFFFF if KEY16 else 0x7FFFFFFF)


@triton.jit
def _pack(pre, offs_m, salt, KEY16: tl.constexpr, VAL_DTYPE: tl.constexpr):
    """fp32 [BN, BM] values, [BM] int64 latent ids and the block's salt -> keys ordered by
    (value, id ^ salt).

    KEY16 (16-bit inputs, M ≤ 2**16): int32 keys, the value rounded to VAL_DTYPE (what torch's
    fp16/bf16 pre-activations hold) made monotone in the high 16 bits, id ^ salt in the low 16.
    Else int64 keys: the fp32 value's monotone bits in the high word, id ^ salt in the low word.
    """
    if KEY16:
        bits = pre.to(VAL_DTYPE).to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
        mono = tl.where(bits < 0, bits ^ 0x7FFF, bits)
        return (mono << 16) | (offs_m ^ salt).to(tl.int32)[None, :]
    else:
        bits = pre.to(tl.int32, bitcast=True)
        mono = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (mono.to(tl.int64) << 32) | (offs_m ^ salt)[None, :]


@triton.jit
def _merge(run, keys, KP: tl.constexpr):
    """run: [BN, KP] sorted ascending; keys: [BN, BM ≥ KP] -> top KP of both, sorted ascending."""
    best = tl.topk(keys, KP)  # [BN, KP] descending
    return tl.bitonic_merge(tl.maximum(run, best), descending=False)


@triton.jit
def _store_top(run, rows, salt, mask_n, acts_ptr, idx_ptr, K, KP: tl.constexpr,
               KEY16: tl.constexpr, VAL_DTYPE: tl.constexpr):
    """Write the K largest keys of `run` (ascending) as descending values (ReLU'd; NaN stays NaN,
    as torch's relu keeps it) and ids."""
    j = KP - 1 - tl.arange(0, KP)  # output slot of each column
    if KEY16:
        hi = run >> 16  # arithmetic: the monotone 16 bits, sign-extended
        vals = tl.where(hi < 0, hi ^ 0x7FFF, hi).to(tl.int16).to(VAL_DTYPE, bitcast=True)
        vals = vals.to(tl.float32)
        ids = (run & 0xFFFF).to(tl.int64) ^ salt
    else:
        hi = (run >> 32).to(tl.int32)
        vals = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
        # the low word; id ^ salt < 2**31, so sign extension keeps it
        ids = ((run << 32) >> 32) ^ salt
    mask = mask_n[:, None] & (j < K)[None, :]
    offs = rows[:, None] * K + j[None, :]
    acts = tl.maximum(vals, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(acts_ptr + offs, acts.to(acts_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + offs, ids, mask=mask)


@triton.jit
def _topk_encode_kernel(
    x_ptr,  # [N, D] float
    w_ptr,  # [M, D] float, same dtype as x
    b_enc_ptr,  # [M] float
    b_dec_ptr,  # [D] float
    ids_ptr,  # [L] int64: the latents to sweep (read only if GATHER; else latents 0..L-1)
    acts_ptr,  # [N, K] dtype of x
    idx_ptr,  # [N, K] int64
    N,
    L,
    D,
    K,
    KP: tl.constexpr,  # candidate width: a power of two >= K
    GATHER: tl.constexpr,  # sweep the latents listed in ids_ptr (AuxK: the dead ones)
    KEY16: tl.constexpr,  # int32 keys with 16-bit values (16-bit dtypes, M <= 2**16)
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < N
    VAL: tl.constexpr = x_ptr.dtype.element_ty
    # padding key: below every packed pre-activation
    EMPTY: tl.constexpr = -(2**31) if KEY16 else -(2**63)
    KEY: tl.constexpr = tl.int32 if KEY16 else tl.int64
    salt = _tie_salt(tl.program_id(0).to(tl.int64), KEY16)  # this block's tie order
    top = tl.full([BLOCK_N, KP], EMPTY, KEY)
    for l0 in range(0, L, BLOCK_M):
        offs_l = l0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_l < L
        if GATHER:
            offs_m = tl.load(ids_ptr + offs_l, mask=mask_m, other=0)
        else:
            offs_m = offs_l
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            x = tl.load(x_ptr + rows[:, None] * D + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0)
            b = tl.load(b_dec_ptr + offs_d, mask=mask_d, other=0).to(tl.float32)
            # rounded to the input dtype before the product, as torch's `x - b_dec` is
            xc = (x.to(tl.float32) - b[None, :]).to(x.dtype)
            w = tl.load(w_ptr + offs_m[None, :] * D + offs_d[:, None],  # [BLOCK_D, BLOCK_M]
                        mask=mask_d[:, None] & mask_m[None, :], other=0)
            # fp32 inputs: exact products, as torch's default (no TF32) reference
            acc = tl.dot(xc, w, acc, input_precision="ieee")
        acc += tl.load(b_enc_ptr + offs_m, mask=mask_m, other=0).to(tl.float32)[None, :]
        keys = tl.where(mask_m[None, :], _pack(acc, offs_m, salt, KEY16, VAL), EMPTY)
        top = _merge(top, keys, KP)
    _store_top(top, rows, salt, mask_n, acts_ptr, idx_ptr, K, KP, KEY16, VAL)


@triton.jit
def _segment_sum_kernel(
    vals_ptr,  # [N*J] float: grad at the chosen entries, flat
    order_ptr,  # [N*J] int64: flat pair ids sorted by latent
    starts_ptr,  # [M + 1] int64: latent m owns order[starts[m]:starts[m+1]]
    out_ptr,  # [M] dtype of W_enc
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + m)
    end = tl.load(starts_ptr + m + 1)
    acc = tl.zeros([BLOCK_P], dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        pair = tl.load(order_ptr + offs_p, mask=mask_p, other=0)
        acc += tl.load(vals_ptr + pair, mask=mask_p, other=0).to(ACC)
    tl.store(out_ptr + m, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


def tie_salt(blocks: Tensor, key16: bool) -> Tensor:
    """Torch twin of `_tie_salt`: int64 program ids -> the salt XOR-ed into their keys' id field."""
    return ((blocks + 1) * TIE_MULT.value >> 33) & (0xFFFF if key16 else 0x7FFFFFFF)


def key16(dtype: torch.dtype, M: int) -> bool:
    """Whether the fused forward ranks int32 keys (16-bit value, 16-bit id) instead of int64 ones.

    fp16/bf16 pre-activations are rounded to that dtype by torch too, so ranking the rounded value
    selects what the reference selects (ties aside); half-width keys halve the compare/select and
    shuffle instructions of the sorting network, which is most of the kernel's instruction count.
    """
    return dtype in (torch.float16, torch.bfloat16) and M <= MAX_KEY16_LATENTS


def candidate_width(k: int) -> int:
    """Keys kept per row for a top-k: the next power of two ≥ k (tl.topk needs one), at least
    MIN_WIDTH so that few distinct kernels exist (tests/test_kernels_aot.py compiles them all)."""
    return max(triton.next_power_of_2(k), MIN_WIDTH)


def max_aux_width(dtype: torch.dtype) -> int:
    """Widest AuxK candidate set the fused kernel takes for inputs of `dtype`."""
    return MAX_FUSED_AUX_16BIT if dtype in (torch.float16, torch.bfloat16) else MAX_FUSED_K


def block_config(D: int, KP: int) -> dict:
    """Tiles for one sweep of the fused forward with candidate width KP.

    A tile must hold at least KP latents for tl.topk. Registers per thread grow with
    BLOCK_N·(BLOCK_M + 2·KP) (fp32 tile, int64 keys), so BLOCK_N shrinks as K grows; every config
    here compiles for sm_80/sm_90 without spills with either key width (tests/test_kernels_aot.py).
    BLOCK_D = 64 keeps the two dot operands in about 25–70 KB of shared memory with the default 3
    stages. These are compile-time choices, not yet timed on a GPU: bench/sweep_encode.py times
    them against alternatives. On sm_90 only BLOCK_N = 64 tiles compile to wgmma (HGMMA);
    BLOCK_N ≤ 32 use mma.sync (HMMA).
    """
    if KP > MAX_FUSED_AUX_16BIT:
        raise ValueError(f"KP = {KP} exceeds MAX_FUSED_AUX_16BIT = {MAX_FUSED_AUX_16BIT}")
    block_n = 64 if KP <= 32 else 32 if KP <= 128 else 16
    return {"BLOCK_N": block_n, "BLOCK_M": max(KP, 64),
            "BLOCK_D": min(max(triton.next_power_of_2(D), 16), 64), "num_warps": 8}


def _check(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, dead_mask: Tensor | None):
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[1]:
        raise ValueError(f"x must be [N, D] and W_enc [M, D]; got {tuple(x.shape)}, "
                         f"{tuple(W_enc.shape)}")
    M, D = W_enc.shape
    if b_enc.shape != (M,) or b_dec.shape != (D,):
        raise ValueError(f"b_enc must be [M] = [{M}] and b_dec [D] = [{D}]; got "
                         f"{tuple(b_enc.shape)}, {tuple(b_dec.shape)}")
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if x.dtype not in dtypes or len({x.dtype, W_enc.dtype, b_enc.dtype, b_dec.dtype}) != 1:
        raise ValueError(f"x, W_enc, b_enc, b_dec must share one dtype among fp16, bf16, fp32 "
                         f"and fp64 (cast the input to the SAE's dtype); got {x.dtype}, "
                         f"{W_enc.dtype}, {b_enc.dtype}, {b_dec.dtype}")
    for name, t in (("x", x), ("b_enc", b_enc), ("b_dec", b_dec), ("dead_mask", dead_mask)):
        if t is not None and t.device != W_enc.device and not (name == "dead_mask" and
                                                                t.device.type == "cpu"):
            raise ValueError(f"{name} is on {t.device} but W_enc on {W_enc.device}: move it")
    if not W_enc.is_contiguous():
        raise ValueError("W_enc must be contiguous (call .contiguous() once after loading)")
    if dead_mask is not None and (dead_mask.dtype != torch.bool or dead_mask.shape != (M,)):
        raise ValueError(f"dead_mask must be a bool [M] = [{M}] tensor; got {dead_mask.dtype} "
                         f"{tuple(dead_mask.shape)}")


def _reference_by_rows(x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0) -> EncodeOut:
    """reference.topk_encode over row chunks, so its N×M buffer stays near FALLBACK_ELEMENTS."""
    step = max(1, FALLBACK_ELEMENTS // max(W_enc.shape[0], 1))
    if x.shape[0] <= step:
        return reference.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
    parts = [reference.topk_encode(x[i:i + step], W_enc, b_enc, b_dec, k, dead_mask, k_aux)
             for i in range(0, x.shape[0], step)]
    return EncodeOut(*(torch.cat(ts) for ts in zip(*parts)))


def _sweep(x, W_enc, b_enc, b_dec, k, ids, config):
    """The fused kernel over all latents (ids None) or over the latents `ids` (their rows of W_enc
    gathered; global ids come out): (acts [N, k], idx [N, k]), or None when the kernel does not
    fit this GPU (warned). Callers have checked the inputs and that candidate_width(k) fits."""
    N, D = x.shape
    KP = candidate_width(k)
    cfg = dict(config) if config is not None else block_config(D, KP)
    blocks = [cfg.get(b) for b in ("BLOCK_N", "BLOCK_M", "BLOCK_D")]
    if not all(isinstance(b, int) and b >= 16 and b & (b - 1) == 0 for b in blocks):
        raise ValueError(f"config BLOCK_N, BLOCK_M, BLOCK_D must be powers of two >= 16 (tl.dot "
                         f"tiles); got {blocks}")
    if cfg["BLOCK_M"] < KP:
        raise ValueError(f"config BLOCK_M = {cfg['BLOCK_M']} must be >= the candidate width "
                         f"{KP} (tl.topk takes that many of a tile's BLOCK_M keys)")
    acts = torch.empty(N, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(N, k, dtype=torch.int64, device=x.device)
    if N == 0:
        return acts, idx
    L = W_enc.shape[0] if ids is None else ids.numel()
    try:
        _topk_encode_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            # without ids the kernel never reads ids_ptr: any int64 tensor fills the slot
            x, W_enc, b_enc, b_dec, idx if ids is None else ids, acts, idx, N, L, D, k,
            KP=KP, GATHER=ids is not None, KEY16=key16(x.dtype, W_enc.shape[0]), **cfg,
        )
    except OutOfResources as e:
        # e.g. fp32 with KP=256 wants ~142 KB of shared memory: sm_80/sm_90 have it, sm_86/89
        # (~100 KB) do not. Correct results on the unfused path beat a crash.
        warnings.warn(f"topk_encode: fused kernel does not fit this GPU ({e}); using the "
                      "chunked reference path for this configuration", stacklevel=3)
        return None
    return acts, idx


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    config: dict | None = None,
) -> EncodeOut:
    """topk_encode(x[N,D], W_enc[M,D], b_enc[M], b_dec[D], k) -> EncodeOut, values descending.

    Equals `ReLU((x - b_dec) @ W_enc.T + b_enc).topk(k)` (indices may differ only at ties). With
    `dead_mask[M]` (bool) and `k_aux > 0`, also the top-min(k_aux, #dead) among the dead latents,
    as `lgsae.reference.topk_encode`. All inputs share one dtype; products accumulate in fp32.
    `config` (BLOCK_N, BLOCK_M ≥ the candidate width, BLOCK_D, num_warps, optionally num_stages)
    replaces `block_config`'s tiles for the top-k sweep: for tuning (bench/sweep_encode.py).
    """
    _check(x, W_enc, b_enc, b_dec, dead_mask)
    N, D = x.shape
    M = W_enc.shape[0]
    if not 1 <= k <= M:
        raise ValueError(f"k must be in [1, {M}] (the number of latents), got {k}")
    dead_ids, kk = None, 0
    if dead_mask is not None and k_aux > 0:
        # the AuxK output's width depends on the number of dead latents: one host sync for a
        # device mask, none for a host mask (what the trainer passes)
        dead_ids = dead_mask.nonzero().squeeze(1).to(x.device, non_blocking=True)
        kk = min(k_aux, dead_ids.numel())
    if x.dtype == torch.float64 or candidate_width(k) > MAX_FUSED_K:
        return _reference_by_rows(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
    x, b_enc, b_dec = x.contiguous(), b_enc.contiguous(), b_dec.contiguous()
    top = _sweep(x, W_enc, b_enc, b_dec, k, None, config)
    if top is None:
        return _reference_by_rows(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
    aux = x.new_empty(N, 0), torch.empty(N, 0, dtype=torch.int64, device=x.device)
    if kk > 0:
        # a second sweep over the dead latents only: its cost scales with their number, and the
        # top-k sweep keeps its own (narrower) tiles
        fits = candidate_width(kk) <= max_aux_width(x.dtype)
        aux = _sweep(x, W_enc, b_enc, b_dec, kk, dead_ids, None) if fits else None
        if aux is None:  # too wide for registers (or for this GPU): reference on the dead rows
            acts, j = _reference_by_rows(x, W_enc[dead_ids], b_enc[dead_ids], b_dec, kk)[:2]
            aux = acts, dead_ids[j]
    return EncodeOut(*top, *aux)


def topk_encode_backward(
    xc: Tensor, W_enc: Tensor, indices: Tensor, grad_pre: Tensor, need_x_grad: bool = False,
    grad_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Encoder gradients from the gradient at the chosen pre-activations.

    xc[N,D] = x − b_dec, indices[N,J] int64, grad_pre[N,J] (zero where ReLU was inactive) ->
    (dxc[N,D] in xc's dtype or None, dW_enc[M,D], db_enc[M] in `grad_dtype`, default W_enc's:
    the kernels store their fp32 sums straight into a wider master's dtype). Equals autograd of
    `pre = xc @ W_enc.T + b_enc` with d(pre) = zeros(N, M).scatter_add(1, indices, grad_pre):
    dW_enc = d(pre).T @ xc, db_enc = d(pre).sum(0), dxc = d(pre) @ W_enc, without forming d(pre).
    """
    M, D = W_enc.shape
    if xc.dim() != 2 or xc.shape[1] != D or indices.shape[0] != xc.shape[0]:
        raise ValueError(f"xc must be [N, D] with D = {D} and indices [N, J]; got "
                         f"{tuple(xc.shape)}, {tuple(indices.shape)}")
    xc, grad_pre = xc.contiguous(), grad_pre.contiguous()
    _decode._check(indices, grad_pre, W_enc)  # shapes, int64, device, contiguous W_enc
    indices = indices.contiguous()
    N, J = indices.shape
    out = grad_dtype or W_enc.dtype
    if N * J == 0 or D == 0:
        dW, db = torch.zeros_like(W_enc, dtype=out), W_enc.new_zeros(M, dtype=out)
    else:
        flat = indices.reshape(-1)
        # stable: the summation order inside a latent is fixed, so runs are bit-identical
        order = torch.argsort(flat, stable=True)
        starts = torch.zeros(M + 1, dtype=torch.int64, device=W_enc.device)
        torch.cumsum(torch.bincount(flat, minlength=M), 0, out=starts[1:])
        cfg = _decode.block_config(D)
        acc = _decode._acc(W_enc.dtype)
        dW = torch.empty_like(W_enc, dtype=out)
        _decode._decode_dw_kernel[(M, triton.cdiv(D, cfg["BLOCK_D"]))](
            xc, grad_pre, order, starts, dW, J, D, ACC=acc,
            BLOCK_P=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )
        db = torch.empty(M, dtype=out, device=W_enc.device)
        _segment_sum_kernel[(M,)](grad_pre, order, starts, db, ACC=acc, BLOCK_P=SEGMENT_BLOCK,
                                  num_warps=1)
    dxc = None
    if need_x_grad:
        dxc = _decode.sparse_decode(indices, grad_pre.to(W_enc.dtype), W_enc).to(xc.dtype)
    return dxc, dW, db

