"""Evaluation: the spliced forward from block v, loss recovered, error bars and paired intervals,
the group dead window, special-token exclusion, the norm-outlier guard and feature spread."""

import math

import pytest
import torch
from conftest import CharTokenizer, assert_close, tiny_model, tiny_model_dir, write_texts

from lgsae import GroupSAE
from lgsae.capture import KEEP, find_blocks, kept_positions, special_ids
from lgsae.evaluate import Splicer, evaluate
from lgsae.stats import MIN_FIRES, jackknife_se, mmcs, spread, summarize_eval, t_interval


def _replace_output(block, h):
    def hook(module, args, output):
        return (h, *output[1:]) if isinstance(output, tuple) else h
    return block.register_forward_hook(hook)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_forward_from_block_equals_the_full_forward_and_runs_only_later_blocks(arch):
    model = tiny_model(arch, n_layers=4).double()
    blocks = find_blocks(model)
    ids = torch.randint(1, 61, (3, 12))
    splicer = Splicer(model)
    logits, hidden = splicer.clean(ids, range(4))
    ran = []
    for i, b in enumerate(blocks):
        b.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    for v in range(4):
        h = hidden[v] + 0.3 * torch.randn_like(hidden[v])
        with torch.no_grad():
            handle = _replace_output(blocks[v], h)
            full = model(input_ids=ids, use_cache=False).logits
            handle.remove()
        ran.clear()
        part = splicer.from_block(ids, v, h)
        assert ran == list(range(v + 1, 4)), ran  # blocks 0..v are stand-ins
        assert_close(part, full, atol=1e-10, name=f"{arch} from block {v}")
        # the splice lands on block v: its own clean output gives the clean logits ...
        assert_close(splicer.from_block(ids, v, hidden[v]), logits, atol=1e-10, name="clean")
        if v > 0:  # ... and the previous block's output (an off-by-one) does not
            assert (splicer.from_block(ids, v, hidden[v - 1]) - logits).abs().max() > 1e-3
    assert all("forward" not in b.__dict__ for b in blocks)  # the stand-ins are gone


def identity_sae(d: int, layer: int) -> GroupSAE:
    """z = ReLU([x; −x]) with all 2D latents kept, W_dec = [I; −I]: x̂ = x."""
    sae = GroupSAE(d, k=2 * d, num_latents=2 * d, layers=[layer]).double()
    eye = torch.eye(d, dtype=torch.float64)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


def zero_sae(d: int, layer: int) -> GroupSAE:
    sae = GroupSAE(d, k=2, num_latents=8, layers=[layer]).double()
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def test_loss_recovered_is_one_for_an_identity_sae_and_zero_for_a_zero_sae():
    model = tiny_model("llama", n_layers=4).double()
    ids = torch.randint(1, 61, (6, 16))
    ids[:, 5] = 0  # a special token inside each context: left unspliced
    saes = {"id": {1: identity_sae(32, 1), 2: identity_sae(32, 2)},
            "zero": {1: zero_sae(32, 1), 2: zero_sae(32, 2)}}
    means = {v: torch.randn(32, dtype=torch.float64) for v in (1, 2)}
    tally = evaluate(saes, model, [ids[:4], ids[4:]], special=[0], means=means, progress=False)
    assert tally["contexts"] == 6 and tally["kept"] == 6 * 14
    ev = summarize_eval(tally, 32, last=3)
    for v in (1, 2):
        ident, zero = ev["per_layer"]["id"][v], ev["per_layer"]["zero"][v]
        assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-9)
        assert ident["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-9)
        assert ident["fvu"] == pytest.approx(0.0, abs=1e-12)
        assert ident["kl"] == pytest.approx(0.0, abs=1e-9)
        assert zero["loss_recovered"] == 0.0  # the splice is the zero ablation, bit for bit
        assert zero["delta_ce_pct"] > 0 and zero["kl"] > 0
    assert math.isfinite(ev["means"]["zero"]["loss_recovered_mean_se"])


def test_every_per_context_sum_matches_a_direct_computation():
    """A random SAE on layer 2, special tokens inside the contexts, a non-zero mean: each
    per-context sum of the tally against the full model with forward hooks, context by context."""
    import torch.nn.functional as F

    model = tiny_model("llama", n_layers=4).double()
    blocks = find_blocks(model)
    ids = torch.randint(1, 61, (5, 16))
    ids[1, 7] = ids[3, 2] = 0
    special = [0]
    sae = GroupSAE(32, k=3, num_latents=24, layers=[2], scales=[0.37], seed=3).double()
    with torch.no_grad():
        sae.b_dec.normal_()
    means = {2: torch.randn(32, dtype=torch.float64)}
    tally = evaluate({"m": {2: sae}}, model, [ids[:2], ids[2:]], special=special, means=means,
                     progress=False)
    t = tally["sae"]["m"][2]
    keep = kept_positions(ids, special)
    fires = torch.zeros(24, dtype=torch.long)
    for c in range(5):
        one, k = ids[c:c + 1], keep[c:c + 1]
        with torch.no_grad():
            out = model(input_ids=one, output_hidden_states=True, use_cache=False)
            x = out.hidden_states[3][k]
            rec = sae(x, layer=2)

            def ce_with(fill):
                def hook(module, args, output):
                    h = (output[0] if isinstance(output, tuple) else output).clone()
                    h[k] = fill
                    return (h, *output[1:]) if isinstance(output, tuple) else h
                handle = blocks[2].register_forward_hook(hook)
                logits = model(input_ids=one, use_cache=False).logits[0, :-1]
                handle.remove()
                return F.log_softmax(logits, -1)

            lp_clean = F.log_softmax(out.logits[0, :-1], -1)
            lp = ce_with(rec.recon)
        target = one[0, 1:, None]
        s = float(sae.scales[0])  # 0.37 as the SAE keeps it (fp32)
        xs, err = x * s, (x - rec.recon) * s
        direct = {
            "sse": err.pow(2).sum(), "s2": xs.pow(2).sum(), "n": k.sum(),
            "l0": (rec.top_acts > 0).sum(),
            "ev": (1 - err.pow(2).sum(1) / (xs - means[2] * s).pow(2).sum(1)).sum(),
            "ce": -lp.gather(-1, target).sum(),
            "kl": (lp_clean.exp() * (lp_clean - lp)).sum()}
        for key, val in direct.items():
            assert float(t[key][c]) == pytest.approx(float(val), rel=1e-9, abs=1e-9), (key, c)
        assert_close(t["s1"][c], xs.sum(0), atol=1e-9, name="s1")
        assert float(tally["clean"][c]) == pytest.approx(float(-lp_clean.gather(-1, target).sum()))
        for name, fill in (("zero", 0.0), ("mean", means[2])):
            with torch.no_grad():
                ce = -ce_with(fill).gather(-1, target).sum()
            assert float(tally["ablation"][2][name][c]) == pytest.approx(float(ce), rel=1e-9)
        fires += torch.bincount(rec.top_indices[rec.top_acts > 0], minlength=24)
    assert torch.equal(t["fires"], fires)
    # FVU's denominator is around the mean of all held-out kept tokens
    with torch.no_grad():
        x_all = model(input_ids=ids, output_hidden_states=True).hidden_states[3][keep] * s
    ev = summarize_eval(tally, 32)
    sst = (x_all - x_all.mean(0)).pow(2).sum()
    assert ev["per_layer"]["m"][2]["fvu"] == pytest.approx(float(t["sse"].sum() / sst), rel=1e-9)


def test_tallies_from_several_ranks_merge_to_the_one_process_tally():
    from lgsae.pipeline import merge_tallies

    model = tiny_model("llama", n_layers=4)
    ids = torch.randint(1, 61, (4, 12))
    saes = {"groups": {1: GroupSAE(32, k=2, num_latents=16, layers=[1, 2], seed=1)},
            "per-layer": {1: GroupSAE(32, k=2, num_latents=16, layers=[1], seed=2),
                          2: GroupSAE(32, k=2, num_latents=16, layers=[2], seed=3)}}
    saes["groups"][2] = saes["groups"][1]
    kw = dict(special=[], means={v: torch.zeros(32) for v in (1, 2)}, progress=False)
    one = evaluate(saes, model, [ids], **kw)
    parts = [evaluate({"groups": saes["groups"]}, model, [ids], **kw),
             evaluate({"per-layer": saes["per-layer"]}, model, [ids], **kw)]
    merged = merge_tallies(parts)
    a, b = summarize_eval(one, 32), summarize_eval(merged, 32)
    assert a["per_layer"] == b["per_layer"] and a["paired"] == b["paired"]
    assert set(b["paired"]) == {"groups"}


def _synthetic_tally(per_ctx: dict[str, dict[int, dict]], C: int, D: int = 4) -> dict:
    """A tally whose per-context sums are given (the rest filled so every metric is defined)."""
    ones = torch.ones(C, dtype=torch.float64)
    sae = {}
    for method, rows in per_ctx.items():
        for v, t in rows.items():
            base = {"sse": ones, "s1": torch.zeros(C, D, dtype=torch.float64), "s2": 4 * ones,
                    "n": 2 * ones, "l0": 2 * ones, "ev": ones, "ce": 3 * ones, "kl": ones,
                    "fires": torch.ones(8)}
            sae.setdefault(method, {})[v] = {**base, **t}
    layers = {v for rows in per_ctx.values() for v in rows}
    return {"contexts": C, "targets": 10 * ones, "clean": 2 * ones, "sae": sae,
            "ablation": {v: {"zero": 9 * ones, "mean": 5 * ones} for v in layers}}


def test_standard_error_and_paired_interval_match_a_computation_by_hand():
    from scipy.stats import t as student

    C = 7
    g = torch.Generator().manual_seed(1)
    kl_a = torch.rand(C, generator=g, dtype=torch.float64) * 10  # per-context Σ KL, 10 targets
    kl_b = torch.rand(C, generator=g, dtype=torch.float64) * 10
    sse = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    tally = _synthetic_tally({"per-layer": {0: {"kl": kl_b}, 1: {"kl": kl_b}},
                              "groups": {0: {"kl": kl_a, "sse": sse}, 1: {"kl": kl_a}}}, C)
    ev = summarize_eval(tally, 4, last=1)  # layer 1 is the last: means are over layer 0
    # a mean of per-context values: SE = sample sd / sqrt(C)
    per_ctx = kl_a / 10
    assert ev["means"]["groups"]["kl"] == pytest.approx(float(per_ctx.mean()))
    assert ev["means"]["groups"]["kl_se"] == pytest.approx(float(per_ctx.std() / math.sqrt(C)))
    # paired: mean difference ± t(0.975, C-1) · sd(d) / sqrt(C)
    d = (kl_a - kl_b) / 10
    p = ev["paired"]["groups"]["kl"]
    half = float(student.ppf(0.975, C - 1)) * float(d.std() / math.sqrt(C))
    assert p["diff"] == pytest.approx(float(d.mean()))
    assert p["ci95"] == pytest.approx([float(d.mean()) - half, float(d.mean()) + half])
    # a ratio (FVU = Σ sse / Σ sst): the delete-one jackknife, written out
    sst = torch.full((C,), 4.0, dtype=torch.float64)  # s2 = 4, s1 = 0
    loo = torch.stack([(sse.sum() - sse[i]) / (sst.sum() - sst[i]) for i in range(C)])
    by_hand = math.sqrt((C - 1) / C * float(((loo - loo.mean()) ** 2).sum()))
    assert ev["per_layer"]["groups"][0]["fvu"] == pytest.approx(float(sse.sum() / sst.sum()))
    assert ev["per_layer"]["groups"][0]["fvu_se"] == pytest.approx(by_hand)
    # loss recovered from the ablations: (9 - 3) / (9 - 2)
    assert ev["per_layer"]["groups"][0]["loss_recovered"] == pytest.approx(6 / 7)
    assert ev["per_layer"]["groups"][0]["loss_recovered_mean"] == pytest.approx(2 / 3)
    assert math.isnan(jackknife_se(torch.ones(1))) and math.isnan(t_interval(1.0, 0.1, 1)[0])


def test_a_group_latent_firing_on_one_member_layer_is_not_dead_after_window_over_g():
    from lgsae.config import TrainConfig
    from lgsae.plan import SAESpec
    from lgsae.trainer import Trainer

    specs = [SAESpec("groups/L00-L02", "groups", [0, 1, 2], 16),
             SAESpec("per-layer/L00", "per-layer", [0], 16)]
    W = 300
    tr = Trainer(specs, TrainConfig(k=2, batch=50, dead_window=W), "tiny", d_model=8,
                 scales={0: 1.0, 1: 1.0, 2: 1.0}, total_tokens=10_000)
    assert tr.windows == [3 * W, W]
    fire0 = torch.zeros(16, dtype=torch.bool)
    fire0[0] = True
    # latent 0 fires on layer 0 once per 200 of that layer's tokens, i.e. once per 600 group
    # tokens; a per-layer latent firing once per 200 tokens is alive (200 < W), so it is too
    for step in range(1, 25):
        fired = fire0 if step % 12 == 0 else torch.zeros(16, dtype=torch.bool)
        tr.count_fires(0, fired, 50)
        assert not bool(tr.dead_latents(0)[0]), step
    # a latent that never fires is dead after 3W group tokens, not one token before
    assert bool(tr.dead_latents(0)[1])
    tr.since_fire[0][1] = 3 * W - 1
    assert not bool(tr.dead_latents(0)[1])
    tr.count_fires(1, torch.zeros(16, dtype=torch.bool), W)
    assert bool(tr.dead_latents(1).all())  # the per-layer SAE's window is W


def test_special_token_positions_are_left_out_of_statistics_training_and_evaluation(tmp_path):
    from lgsae.models import load_model, load_tokenizer
    from lgsae.sources import (
        Forward,
        InMemoryActivations,
        StreamSource,
        context_batches,
        make_layout,
    )

    folder = tiny_model_dir(tmp_path / "m", bos=True)
    tok, model = load_tokenizer(folder), load_model(folder)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    special = special_ids(tok)
    assert bos in special and eos in special and tok.unk_token_id not in special
    text = {"dataset": write_texts(tmp_path / "t.jsonl", n_docs=60)}
    ids = next(context_batches(tok, text, ctx=16, start=0, count=8, per=8))
    assert bool((ids == bos).any()) and bool((ids == eos).any())  # BOS per document, EOS joins
    keep = kept_positions(ids, special)
    assert not bool(keep[:, 0].any())
    assert not bool(keep[(ids == bos) | (ids == eos)].any())
    # statistics: means over the kept positions only
    fwd = Forward(model, [0, 1, 2, 3], batch_size=4, store=torch.float32, device="cpu")
    stat = InMemoryActivations(ids, fwd(ids), 16, special)
    x = stat.acts[2].view(8, 16, -1)[keep].double()
    assert_close(stat.means()[2], x.mean(0), atol=1e-9, name="mean")
    assert stat.n_stat_tokens == int(keep.sum())
    # training: the stream marks them, the trainer skips them
    lay = make_layout(ctx=16, stat_tokens=16, eval_tokens=16, train_tokens=8 * 15,
                      buffer_tokens=256, fwd_batch=8, batch=32)
    chunk = next(StreamSource(fwd, lay, tok, text, special).chunks())
    assert chunk[KEEP].shape == (lay.chunk_tokens(0),)
    from lgsae.config import TrainConfig
    from lgsae.plan import SAESpec
    from lgsae.trainer import Trainer

    # 256 latents, k = 2: a step of ~100 tokens cannot fire them all, so some counters advance
    tr = Trainer([SAESpec("groups/L01-L02", "groups", [1, 2], 256)], TrainConfig(k=2, batch=32),
                 "tiny", d_model=32, scales=stat.scales, total_tokens=1000)
    seen = []
    orig = tr.saes[0].forward
    tr.saes[0].forward = lambda x, *a, **k: (seen.append(x.shape[0]), orig(x, *a, **k))[1]
    n = lay.chunk_tokens(0)
    tr.train_batch({v: chunk[v][:n] for v in (1, 2)} | {KEEP: chunk[KEEP][:n]})
    assert seen == [int(chunk[KEEP][:n].sum())] and tr.kept == seen[0] and tr.tokens == n
    assert int(tr.since_fire[0].max()) == seen[0]  # dead counters advance by the kept tokens
    # evaluation: only kept positions go through the SAE; the others keep clean activations
    counted = []

    class Recording(GroupSAE):
        def forward(self, x, *a, **k):
            counted.append(x.shape[0])
            return super().forward(x, *a, **k)

    sae = Recording(32, k=2, num_latents=16, layers=[1])
    tally = evaluate({"m": {1: sae}}, model, [ids], special=special, progress=False)
    assert counted == [int(keep.sum())] and tally["kept"] == int(keep.sum())


def test_norm_outliers_are_reported_with_their_token():
    from lgsae.sources import InMemoryActivations

    ids = torch.randint(1, 61, (3, 8))
    acts = {1: torch.randn(24, 4)}
    acts[1][8 + 5] *= 1000  # context 1, position 5
    acts[1][0] *= 1000  # the sink: not reported (it is left out anyway)
    stat = InMemoryActivations(ids, acts, 8, special=[])
    assert [(o["layer"], o["context"], o["position"], o["token_id"]) for o in stat.outliers] == \
        [(1, 1, 5, int(ids[1, 5]))]
    assert stat.outliers[0]["ratio"] > 50
    model = tiny_model("llama")
    ids = torch.randint(1, 61, (2, 8))
    tally = evaluate({"m": {1: GroupSAE(32, k=2, num_latents=8, layers=[1])}}, model, [ids],
                     medians={1: 1e-6}, progress=False)  # every kept position is "massive"
    assert len(tally["outliers"]) == 2 * 7
    assert {(o["context"], o["position"]) for o in tally["outliers"]} == \
        {(c, p) for c in range(2) for p in range(1, 8)}


def test_spread_statistics_on_a_planted_example():
    M = 6
    counts = torch.zeros(3, M)
    counts[:, 0] = torch.tensor([40, 0, 0])  # one layer only: share 1, peak layer 10
    counts[:, 1] = torch.tensor([20, 20, 20])  # spread evenly: share 1/3 (argmax: layer 10)
    counts[:, 2] = torch.tensor([0, MIN_FIRES - 1, 0])  # too rare: not counted
    counts[:, 3] = torch.tensor([10, 20, 70])  # peaks at layer 12 with 0.7
    counts[:, 4] = torch.tensor([0, 30, 10])  # peaks at layer 11 with 0.75
    s = spread(counts, [10, 11, 12], bins=4)
    assert s["latents_counted"] == 4 and s["min_fires"] == MIN_FIRES
    assert s["peak_share_mean"] == pytest.approx((1 + 1 / 3 + 0.7 + 0.75) / 4)
    assert s["peak_layer_counts"] == {"10": 2, "11": 1, "12": 1}
    assert s["one_layer_pct"] == pytest.approx(25.0)
    # bins over [1/3, 1]: 1/3 -> first, 0.7 and 0.75 -> third, 1 -> last
    assert s["peak_share_hist"]["counts"] == [1, 0, 2, 1]
    # MMCS: a permuted copy matches fully, an orthogonal set not at all, a 45° set at cos 45°
    W = torch.eye(4)
    assert mmcs(W, W[[2, 0, 3, 1]]) == pytest.approx(1.0)
    assert mmcs(W[:2], W[2:]) == pytest.approx(0.0)
    tilted = torch.tensor([[1.0, 1.0, 0, 0], [0, 0, 1.0, 1.0]])
    assert mmcs(W, tilted) == pytest.approx(math.cos(math.pi / 4))


def test_char_tokenizer_special_ids_are_its_eos():
    assert special_ids(CharTokenizer(61)) == [0]
