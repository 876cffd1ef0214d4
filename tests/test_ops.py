"""The sparse path (lgsae.ops over lgsae.reference) against plain autograd through a dense SAE."""

import pytest
import torch
from conftest import assert_close

from lgsae import ops, reference

D, M = 48, 100


def make_params(dtype=torch.float64, M=M, D=D):
    W_dec = torch.randn(M, D, dtype=dtype)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return [
        (W_dec + 0.1 * torch.randn(M, D, dtype=dtype)).requires_grad_(),  # W_enc
        (0.1 * torch.randn(M, dtype=dtype)).requires_grad_(),  # b_enc
        W_dec.requires_grad_(),
        (0.1 * torch.randn(D, dtype=dtype)).requires_grad_(),  # b_dec
    ]


def make_x(n_unique, repeats, dtype=torch.float64):
    """Tokens with repeated rows: identical rows choose identical latents, so latents get chosen
    by several tokens and the per-latent reductions must add duplicates up."""
    x = torch.randn(n_unique, D, dtype=dtype)
    return x.repeat(repeats, 1)[torch.randperm(n_unique * repeats)]


def sparse_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead_mask=None, k_aux=0):
    enc = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
    recon = ops.sparse_decode(enc.top_indices, enc.top_acts, W_dec) + b_dec
    resid = x - recon
    total_var = (x - x.mean(0)).pow(2).sum()
    fvu = resid.pow(2).sum() / total_var
    auxk = fvu.new_zeros(())
    if enc.aux_indices.shape[1] > 0:
        e_hat = ops.sparse_decode(enc.aux_indices, enc.aux_acts, W_dec)
        weight = min(int(dead_mask.sum()) / k_aux, 1.0)
        auxk = weight * (e_hat - resid.detach()).pow(2).sum() / total_var
    return recon, fvu, auxk


def loss_of(recon, fvu, auxk, probe):
    # the probe makes every recon entry matter, so a wrong gradient anywhere shows up
    return fvu + auxk / 32 + (recon * probe).sum()


@pytest.mark.parametrize("k", [1, 7, M // 2])
@pytest.mark.parametrize("dead", ["none", "few", "some", "all"])
@pytest.mark.parametrize("x_grad", [False, True])
def test_sparse_grads_equal_dense_autograd(k, dead, x_grad):
    x = make_x(13, 3).requires_grad_(x_grad)
    params = make_params()
    dead_mask = None if dead == "none" else torch.zeros(M, dtype=torch.bool)
    if dead == "few":  # fewer dead than k_aux: AuxK takes all of them (the dense path in ops)
        dead_mask[torch.randperm(M)[:10]] = True  # and its weight is < 1
    elif dead == "some":
        dead_mask[torch.randperm(M)[:30]] = True  # more than k_aux (24): the top 24 among them
    elif dead == "all":
        dead_mask[:] = True  # dead latents that are also in the top-k: duplicates in backward
    k_aux = D // 2 if dead_mask is not None else 0
    probe = torch.randn(x.shape, dtype=x.dtype)

    out_s = sparse_forward(x, *params, k, dead_mask, k_aux)
    grads_s = torch.autograd.grad(loss_of(*out_s, probe), [*params] + ([x] if x_grad else []))
    d = reference.dense_sae_forward(x, *params, k, dead_mask, k_aux)
    out_d = (d.recon, d.fvu, d.auxk_loss)
    grads_d = torch.autograd.grad(loss_of(*out_d, probe), [*params] + ([x] if x_grad else []))

    for name, a, b in zip(("recon", "fvu", "auxk"), out_s, out_d):
        assert_close(a, b, atol=1e-12, rtol=1e-10, name=name)
    if dead != "none":
        assert out_s[2].item() > 0, "AuxK must be active when latents are dead"
    names = ["W_enc", "b_enc", "W_dec", "b_dec", "x"]
    for name, a, b in zip(names, grads_s, grads_d):
        assert_close(a, b, atol=1e-12, rtol=1e-9, name=f"d{name}")


def test_encoder_receives_auxk_gradient():
    """AuxK must train the encoder too, not only the decoder."""
    x = make_x(20, 1)
    params = make_params()
    dead_mask = torch.zeros(M, dtype=torch.bool)
    dead_mask[torch.randperm(M)[:60]] = True
    _, _, auxk = sparse_forward(x, *params, 5, dead_mask, D // 2)
    g_enc, g_dec = torch.autograd.grad(auxk, [params[0], params[2]])
    assert g_enc[dead_mask].abs().sum() > 0
    assert g_enc[~dead_mask].abs().sum() == 0  # live latents get no AuxK gradient
    assert g_dec[dead_mask].abs().sum() > 0


def test_backward_never_touches_unchosen_latents():
    x = make_x(10, 1)
    W_enc, b_enc, W_dec, b_dec = make_params()
    enc = ops.topk_encode(x, W_enc, b_enc, b_dec, 3)
    recon = ops.sparse_decode(enc.top_indices, enc.top_acts, W_dec)
    gW_enc, gW_dec = torch.autograd.grad(recon.sum(), [W_enc, W_dec])
    chosen = torch.zeros(M, dtype=torch.bool)
    chosen[enc.top_indices.flatten()] = True
    assert gW_enc[~chosen].abs().sum() == 0 and gW_dec[~chosen].abs().sum() == 0
    assert gW_dec[chosen].abs().sum(1).min() > 0


@pytest.mark.parametrize("N", [1, 37])
def test_topk_encode_matches_dense_selection(N):
    x = torch.randn(N, D, dtype=torch.float64)
    W_enc, b_enc, _, b_dec = (p.detach() for p in make_params())
    enc = reference.topk_encode(x, W_enc, b_enc, b_dec, 9)
    pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    vals, idx = pre.topk(9, dim=1)
    assert_close(enc.top_acts.sort(1, descending=True).values, vals, atol=1e-12, name="top_acts")
    assert_close(pre.gather(1, enc.top_indices), enc.top_acts, atol=1e-12, name="acts at indices")
    assert enc.aux_indices.shape == (N, 0)


def test_aux_candidates_are_the_top_dead_latents():
    x = torch.randn(11, D, dtype=torch.float64)
    W_enc, b_enc, _, b_dec = (p.detach() for p in make_params())
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    enc = reference.topk_encode(x, W_enc, b_enc, b_dec, 4, dead, k_aux=6)
    pre = torch.relu((x - b_dec) @ W_enc.T + b_enc).masked_fill(~dead, -1.0)
    assert dead[enc.aux_indices].all()
    assert_close(enc.aux_acts.sort(1, descending=True).values, pre.topk(6, dim=1).values,
                 atol=1e-12, name="aux_acts")
    few = torch.zeros(M, dtype=torch.bool)
    few[[5, 50]] = True  # k_aux is capped by the number of dead latents
    capped = reference.topk_encode(x, W_enc, b_enc, b_dec, 4, few, k_aux=6)
    assert capped.aux_indices.shape == (11, 2)


def test_k_out_of_range_is_one_clear_error():
    x = torch.randn(4, D)
    W_enc, b_enc, _, b_dec = (p.detach().float() for p in make_params())
    with pytest.raises(ValueError, match=r"k must be in \[1, 100\]"):
        reference.topk_encode(x, W_enc, b_enc, b_dec, M + 1)


def test_segment_reductions_match_loops():
    N, J = 9, 4
    idx = torch.randint(0, 7, (N, J))  # M=7: many duplicates, some latents never chosen
    w = torch.randn(N, J, dtype=torch.float64)
    rows = torch.randn(N, D, dtype=torch.float64)
    table = torch.randn(7, D, dtype=torch.float64)
    want_scatter = torch.zeros(7, D, dtype=torch.float64)
    want_dot = torch.zeros(N, J, dtype=torch.float64)
    for n in range(N):
        for j in range(J):
            want_scatter[idx[n, j]] += w[n, j] * rows[n]
            want_dot[n, j] = rows[n] @ table[idx[n, j]]
    assert_close(reference.scatter_rows(idx, w, rows, 7), want_scatter, atol=1e-12, name="scatter")
    assert_close(reference.gather_dot(idx, rows, table), want_dot, atol=1e-12, name="gather_dot")


def test_the_sorted_pattern_is_reused_only_for_the_same_unchanged_indices():
    """scatter_rows keeps the last indices' latent order (the decoder's and the encoder's backward
    share it): a changed, a new or a re-sized indices tensor must never get a stale one."""
    N, J, Mx = 9, 4, 7
    w, rows = torch.randn(N, J, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)

    def want(idx, M):
        out = torch.zeros(M, D, dtype=torch.float64)
        for n in range(N):
            for j in range(J):
                out[idx[n, j]] += w[n, j] * rows[n]
        return out

    idx = torch.randint(0, Mx, (N, J))
    for _ in range(2):  # the second call is served from the kept order
        assert_close(reference.scatter_rows(idx, w, rows, Mx), want(idx, Mx), atol=1e-12)
    idx[0] = (idx[0] + 1) % Mx  # in place: same memory, new version
    assert_close(reference.scatter_rows(idx, w, rows, Mx), want(idx, Mx), atol=1e-12,
                 name="after an in-place change")
    assert_close(reference.scatter_rows(idx, w, rows, Mx + 3), want(idx, Mx + 3), atol=1e-12,
                 name="other M")
    other = torch.randint(0, Mx, (N, J))
    assert_close(reference.scatter_rows(other, w, rows, Mx), want(other, Mx), atol=1e-12,
                 name="another tensor")
    with torch.inference_mode():  # no version counter: computed, not kept
        inf = idx.clone()
        assert_close(reference.scatter_rows(inf, w, rows, Mx), want(idx, Mx), atol=1e-12)


def test_decoder_projection_and_renorm():
    W = torch.randn(M, D, dtype=torch.float64)
    W /= W.norm(dim=1, keepdim=True)
    g = torch.randn(M, D, dtype=torch.float64)
    want = g - (g * W).sum(1, keepdim=True) * W
    got = ops.project_decoder_grad_(W, g.clone())
    assert_close(got, want, atol=1e-12, name="projected grad")
    assert (got * W).sum(1).abs().max() < 1e-12  # nothing left along the rows
    V = 3 * torch.randn(M, D, dtype=torch.float64)
    assert_close(ops.renorm_decoder_(V.clone()), V / V.norm(dim=1, keepdim=True), atol=1e-12,
                 name="renorm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_and_single_precision_backward_runs_and_is_close(dtype):
    """bf16 inputs are reduced in fp32 inside the backward; compare against fp64 loosely and
    against the dense path in the same dtype through the reference-error rule (STYLE.md)."""
    x = make_x(40, 2)
    params64 = [p.detach() for p in make_params()]
    probe = torch.randn(x.shape, dtype=torch.float64)

    def grads(fn, dt):
        ps = [p.to(dt).requires_grad_() for p in params64]
        out = fn(x.to(dt), *ps, 8)
        return torch.autograd.grad(loss_of(*out, probe.to(dt)), ps)

    exact = grads(sparse_forward, torch.float64)
    ours = grads(sparse_forward, dtype)
    def dense_forward(*args):
        d = reference.dense_sae_forward(*args)
        return d.recon, d.fvu, d.auxk_loss

    dense = grads(dense_forward, dtype)
    for name, e, o, d in zip(("W_enc", "b_enc", "W_dec", "b_dec"), exact, ours, dense):
        err_ours = (o.double() - e).abs().max().item()
        err_dense = (d.double() - e).abs().max().item()
        assert err_ours <= 2 * err_dense + 1e-5 * e.abs().max().item(), (name, err_ours, err_dense)
