"""Kernel self-check: a Triton launcher is trusted for a (device, dtype, shape class) only after it
matched its pure-torch twin on a small probe of that class.

The first time lgsae.ops would run a launcher for a new class, `choose` builds a probe (37 tokens,
at most 256 latents, the call's own width D, k and AuxK setting, on the call's device and dtype),
runs the launcher and `lgsae.reference` on it, and compares. On a mismatch it warns once, naming
the op, the device, the class and the error, and that op runs the reference for the rest of the
process (a kernel miscompiled on an untested GPU generation costs speed, not correctness).
`LGSAE_KERNEL_CHECK=0` skips the check. Comparisons are tie-safe for top-k: the sorted values per
row, and each returned (index, value) pair against the fp64 pre-activation at that index.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable

import torch

from lgsae import reference

_trusted: set[tuple] = set()  # classes whose probe passed
_failed: dict[str, str] = {}  # op -> the warning it gave (the op runs the reference)
RESULTS: list[dict] = []  # every probe run in this process: op, class, error, seconds, ok


def enabled() -> bool:
    return os.environ.get("LGSAE_KERNEL_CHECK", "1") not in ("0", "false", "False")


def _tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


_MAIN = {"topk_encode": 0, "topk_encode_backward": 0, "sparse_decode": 2,
         "sparse_decode_backward": 3, "project_decoder_grad_": 0, "renorm_decoder_": 0}


# backward launchers: position of the optional grad_dtype argument
_GRAD_DTYPE_ARG = {"topk_encode_backward": 5, "sparse_decode_backward": 6}


def _grad_dtype(op: str, args: tuple) -> torch.dtype | None:
    i = _GRAD_DTYPE_ARG[op]
    return args[i] if len(args) > i else None


def _main(op: str, args: tuple) -> torch.Tensor:
    """The call's floating tensor whose device and dtype select the kernel (W_dec for decode)."""
    return args[_MAIN[op]]


def _class(op: str, args: tuple) -> tuple:
    """What selects a kernel configuration: device, dtype, D (mod 16), k and AuxK on or off."""
    t = _main(op, args)
    D = t.shape[-1]
    extra = ()
    if op == "topk_encode":
        extra = (args[4], bool(args[5] is not None and args[6] > 0))
    elif op in ("sparse_decode", "sparse_decode_backward", "topk_encode_backward"):
        extra = (args[1].shape[1] if op != "topk_encode_backward" else args[2].shape[1],)
        if op in _GRAD_DTYPE_ARG:  # the gradients' dtype (a wider master's, mixed precision)
            extra += (str(_grad_dtype(op, args)),)
    return (op, str(t.device), str(t.dtype), D, D % 16 == 0, *extra)


def _probe(op: str, args: tuple) -> tuple[tuple, Callable[[tuple, tuple], float]]:
    """(probe arguments of the call's class, compare(kernel out, reference out) -> error)."""
    t = _main(op, args)
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=1.0, dtype=None):
        return (torch.randn(*shape, generator=g) * scale).to(t.device, dtype or t.dtype)

    N = 37
    if op == "topk_encode":
        W_enc, k, dead_mask, k_aux = args[1], args[4], args[5], args[6]
        D = W_enc.shape[1]
        k_aux = k_aux if dead_mask is not None else 0
        M = max(256, 2 * (k + k_aux))
        dead = (torch.rand(M, generator=g) < 0.5).to(t.device) if k_aux else None
        p = (rnd(N, D), rnd(M, D, scale=D ** -0.5, dtype=W_enc.dtype), rnd(M, scale=0.1),
             rnd(D, scale=0.1), k, dead, k_aux)
        pre = (p[0].double() - p[3].double()) @ p[1].double().T + p[2].double()

        def compare(out, ref):
            err = 0.0
            for acts, idx, racts in ((out[0], out[1], ref[0]), (out[2], out[3], ref[2])):
                if racts.numel() == 0:
                    err = max(err, float(acts.numel() != 0))
                    continue
                s = lambda a: a.double().sort(1, descending=True).values  # noqa: E731
                err = max(err, _rel(s(acts), s(racts)),  # the values, tie-safe
                          _rel(acts, pre.gather(1, idx.long()).clamp_min(0)))  # index <-> value
            return err
        return p, compare
    if op == "topk_encode_backward":
        W_enc, idx = args[1], args[2]
        D, J = W_enc.shape[1], idx.shape[1]
        M = max(256, 2 * J)
        p = (rnd(N, D), rnd(M, D, scale=D ** -0.5, dtype=W_enc.dtype),
             torch.randint(0, M, (N, J), generator=g).to(t.device),
             rnd(N, J, dtype=args[3].dtype), True, _grad_dtype(op, args))
    elif op == "sparse_decode":
        W_dec, K = args[2], args[1].shape[1]
        M = max(256, 2 * K)
        p = (torch.randint(0, M, (N, K), generator=g).to(t.device), rnd(N, K, dtype=args[1].dtype),
             rnd(M, W_dec.shape[1], dtype=W_dec.dtype))
    elif op == "sparse_decode_backward":
        W_dec, K = args[3], args[1].shape[1]
        M = max(256, 2 * K)
        p = (rnd(N, W_dec.shape[1], dtype=args[0].dtype),
             torch.randint(0, M, (N, K), generator=g).to(t.device),
             rnd(N, K, dtype=args[2].dtype), rnd(M, W_dec.shape[1], dtype=W_dec.dtype), True, True,
             _grad_dtype(op, args))
    elif op in ("project_decoder_grad_", "renorm_decoder_"):
        D = args[0].shape[1]
        W = rnd(256, D)
        p = (W, rnd(256, D)) if op == "project_decoder_grad_" else (W,)
    else:
        raise KeyError(op)

    def compare(out, ref):
        out = out if isinstance(out, tuple) else (out,)
        ref = ref if isinstance(ref, tuple) else (ref,)
        return max(_rel(a, b) for a, b in zip(out, ref) if a is not None and b is not None)
    return p, compare


def _run(fn, p: tuple, op: str):
    """fn on copies of the probe (the decoder ops work in place: compare what they changed)."""
    q = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in p)
    out = fn(*q)
    if op == "project_decoder_grad_":
        return q[1]
    if op == "renorm_decoder_":
        return q[0]
    return out


def choose(op: str, launcher: Callable, args: tuple) -> Callable:
    """The function to run `op` on `args` with: `launcher` once its class passed the probe,
    else the reference (see the module docstring)."""
    if op in _failed:
        return getattr(reference, op)
    if not enabled():
        return launcher
    key = _class(op, args)
    if key in _trusted:
        return launcher
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # the probe's own (e.g. torch's beta-feature) warnings
            warnings.simplefilter("ignore")
            p, compare = _probe(op, args)
            err = compare(_run(launcher, p, op), _run(getattr(reference, op), p, op))
        tol = _tol(_main(op, args).dtype)
        why = None if math.isfinite(err) and err <= tol else \
            f"relative error {err:.3g} (tolerance {tol:g})"
    except Exception as e:  # a launcher that crashes on the probe fails the check too
        err, why = float("nan"), f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    RESULTS.append({"op": op, "class": key, "error": err, "seconds": seconds, "ok": why is None})
    if why is None:
        _trusted.add(key)
        return launcher
    _failed[op] = msg = (f"lgsae: the Triton kernel for {op} does not match its reference on "
                         f"{key[1]} ({key[2]}, D={key[3]}): {why}. {op} runs the "
                         "pure-torch reference for the rest of this process; please report it "
                         "(LGSAE_KERNEL_CHECK=0 skips this check)")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return getattr(reference, op)


def reset() -> None:
    """Forget every verdict (tests)."""
    _trusted.clear()
    _failed.clear()
    RESULTS.clear()
