"""Angular distances, complete-linkage groups, AMAD and Ĝ, and the `python -m lgsae.groups` CLI."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import CharTokenizer, tiny_model, write_texts

from lgsae import groups as G
from lgsae.harvest import HarvestConfig, harvest
from lgsae.similarity import layer_distances


@pytest.mark.parametrize("centre", [False, True])
def test_angular_distance_equals_direct_per_token_computation(tmp_path, centre):
    cfg = HarvestConfig(model="tiny", dataset=write_texts(tmp_path / "t.jsonl"), tokens=48, ctx=8)
    cache = harvest(cfg, root=tmp_path / "c", model=tiny_model(n_layers=4),
                    tokenizer=CharTokenizer(61), shard_contexts=2, progress=False)
    got = layer_distances(cache, centre=centre, chunk=5)  # chunks that cut across shards' rows
    shards = list(cache.iter_shards(skip_sink=True))  # distances skip the sink position too
    x = {v: torch.cat([s[v] for s in shards]).double() for v in cache.layers}
    if centre:
        x = {v: t - t.mean(0) for v, t in x.items()}
    L, T = len(cache.layers), cache.n_stat_tokens
    want = np.zeros((L, L))
    for i in range(L):
        for j in range(L):
            if i != j:
                for t in range(T):
                    a, b = x[i][t], x[j][t]
                    cos = float(a @ b / (a.norm() * b.norm()))
                    want[i, j] += math.acos(max(-1.0, min(1.0, cos))) / math.pi / T
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    assert got.diagonal().abs().max() == 0 and torch.equal(got, got.T)


def brute_force_complete_linkage(dist):
    """Merge, step by step, the two clusters whose largest pairwise distance is smallest."""
    clusters = [[i] for i in range(len(dist))]
    out = {len(clusters): sorted(sorted(c) for c in clusters)}
    while len(clusters) > 1:
        pairs = [(max(dist[a][b] for a in ca for b in cb), i, j)
                 for i, ca in enumerate(clusters) for j, cb in enumerate(clusters) if i < j]
        _, i, j = min(pairs)
        merged = clusters[i] + clusters[j]
        clusters = [c for k, c in enumerate(clusters) if k not in (i, j)] + [merged]
        out[len(clusters)] = sorted(sorted(c) for c in clusters)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_complete_linkage_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 7
    d = rng.random((n, n))
    d = np.triu(d, 1) + np.triu(d, 1).T  # distinct off-diagonal values: no ties
    layers = list(range(10, 10 + n))
    res = G.compute_groups(d, layers, exclude_last=False, threshold=0.5)
    want = brute_force_complete_linkage(d)
    for g, p in res["partitions"].items():
        assert p["groups"] == [[layers[i] for i in c] for c in want[int(g)]], g


def test_amad_by_hand_and_chosen_G():
    # layers 0,1 close; 2,3 close; the two pairs far apart
    d = np.array([[0.00, 0.10, 0.60, 0.70],
                  [0.10, 0.00, 0.50, 0.65],
                  [0.60, 0.50, 0.00, 0.15],
                  [0.70, 0.65, 0.15, 0.00]])
    res = G.compute_groups(d, [0, 1, 2, 3], exclude_last=False, threshold=0.2)
    p = res["partitions"]
    assert p["1"]["groups"] == [[0, 1, 2, 3]] and p["1"]["amad"] == pytest.approx(0.70)
    assert p["2"]["groups"] == [[0, 1], [2, 3]]
    assert p["2"]["amad"] == pytest.approx((0.10 + 0.15) / 2)
    assert p["3"]["groups"] == [[0, 1], [2], [3]] and p["3"]["amad"] == pytest.approx(0.10 / 3)
    assert p["4"]["amad"] == 0
    assert res["chosen_G"] == 2 and all(q["contiguous"] for q in p.values())
    assert G.amad(d, [0, 1, 2, 3], [[0, 2], [1, 3]]) == pytest.approx((0.60 + 0.65) / 2)
    assert G.compute_groups(d, [0, 1, 2, 3], exclude_last=False, threshold=0.05)["chosen_G"] == 3


def test_last_layer_excluded_by_default_and_even_baseline():
    d = np.abs(np.subtract.outer(np.arange(9), np.arange(9))) / 10.0
    res = G.compute_groups(d, list(range(9)), threshold=0.25)
    assert res["separate_layers"] == [8] and res["grouped_layers"] == list(range(8))
    assert all(8 not in g for p in res["partitions"].values() for g in p["groups"])
    assert len(res["even"]["groups"]) == res["chosen_G"]
    assert G.even_partition(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_contiguity_flag_and_contiguous_mode():
    # layers 0 and 3 alike, 1 and 2 alike: unconstrained groups interleave
    d = np.array([[0.0, 0.9, 0.8, 0.1],
                  [0.9, 0.0, 0.1, 0.7],
                  [0.8, 0.1, 0.0, 0.9],
                  [0.1, 0.7, 0.9, 0.0]])
    free = G.compute_groups(d, [0, 1, 2, 3], exclude_last=False, threshold=0.2)
    assert free["partitions"]["2"]["groups"] == [[0, 3], [1, 2]]
    assert not free["partitions"]["2"]["contiguous"]
    forced = G.compute_groups(d, [0, 1, 2, 3], exclude_last=False, threshold=0.2, contiguous=True)
    assert all(p["contiguous"] for p in forced["partitions"].values())
    assert forced["partitions"]["3"]["groups"] == [[0], [1, 2], [3]]


def test_bad_threshold_and_shape():
    with pytest.raises(ValueError, match="threshold must be > 0"):
        G.compute_groups(np.zeros((2, 2)), [0, 1], threshold=0)
    with pytest.raises(ValueError, match="does not match 3 layers"):
        G.compute_groups(np.zeros((2, 2)), [0, 1, 2])
    with pytest.raises(ValueError, match="--layers"):
        G.parse_layers("0-x")
    assert G.parse_layers("0-2,5") == [0, 1, 2, 5] and G.parse_layers("all") is None


@pytest.mark.slow
def test_cli_on_the_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LGSAE_CACHE", str(tmp_path / "cache"))
    res = G.main(["--stat-tokens", "1024", "--ctx", "128", "--layers", "0-7", "--out",
                  str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "groups.json").read_text())
    for key in ("model", "layers", "distances", "threshold", "chosen_G", "partitions", "even",
                "tokens"):
        assert key in data, key
    assert data["layers"] == list(range(8)) and data["tokens"] == 1024
    assert data == json.loads(json.dumps(res))
    assert len(data["partitions"]) == 7  # layers 0..6 clustered, 7 on its own
    for png in ("distances.png", "dendrogram.png", "amad.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5_000
    assert "<- chosen" in capsys.readouterr().out


def test_cli_never_writes_over_a_run_or_earlier_groups(tmp_path):
    """lgsae.groups refuses a train run's folder (its report and SAEs follow its groups.json) and,
    without --overwrite, an earlier groups.json, before loading any model (the model named here
    does not exist, so reaching the load would fail differently)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "groups.json").write_text('{"chosen_G": 7}')
    argv = ["--model", "no-such/model", "--device", "cpu", "--out"]
    for extra in ([], ["--overwrite"]):
        with pytest.raises(FileExistsError, match="is a python -m lgsae.train run"):
            G.main([*argv, str(run), *extra])
    assert (run / "groups.json").read_text() == '{"chosen_G": 7}'
    (run / "run.json").unlink()
    with pytest.raises(FileExistsError, match="already holds groups.json.*--overwrite"):
        G.main([*argv, str(run)])
    assert (run / "groups.json").read_text() == '{"chosen_G": 7}'
