"""GroupSAE's per-member-layer parameters (issue 19): b_dec, b_enc and a learned input scale per
member layer, against a dense fp64 formula with every gradient; save/load, export folding, the
one-layer case and the trainer's start."""

import json

import pytest
import torch
from conftest import assert_close

from lgsae import GroupSAE
from lgsae.export import fold
from lgsae.plan import layer_params_from, plan_saes, variant_methods

D, M, K = 48, 100, 5
LAYERS, SCALES = [2, 3, 5], [0.5, 2.0, 1.3]
OPTIONS = [["b_dec"], ["b_enc"], ["scale"], ["b_dec", "b_enc", "scale"]]


def make(params, dtype=torch.float64, layers=LAYERS, scales=SCALES, seed=0) -> GroupSAE:
    sae = GroupSAE(D, k=K, num_latents=M, layers=layers, scales=scales, dtype=dtype, seed=seed,
                   layer_params=params)
    with torch.no_grad():  # away from the start, where the offsets are 0 and the gains 1
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


def dense(sae: GroupSAE, x, layer, dead, k_aux):
    """The module docstring's formula written out densely over all M latents (fp64)."""
    P = dict(sae.named_parameters())
    pos = torch.tensor([sae.layers.index(int(v)) for v in layer])
    s = sae.scales.double()[pos][:, None]  # the factors as the SAE holds them (fp32)
    bd = P["b_dec"] + (P["layer_b_dec"][pos] if "b_dec" in sae.layer_params else 0)
    be = P["encoder.bias"] + (P["layer_b_enc"][pos] if "b_enc" in sae.layer_params else 0)
    g = P["layer_log_gain"][pos].exp()[:, None] if "scale" in sae.layer_params else 1.0
    xs = x * s
    pre = torch.relu(g * (xs - bd) @ P["encoder.weight"].t() + be)
    vals, idx = pre.topk(K, 1)
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    recon_s = z @ P["W_dec"] + bd
    total = (xs - xs.mean(0)).pow(2).sum()
    resid = xs - recon_s
    fvu = resid.pow(2).sum() / total
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    a_vals, a_idx = masked.topk(min(k_aux, int(dead.sum())), 1)
    e_hat = torch.zeros_like(pre).scatter(1, a_idx, a_vals) @ P["W_dec"]
    auxk = min(int(dead.sum()) / k_aux, 1.0) * (e_hat - resid.detach()).pow(2).sum() / total
    return recon_s / s, fvu, auxk


@pytest.mark.parametrize("params", OPTIONS, ids="+".join)
def test_forward_and_every_gradient_match_the_dense_formula(params):
    sae = make(params)
    names = {"b_dec": "layer_b_dec", "b_enc": "layer_b_enc", "scale": "layer_log_gain"}
    assert sorted(n for n, _ in sae.named_parameters() if n.startswith("layer_")) == sorted(
        names[p] for p in params)
    N = 40
    x = 3 * torch.randn(N, D, dtype=torch.float64)
    layer = torch.tensor(LAYERS)[torch.randint(3, (N,))]
    dead = torch.rand(M) < 0.4
    probe = torch.randn(N, D, dtype=torch.float64)
    out = sae(x, layer=layer, dead_mask=dead)
    recon, fvu, auxk = dense(sae, x, layer, dead, sae.k_aux)
    assert_close(out.recon, recon, atol=1e-10, name="recon")
    assert_close(out.fvu, fvu, atol=1e-12, name="fvu")
    assert_close(out.auxk_loss, auxk, atol=1e-12, name="auxk")
    assert float(out.auxk_loss.detach()) > 0

    def grads(loss):
        sae.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in sae.named_parameters()}

    got = grads(out.fvu + out.auxk_loss + (out.recon * probe).sum())
    want = grads(fvu + auxk + (recon * probe).sum())
    for name, g in want.items():
        assert g.abs().max() > 0, f"{name}: the probe gives it no gradient"
        assert_close(got[name], g, atol=1e-10, rtol=1e-9, name=f"d {name}")
    # one layer given as an int: the same as per-token layers all equal to it
    one = sae(x, layer=3)
    assert_close(one.recon, dense(sae, x, torch.full((N,), 3), dead, sae.k_aux)[0],
                 atol=1e-10, name="recon, int layer")


@pytest.mark.parametrize("params", OPTIONS, ids="+".join)
def test_encode_decode_and_export_fold_agree_with_forward(params, tmp_path):
    sae = make(params)
    x = torch.randn(30, D, dtype=torch.float64)
    for v in LAYERS:
        acts, idx = sae.encode(x, layer=v)
        out = sae(x, layer=v)
        assert torch.equal(idx, out.top_indices) and torch.equal(acts, out.top_acts)
        assert_close(sae.decode(acts, idx, layer=v), out.recon, atol=1e-12, name="decode")
        # the folded plain TopK SAE on raw activations gives the same latents and recon
        w = {k: t.double() for k, t in fold(sae, v).items()}
        pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].t() + w["encoder.bias"])
        vals, ids = pre.topk(K, 1)
        assert torch.equal(ids.sort(1).values, idx.sort(1).values)
        recon = torch.zeros_like(pre).scatter(1, ids, vals) @ w["W_dec"] + w["b_dec"]
        # fold stores fp32: judged at fp32's precision
        assert_close(recon, out.recon, atol=2e-5, rtol=1e-5, name=f"folded recon, layer {v}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    sae = make(["b_dec", "b_enc", "scale"], dtype=dtype)
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["layer_params"] == ["b_dec", "b_enc", "scale"]
    back = GroupSAE.load(tmp_path / "s")
    assert back.layer_params == sae.layer_params
    for (n, a), (m, b) in zip(sae.state_dict().items(), back.state_dict().items()):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b), n
    x = torch.randn(9, D).to(dtype)
    assert torch.equal(back(x, layer=5).recon, sae(x, layer=5).recon)
    # a folder whose cfg asks for a tensor it lacks is one clear error
    from safetensors.torch import load_file, save_file
    t = load_file(tmp_path / "s" / "sae.safetensors")
    del t["layer_log_gain"]
    save_file(t, tmp_path / "s" / "sae.safetensors")
    with pytest.raises(ValueError, match="layer_log_gain"):
        GroupSAE.load(tmp_path / "s")


def test_one_layer_sae_is_unchanged_and_the_kernels_see_the_plain_call():
    plain = GroupSAE(D, k=K, num_latents=M, layers=[4], scales=[1.7], seed=3)
    opt = GroupSAE(D, k=K, num_latents=M, layers=[4], scales=[1.7], seed=3,
                   layer_params=["b_dec", "b_enc", "scale"])
    assert opt.layer_params == () and list(opt.state_dict()) == list(plain.state_dict())
    x = torch.randn(11, D)
    assert torch.equal(opt(x).recon, plain(x).recon)
    xs = x * 1.7
    W_enc, b_enc, _, b_dec = w = opt._weights()
    args = opt._encoder_args(xs, 0, W_enc, b_enc, b_dec)
    assert args[0] is xs and all(a is b for a, b in zip(args[1:], (W_enc, b_enc, b_dec)))
    assert opt._out_bias(b_dec, 0) is b_dec and len(w) == 4


def test_start_is_the_plain_sae_and_b_dec_starts_at_each_layers_mean():
    plain = GroupSAE(D, k=K, num_latents=M, layers=LAYERS, scales=SCALES, seed=1)
    opt = GroupSAE(D, k=K, num_latents=M, layers=LAYERS, scales=SCALES, seed=1,
                   layer_params=["b_dec", "b_enc", "scale"])
    x = torch.randn(60, D) + torch.arange(D) / 10
    layer = torch.tensor(LAYERS).repeat(20)
    assert_close(opt(x, layer=layer).recon, plain(x, layer=layer).recon, atol=1e-5,
                 name="start")
    x[layer == 5] += 4.0  # layer 5's mean differs from the others'
    opt.init_b_dec_(x, layer)
    xs = x.double() * opt.scales.double()[
        torch.tensor([LAYERS.index(int(v)) for v in layer])][:, None]
    assert_close(opt.b_dec.double(), xs.mean(0), atol=1e-5, name="b_dec")
    for j, v in enumerate(LAYERS):
        own = xs[layer == v].mean(0)
        assert_close((opt.b_dec + opt.layer_b_dec[j]).double(), own, atol=1e-5,
                     name=f"b_dec + Δb_dec[{v}]")
    # only layers present in the batch move: one with no rows keeps Δ = 0
    opt.init_b_dec_(x[layer != 3], layer[layer != 3])
    assert float(opt.layer_b_dec.detach()[LAYERS.index(3)].abs().max()) == 0.0


@pytest.mark.parametrize("params", OPTIONS, ids="+".join)
def test_mixed_precision_equals_a_bf16_sae_and_keeps_fp32_master_weights(params):
    """bf16 compute over fp32 parameters (the trainer's bf16 option): the forward is that of a
    bf16 SAE holding the rounded weights, up to the gain, which is applied in fp32 (one bf16
    rounding of the gained input); every gradient lands in fp32."""
    mixed = make(params, dtype=torch.float32)
    mixed._compute_dtype = torch.bfloat16
    pure = GroupSAE(D, k=K, num_latents=M, layers=LAYERS, scales=SCALES, dtype=torch.bfloat16,
                    layer_params=params)
    pure.load_state_dict({n: t.bfloat16() for n, t in mixed.state_dict().items()})
    x, layer = torch.randn(50, D), torch.tensor(LAYERS)[torch.randint(3, (50,))]
    dead = torch.rand(M) < 0.3
    a, b = mixed(x, layer=layer, dead_mask=dead), pure(x, layer=layer, dead_mask=dead)
    if "scale" not in params:
        assert torch.equal(a.recon, b.recon) and torch.equal(a.top_indices, b.top_indices)
    else:
        assert_close(a.recon, b.recon, atol=0.1, rtol=0.05, name="recon")
    (a.fvu + a.auxk_loss + a.recon.sum() * 1e-3).backward()
    for name, p in mixed.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, name
        assert float(p.grad.abs().max()) > 0, name


def test_flags_parse_and_plan_the_variants():
    assert layer_params_from("scale, b_dec") == ["b_dec", "scale"]
    assert layer_params_from("none") == []
    with pytest.raises(ValueError, match="b_dec, b_enc, scale"):
        layer_params_from("b_dec,gain")
    assert variant_methods("b_dec,scale+b_dec,b_dec") == ["groups+b_dec", "groups+b_dec+scale"]
    with pytest.raises(ValueError, match="--group-variants"):
        variant_methods("b_enc,bias")
    from lgsae.config import TrainConfig
    with pytest.raises(ValueError, match="leave --layer-params empty"):
        TrainConfig(layer_params="b_dec", group_variants="b_enc")
    for bad in (dict(group_variants="bias"), dict(layer_params="bias")):
        with pytest.raises(ValueError, match="unknown"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="layer_params must be a subset"):
        GroupSAE(D, layers=[1, 2], layer_params=["bias"])
    groups = {"layers": [0, 1, 2, 3, 4], "grouped_layers": [0, 1, 2, 3], "separate_layers": [4],
              "chosen_G": 2, "even": {"groups": [[0, 1], [2, 3]]}}
    specs = plan_saes(groups, [[0], [1, 2, 3]], ["groups", "groups+b_enc", "even", "smaller"],
                      d=8, expansion=2, k=2, layer_params=["scale"])
    by = {(s.method, tuple(s.layers)): s.layer_params for s in specs}
    assert by["groups", (1, 2, 3)] == ["scale"] and by["groups", (0,)] == []
    assert by["groups+b_enc", (1, 2, 3)] == ["b_enc"]  # a variant's own options only
    assert by["even", (0, 1)] == ["scale"] and by["smaller", (1,)] == []
    assert [s.name for s in specs if s.method == "groups+b_enc"] == [
        "groups+b_enc/L00", "groups+b_enc/L01-L03", "groups+b_enc/L04"]
