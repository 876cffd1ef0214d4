"""GroupSAE: scales, layers, forward against the dense twin, save/load, sparsify's format."""

import json
import os

import pytest
import torch
from conftest import assert_close
from safetensors.torch import save_file

from lgsae import GroupSAE, reference

D, M = 48, 100


def trained_like(sae: GroupSAE) -> GroupSAE:
    """Perturb every parameter so that a test cannot pass on the initial values alone."""
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sae


def test_forward_equals_dense_twin_in_scaled_space():
    sae = trained_like(GroupSAE(D, k=5, num_latents=M, layers=[3, 4], scales=[0.5, 2.0],
                                dtype=torch.float64))
    x = 4 * torch.randn(2, 16, D, dtype=torch.float64)  # leading dims are kept
    dead = torch.rand(M) < 0.5
    out = sae(x, layer=4, dead_mask=dead)
    dense = reference.dense_sae_forward(2.0 * x.view(-1, D), sae.encoder.weight,
                                        sae.encoder.bias, sae.W_dec, sae.b_dec, 5, dead, D // 2)
    assert out.recon.shape == x.shape and out.top_indices.shape == (2, 16, 5)
    assert_close(out.recon, dense.recon.view_as(x) / 2.0, atol=1e-12, name="recon")
    assert_close(out.fvu, dense.fvu, atol=1e-12, name="fvu")
    assert_close(out.auxk_loss, dense.auxk_loss, atol=1e-12, name="auxk")
    assert out.auxk_loss > 0
    assert sae(x, layer=4).auxk_loss == 0  # no dead mask, no AuxK


@pytest.mark.parametrize("n_dead", [3, 60], ids=["every-dead-latent", "top-k-of-the-dead"])
def test_auxk_forward_and_grads_equal_dense_autograd(n_dead):
    """AuxK takes every dead latent when there are at most k_aux of them (the same indices on
    every row, which GroupSAE and lgsae.ops run as GEMMs over the dead set) and the top k_aux
    among them otherwise (sparse gathers and scatters). Both must be plain autograd through the
    dense SAE: the losses and every gradient, the input's too."""
    sae = trained_like(GroupSAE(D, k=5, num_latents=M, layers=[3], scales=[0.5],
                                dtype=torch.float64, seed=0))
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(0))[:n_dead]] = True
    assert (n_dead <= sae.k_aux) == (n_dead == 3)
    x = (4 * torch.randn(40, D, dtype=torch.float64)).requires_grad_()
    probe = torch.randn(40, D, dtype=torch.float64)
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec, x]
    out = sae(x, layer=3, dead_mask=dead)
    if n_dead == 3:
        from lgsae import ops
        assert reference.same_on_every_row(ops.topk_encode(
            0.5 * x.detach(), *params[:2], params[3], 5, dead, sae.k_aux).aux_indices)
    got = torch.autograd.grad(out.fvu + out.auxk_loss / 32 + (out.recon * probe).sum(), params)
    d = reference.dense_sae_forward(0.5 * x, *params[:4], 5, dead, sae.k_aux)
    assert_close(out.auxk_loss, d.auxk_loss, atol=1e-12, name="auxk")
    assert out.auxk_loss > 0
    want = torch.autograd.grad(d.fvu + d.auxk_loss / 32 + (d.recon / 0.5 * probe).sum(), params)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec", "x"), got, want):
        assert_close(a, b, atol=1e-12, rtol=1e-9, name=f"d{name}")


def test_per_token_layers_use_each_tokens_scale():
    sae = trained_like(GroupSAE(D, k=4, num_latents=M, layers=[1, 2], scales=[0.5, 3.0]))
    x = torch.randn(10, D)
    layer = torch.tensor([1, 2] * 5)
    mixed = sae(x, layer=layer).recon
    assert_close(mixed[0::2], sae(x[0::2], layer=1).recon, atol=1e-6, name="layer 1 tokens")
    assert_close(mixed[1::2], sae(x[1::2], layer=2).recon, atol=1e-6, name="layer 2 tokens")
    acts, idx = sae.encode(x, layer=layer)
    assert_close(sae.decode(acts, idx, layer=layer), mixed, atol=1e-6, name="decode")


def test_encode_dense_has_k_nonzeros_at_the_encoded_latents():
    sae = trained_like(GroupSAE(D, k=6, num_latents=M))
    x = torch.randn(3, 7, D)
    z = sae.encode_dense(x)
    acts, idx = sae.encode(x)
    assert z.shape == (3, 7, M)
    assert_close(z.gather(-1, idx), acts, name="dense at indices")
    assert int((z != 0).sum(-1).max()) <= 6
    assert_close(sae.decode(acts, idx), (z.view(-1, M) @ sae.W_dec + sae.b_dec).view(3, 7, D),
                 atol=1e-5, name="dense decode")


@pytest.mark.parametrize(
    "kwargs, call, match",
    [
        (dict(layers=[2, 5]), dict(layer=None), r"serves layers \[2, 5\]: pass layer="),
        (dict(layers=[2, 5]), dict(layer=3), r"layer 3 is not served by this SAE"),
        (dict(layers=[2, 5]), dict(layer=torch.tensor([2, 9, 5, 2])), r"layer 9 is not served"),
        (dict(), dict(width=50), r"input width 50 does not match the SAE's d_in=48"),
        (dict(), dict(dead=torch.ones(M)), r"dead_mask must be a bool tensor of shape \[100\]"),
        (dict(), dict(dead=torch.ones(M + 1, dtype=torch.bool)), r"got torch.bool \(101,\)"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs, call, match):
    sae = GroupSAE(D, k=3, num_latents=M, **kwargs)
    x = torch.randn(4, call.get("width", D))
    with pytest.raises(ValueError, match=match):
        sae(x, layer=call.get("layer"), dead_mask=call.get("dead"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), r"k must be in \[1, num_latents=100\]"),
        (dict(k=101), r"k must be in \[1, num_latents=100\]"),
        (dict(layers=[1, 1]), r"layers must be distinct"),
        (dict(layers=[1, 2], scales=[1.0]), r"scales needs one value per layer"),
        (dict(scales=[0.0]), r"scales must be finite and > 0"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupSAE(D, num_latents=M, **{"k": 3, **kwargs})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    sae = trained_like(GroupSAE(D, k=5, num_latents=M, layers=[7, 8, 9], scales=[0.3, 0.4, 0.5],
                                model="tiny-llama", hookpoints=["layers.7", "layers.8", "layers.9"],
                                dtype=dtype))
    sae.save(tmp_path / "sae")
    back = GroupSAE.load(tmp_path / "sae")
    assert back.dtype == dtype and back.layers == [7, 8, 9] and back.model_name == "tiny-llama"
    assert back.hookpoints == sae.hookpoints and back.k == 5 and back.num_latents == M
    assert torch.equal(back.scales, sae.scales)
    for (n, a), (_, b) in zip(sae.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(20, D)
    assert torch.equal(back(x, layer=8).recon, sae(x, layer=8).recon)
    assert not [f for f in os.listdir(tmp_path / "sae") if f.endswith(".tmp")]


def test_saved_folder_is_sparsify_layout(tmp_path):
    sae = GroupSAE(D, k=5, num_latents=M)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k",
                "multi_topk", "skip_connection", "transcode", "d_in"):
        assert key in cfg, key
    from safetensors import safe_open

    with safe_open(tmp_path / "sae.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
        assert f.get_slice("encoder.weight").get_shape() == [M, D]


def test_sparsify_folder_loads_and_reconstructs_identically(tmp_path):
    """A folder in sparsify's format, written here by hand (what SparseCoder.save_to_disk
    writes), reconstructs exactly as sparsify's formula says."""
    W_enc, W_dec = torch.randn(M, D), torch.randn(M, D)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    b_enc, b_dec = torch.randn(M), torch.randn(D)
    save_file({"encoder.weight": W_enc, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              tmp_path / "sae.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
        "num_latents": M, "k": 7, "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": D}))
    sae = GroupSAE.load(tmp_path)
    assert sae.layers == [0] and sae.scales.tolist() == [1.0]
    x = torch.randn(25, D)
    vals, idx = torch.relu((x - b_dec) @ W_enc.T + b_enc).topk(7, dim=1)
    want = torch.zeros(25, M).scatter(1, idx, vals) @ W_dec + b_dec
    assert_close(sae(x).recon, want, atol=1e-5, name="recon")


def test_sparsify_reads_our_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder fails on CPU tensors
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify not installed (extra 'peers')")
    sae = trained_like(GroupSAE(D, k=5, num_latents=M, layers=[4], scales=[1.0]))
    sae.save(tmp_path)
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path)
    x = torch.randn(30, D)
    assert_close(theirs(x).sae_out, sae(x).recon, atol=1e-5, name="sparsify recon")


def test_load_refuses_what_it_cannot_represent(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json and sae.safetensors"):
        GroupSAE.load(tmp_path)
    GroupSAE(D, k=3, num_latents=M).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(ValueError, match="only plain TopK autoencoders"):
        GroupSAE.load(tmp_path)


def test_a_training_step_keeps_decoder_rows_unit_norm():
    sae = GroupSAE(D, k=4, num_latents=M, seed=1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, D)
    dead = torch.ones(M, dtype=torch.bool)
    first = None
    for _ in range(20):
        out = sae(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        sae.project_decoder_grad_()
        assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
        opt.step()
        sae.renorm_decoder_()
    assert_close(sae.W_dec.norm(dim=1), torch.ones(M), atol=1e-5, name="row norms")
    assert loss.item() < 0.8 * first  # it learns


def test_seed_makes_init_deterministic():
    a, b = GroupSAE(D, k=3, num_latents=M, seed=5), GroupSAE(D, k=3, num_latents=M, seed=5)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.encoder.weight, a.W_dec)


def test_inference_mode_first_then_normal_calls_work():
    from lgsae import reference

    reference.free_workspace()  # so the first call below allocates the reused buffer
    sae = GroupSAE(D, k=4, num_latents=M)
    x = torch.randn(33, D)
    with torch.inference_mode():
        want = sae.encode(x)
    got = sae.encode(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_step_on_a_zero_variance_batch_raises_and_keeps_the_weights():
    from lgsae.step import make_optimizer, train_step

    sae = GroupSAE(D, k=4, num_latents=M, seed=0)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    with pytest.raises(FloatingPointError, match="needs >= 2 tokens with non-zero variance"):
        train_step(sae, make_optimizer(sae), torch.randn(1, D))
    for n, p in sae.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("layer", [4.7, True, torch.tensor([4.0, 4.0]), torch.tensor(4.5)])
def test_non_integer_layer_is_rejected(layer):
    sae = GroupSAE(D, k=3, num_latents=M, layers=[4])
    with pytest.raises(ValueError, match="layer must"):
        sae(torch.randn(2, D), layer=layer)


def test_layer_list_and_single_int_layers_are_accepted():
    sae = GroupSAE(D, k=3, num_latents=M, layers=4, scales=[2.0])
    x = torch.randn(2, D)
    assert sae.layers == [4]
    assert torch.equal(sae(x, layer=[4, 4]).recon, sae(x, layer=4).recon)


def test_dtype_conversion_keeps_exact_scales(tmp_path):
    sae = GroupSAE(D, k=3, num_latents=M, layers=[1], scales=[0.11]).to(torch.bfloat16)
    assert sae.dtype == torch.bfloat16
    assert sae.scales.dtype == torch.float32 and sae.scales.item() == pytest.approx(0.11, rel=1e-7)
    assert sae.config()["scales"] == [0.11]


@pytest.mark.parametrize("kwargs", [dict(k=4.5), dict(k_aux=-3), dict(layers=[1.5])])
def test_non_integer_or_negative_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        GroupSAE(D, num_latents=M, **{"k": 3, **kwargs})


def test_decode_shape_mismatch_is_one_clear_error():
    sae = GroupSAE(D, k=3, num_latents=M)
    with pytest.raises(ValueError, match="must have the same shape"):
        sae.decode(torch.rand(4, 7), torch.randint(0, M, (4, 6)))


def test_mixed_precision_computes_in_bf16_and_trains_fp32_master_weights(tmp_path):
    """compute_dtype=bf16 over fp32 parameters: the forward is that of a bf16 SAE holding the same
    (rounded) weights. The M-sized gradients (W_enc, b_enc, W_dec) are that SAE's before its last
    rounding: the fp32 sums themselves, with no bf16 round trip; b_dec's, which the SAE adds
    itself in bf16, is the bf16 SAE's. Everything lands in fp32."""
    kw = dict(k=5, num_latents=70, layers=[2, 3], scales=[0.5, 2.0], seed=3)
    mixed = GroupSAE(24, compute_dtype=torch.bfloat16, **kw)
    with torch.no_grad():
        mixed.b_dec.normal_()
        mixed.encoder.bias.normal_(0, 0.1)
    pure = GroupSAE(24, dtype=torch.bfloat16, **kw)
    pure.load_state_dict({n: t.bfloat16() for n, t in mixed.state_dict().items()})
    x, layer = torch.randn(33, 24), torch.randint(2, 4, (33,))
    dead = torch.zeros(70, dtype=torch.bool)
    dead[::3] = True
    for dead_mask in (None, dead):  # one decode per step, then two (AuxK's adds to dW_dec)
        for sae in (mixed, pure):
            sae.zero_grad(set_to_none=True)
        outs = [sae(x, layer=layer, dead_mask=dead_mask) for sae in (mixed, pure)]
        for name in ("recon", "top_acts", "top_indices", "fvu", "auxk_loss"):
            assert torch.equal(getattr(outs[0], name), getattr(outs[1], name)), name
        for sae, out in zip((mixed, pure), outs):
            (out.fvu + out.auxk_loss / 32).backward()
        for (name, p), q in zip(mixed.named_parameters(), pure.parameters()):
            assert p.dtype == p.grad.dtype == torch.float32, name
            if name == "b_dec":
                assert torch.equal(p.grad, q.grad.float()), name
            elif dead_mask is None:  # one fp32 sum, which the bf16 SAE rounds
                assert torch.equal(p.grad.bfloat16(), q.grad), name
            else:  # fp32 sum of both decodes' fp32 sums vs bf16 sum of their roundings
                assert_close(p.grad, q.grad.float(), atol=1e-2 * float(q.grad.abs().max()),
                             name=name)
        for name in ("encoder.weight", "W_dec"):  # finer than bf16: no round trip
            g = dict(mixed.named_parameters())[name].grad
            assert not torch.equal(g, g.bfloat16().float()), name
    assert (mixed.dtype, mixed.compute_dtype) == (torch.float32, torch.bfloat16)
    back = GroupSAE.load(mixed.save(tmp_path / "mixed"))
    assert (back.dtype, back.compute_dtype) == (torch.float32, torch.bfloat16)
    assert GroupSAE.load(pure.save(tmp_path / "pure")).compute_dtype == torch.bfloat16
    assert GroupSAE(24, **kw).compute_dtype == torch.float32
    assert mixed.to("cpu").compute_dtype == torch.bfloat16  # a move keeps it
    assert mixed.double().compute_dtype == torch.float64  # a cast computes in the new dtype
    with pytest.raises(ValueError, match="compute_dtype must be a floating"):
        GroupSAE(24, compute_dtype=torch.int8, **kw)
