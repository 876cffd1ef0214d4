"""CUDA: the sparse path on GPU tensors matches the CPU result (skipped without CUDA)."""

import pytest
import torch
from conftest import assert_close

from lgsae import GroupSAE
from lgsae.step import make_optimizer, train_step

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_step_matches_cpu(dtype):
    D, M, K = 48, 100, 7
    cpu = GroupSAE(D, k=K, num_latents=M, layers=[0, 1], scales=[0.5, 2.0], seed=3, dtype=dtype)
    gpu = GroupSAE(D, k=K, num_latents=M, layers=[0, 1], scales=[0.5, 2.0], seed=3, dtype=dtype,
                   device="cuda")
    x = torch.randn(257, D)
    layer = torch.randint(0, 2, (257,))
    dead = torch.rand(M) < 0.3
    opts = make_optimizer(cpu), make_optimizer(gpu)
    before = {n: p.detach().float().clone() for n, p in cpu.named_parameters()}
    out_c = train_step(cpu, opts[0], x, layer=layer, dead_mask=dead)
    out_g = train_step(gpu, opts[1], x.cuda(), layer=layer.cuda(), dead_mask=dead.cuda())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_close(out_g.fvu, out_c.fvu, rtol=tol, name="fvu")
    assert_close(out_g.recon.float(), out_c.recon.float(), atol=tol * 10, rtol=tol, name="recon")
    for (n, a), (_, b) in zip(gpu.named_parameters(), cpu.named_parameters()):
        assert_close(a.float(), b.float(), atol=tol, rtol=tol, name=n)
        # the update itself (~lr per element) agrees: a skipped or doubled step fails here,
        # where the parameter tolerance above cannot see it
        du, dc = a.detach().float().cpu() - before[n], b.detach().float() - before[n]
        assert float(dc.norm()) > 0, n
        assert float((du - dc).norm() / dc.norm()) < 0.25, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_passes_its_self_check_on_this_gpu(dtype):
    """A CUDA step probes each launcher it uses (lgsae.selfcheck): all must pass here."""
    from lgsae import selfcheck

    selfcheck.reset()
    sae = GroupSAE(576, k=32, num_latents=4608, seed=0, dtype=dtype, device="cuda")
    x = torch.randn(512, 576, device="cuda", dtype=dtype)
    train_step(sae, make_optimizer(sae), x, dead_mask=torch.rand(4608, device="cuda") < 0.02)
    ops = {r["op"] for r in selfcheck.RESULTS}
    assert {"topk_encode", "sparse_decode", "sparse_decode_backward",
            "topk_encode_backward", "project_decoder_grad_", "renorm_decoder_"} <= ops
    bad = [r for r in selfcheck.RESULTS if not r["ok"]]
    assert not bad, bad
    print("self-check seconds:", {r["op"]: round(r["seconds"], 4) for r in selfcheck.RESULTS})


def test_a_trainer_sae_step_does_not_sync_with_the_device():
    """What the trainer runs per SAE on CUDA (lazy finiteness guard, host dead mask, host
    per-token layers) makes no host-device sync: torch raises on any under sync debug mode."""
    D, M = 64, 512
    from lgsae.kernels import topk_encode as ENCODE

    sae = GroupSAE(D, k=8, num_latents=M, layers=[0, 1], seed=0, device="cuda",
                   compute_dtype=torch.bfloat16, k_aux=384)
    widths = []
    sweep = ENCODE._sweep
    ENCODE._sweep = lambda x, W, b, bd, k, ids, cfg: widths.append(
        (ENCODE.candidate_width(k), ids is not None)) or sweep(x, W, b, bd, k, ids, cfg)
    opt = make_optimizer(sae)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[:300] = True  # AuxK at width 512 (16-bit inputs)
    x = torch.randn(1024, D).cuda()
    layer = torch.randint(0, 2, (1024,))  # on the host, as the trainer keeps it
    train_step(sae, opt, x, layer=layer, dead_mask=dead, lazy_check=True)  # warm-up, self-check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = train_step(sae, opt, x, layer=layer, dead_mask=dead, lazy_check=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        ENCODE._sweep = sweep
    assert torch.isfinite(out.fvu) and out.auxk_loss > 0
    assert (512, True) in widths, widths  # min(384, 300 dead) = 300: the 512-wide AuxK sweep
