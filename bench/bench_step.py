"""One full SAE training step: the sparse path vs the same SAE written densely, and the floor
(encoder GEMM + top-k alone). Targets (issue 2, CPU fp32): sparse <= 1.3x the floor, dense >= 2.5x
sparse. Run: pytest bench/bench_step.py --benchmark-only

Providers share one group per shape, so the ratio table at the end compares them side by side;
the first provider of a group (`gemm_topk`) is the denominator.
"""

import os

import pytest
import torch
from conftest import device_name, sync

from lgsae import GroupSAE, reference
from lgsae.sae import ForwardOutput
from lgsae.step import make_optimizer, train_step

SCALES = {  # name -> (N, D, M, K)
    "small": (4096, 576, 9216, 32),  # the CPU shape (SmolLM2 width, expansion 16)
    "paper": (16384, 768, 12288, 128),
}
SCALE = os.environ.get("LGSAE_BENCH_SCALE", "small")
DEVICE = torch.device(os.environ.get("LGSAE_BENCH_DEVICE", "cuda" if torch.cuda.is_available()
                                     else "cpu"))
PROVIDERS = ["gemm_topk", "sparse", "dense"]


def dense_forward(sae: GroupSAE):
    def forward(x, layer=None, dead_mask=None):
        d = reference.dense_sae_forward(x, sae.encoder.weight, sae.encoder.bias, sae.W_dec,
                                        sae.b_dec, sae.k, dead_mask,
                                        sae.k_aux if dead_mask is not None else 0)
        return ForwardOutput(*d)

    return forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_step(benchmark, record, provider, dtype):
    N, D, M, K = SCALES[SCALE]
    torch.manual_seed(0)
    sae = GroupSAE(D, k=K, num_latents=M, dtype=dtype, device=DEVICE, seed=0)
    opt = make_optimizer(sae)
    x = torch.randn(N, D, device=DEVICE, dtype=dtype)

    if provider == "gemm_topk":
        W, b = sae.encoder.weight.detach(), sae.encoder.bias.detach()
        pre = torch.empty(N, M, device=DEVICE, dtype=dtype)  # preallocated: the floor's best case

        def run():
            return torch.addmm(b, x, W.t(), out=pre).topk(K, dim=1, sorted=False)
    else:
        fwd = dense_forward(sae) if provider == "dense" else None

        def run():
            return train_step(sae, opt, x, forward=fwd)

    def timed():
        out = run()
        sync(DEVICE)
        return out

    benchmark.pedantic(timed, warmup_rounds=1, rounds=7 if DEVICE.type == "cpu" else 20)
    record(benchmark, f"step N={N} D={D} M={M} K={K} {str(dtype)[6:]}", provider)
    gemm_flops = 2 * N * D * M
    benchmark.extra_info.update(
        N=N, D=D, M=M, K=K, dtype=str(dtype), device=device_name(DEVICE), provider=provider,
        encoder_gemm_tflops_per_s=gemm_flops / benchmark.stats.stats.median / 1e12,
    )
