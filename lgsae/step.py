"""One SAE training step as DESIGN §1 defines it: FVU + AuxK/32, backward, grad-norm clip 1.0,
decoder-gradient projection, Adam, decoder renorm. The trainer and the benchmarks share it."""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from lgsae.sae import ForwardOutput, GroupSAE

AUXK_COEF = 1 / 32
CLIP_NORM = 1.0


def tune_cpu_allocator() -> bool:
    """Stop glibc from handing freed step buffers back to the OS, so that the next step does not
    page-fault them in again. Returns True if applied (glibc only; a no-op elsewhere).

    A step frees and reallocates a few tensors of 10-30 MB (gradients, CSR products). By default
    glibc serves those from mmap or trims them off the heap at free, and every step pays the page
    faults: at N=4096, M=9216 on 2 cores that is 30-60 ms, with high variance, on a ~300 ms step.
    Fixing the mmap threshold at its 32 MB maximum and disabling trimming keeps them on the heap.
    The process's resident memory then stays at its peak, which a training process reaches anyway.
    The trainer and the benchmarks call this once at start; it affects the whole process.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def paper_lr(num_latents: int) -> float:
    """The paper's learning rate: 2e-4 / sqrt(M / 2^14)."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def make_optimizer(sae: GroupSAE, lr: float | None = None) -> torch.optim.Adam:
    """Adam(0.9, 0.999) at `lr` (default: the paper's rule), fused where torch has a fused kernel
    for the device and dtype (one pass over the parameters instead of several)."""
    lr = paper_lr(sae.num_latents) if lr is None else lr
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)
    except RuntimeError:  # no fused kernel for this device/dtype
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), foreach=True)


def is_fused(opt: torch.optim.Optimizer) -> bool:
    """Whether `opt` is a fused Adam (one kernel over all parameters; honours found_inf)."""
    return isinstance(opt, torch.optim.Adam) and bool(opt.defaults.get("fused"))


def train_step(sae: GroupSAE, opt: torch.optim.Optimizer, x: Tensor, *,
               layer: int | Tensor | None = None, dead_mask: Tensor | None = None,
               forward: Callable[..., ForwardOutput] | None = None,
               total_variance: Tensor | None = None,
               grad_sync: Callable[[GroupSAE], None] | None = None,
               lazy_check: bool = False) -> ForwardOutput:
    """One optimisation step on the batch x [N, D]; returns the forward output (losses detached).

    `forward` replaces `sae.forward` (same signature): the benchmarks pass the dense twin.
    Data parallel: x is this rank's part of the batch, `total_variance` the whole batch's FVU
    denominator, and `grad_sync(sae)` sums the gradients over the ranks right after backward, so
    every rank takes the step that one process would take on the whole batch.

    A non-finite loss never reaches the weights. By default it is checked on the host before the
    backward (a FloatingPointError; one device read). With `lazy_check` and a fused Adam the check
    stays on the device: the optimizer skips its update (weights and Adam state untouched) when
    the loss is not finite, and the caller reads the returned losses later (the trainer does, in
    its one device-to-host copy per step) and stops the run there.
    """
    kw = {} if total_variance is None else {"total_variance": total_variance}
    out = (forward or sae)(x, layer=layer, dead_mask=dead_mask, **kw)
    loss = out.fvu + AUXK_COEF * out.auxk_loss
    lazy = lazy_check and is_fused(opt)
    if not lazy and not bool(torch.isfinite(loss)):
        raise FloatingPointError(
            f"non-finite loss (fvu={out.fvu.item():.4g}, auxk={out.auxk_loss.item():.4g}) on a "
            f"batch of {x.reshape(-1, x.shape[-1]).shape[0]} tokens: the batch needs >= 2 tokens "
            "with non-zero variance and finite activations; the step was not taken")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_sync is not None:
        grad_sync(sae)
    sae.project_decoder_grad_()
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if is_fused(opt):
        # the clip rides in fused Adam's grad_scale (GradScaler's hook: Adam divides each grad by
        # it as it reads it), saving clip_grad_norm_'s read-and-write pass over every gradient
        opt.grad_scale = (norm + 1e-6).div(CLIP_NORM).clamp(min=1.0).float()
        # lazy: fused Adam skips the whole update on the device when found_inf != 0
        opt.found_inf = (~torch.isfinite(loss.detach())).float() if lazy else None
        try:
            opt.step()
        finally:
            del opt.found_inf, opt.grad_scale
    else:
        torch.nn.utils.clip_grads_with_norm_(grads, CLIP_NORM, norm, foreach=True)
        opt.step()
    sae.renorm_decoder_()
    return ForwardOutput(out.recon.detach(), out.top_acts.detach(), out.top_indices,
                         out.fvu.detach(), out.auxk_loss.detach())
