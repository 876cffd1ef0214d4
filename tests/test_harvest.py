"""Harvest: exact capture, early stop, cache round trip, resume after SIGKILL, corruption,
errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, CharTokenizer, tiny_model, write_texts

from lgsae.data import token_contexts
from lgsae.harvest import (
    ActivationCache,
    CorruptCacheError,
    HarvestConfig,
    LayerCapture,
    find_blocks,
    harvest,
)

FINAL_NORM = {"llama": "model.norm", "gpt_neox": "gpt_neox.final_layer_norm",
              "gpt2": "transformer.ln_f"}


def _set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_capture_equals_output_hidden_states(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 61, (3, 11))
    with LayerCapture(model, [0, 1, 2, 3]) as cap:
        got = cap.run(ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for layer in range(3):
        assert torch.equal(got[layer], hs[layer + 1]), layer
    # HF applies the final norm to hidden_states[-1]; the residual stream is the block output
    _set_module(model, FINAL_NORM[arch], torch.nn.Identity())
    with torch.no_grad():
        raw_last = model(ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(got[3], raw_last)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_forward_stops_after_the_last_requested_block(arch):
    model = tiny_model(arch, n_layers=5)
    calls = {"block3": 0, "head": 0}
    find_blocks(model)[3].register_forward_hook(lambda *a: calls.__setitem__("block3", 1))
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.__setitem__("head", 1))
    ids = torch.randint(1, 61, (2, 9))
    with LayerCapture(model, [0, 2]) as cap:
        early = cap.run(ids)
    assert calls == {"block3": 0, "head": 0}
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(early[0], hs[1]) and torch.equal(early[2], hs[3])
    for h in cap.handles:  # ours are removed on exit
        assert all(h.id not in b._forward_hooks for b in find_blocks(model))


def _cfg(tmp_path, **kw):
    return HarvestConfig(model="tiny", dataset=write_texts(tmp_path / "t.jsonl"),
                         **{"tokens": 6 * 16, "ctx": 16, **kw})


def test_cache_round_trip_and_reuse(tmp_path):
    model, tok = tiny_model("llama"), CharTokenizer(61)
    cfg = _cfg(tmp_path, layers=[1, 3])
    cache = harvest(cfg, root=tmp_path / "c", model=model, tokenizer=tok, batch_size=4,
                    shard_contexts=4, progress=False)
    assert cache.layers == [1, 3] and cache.n_tokens == 96
    assert len(cache.manifest["shards"]) == 2  # 6 contexts, 4 per shard
    ids = token_contexts(tok, cfg.dataset, n_tokens=96, ctx_len=16)
    assert torch.equal(cache.tokens(), ids)
    with LayerCapture(model, [1, 3]) as cap:
        want = cap.run(ids)
    got = {v: torch.cat([s[v] for s in cache.iter_shards()]) for v in (1, 3)}
    kept = {v: torch.cat([s[v] for s in cache.iter_shards(skip_sink=True)]) for v in (1, 3)}
    for v in (1, 3):
        assert torch.equal(got[v], want[v].reshape(-1, 32)), v
        # statistics skip the attention-sink position (0) of every context
        assert torch.equal(kept[v], want[v][:, 1:].reshape(-1, 32)), v
        mean_norm = want[v][:, 1:].reshape(-1, 32).double().norm(dim=1).mean().item()
        assert cache.scales[v] == pytest.approx(1 / mean_norm, rel=1e-6)
    assert torch.allclose(cache.means()[1], want[3][:, 1:].reshape(-1, 32).double().mean(0))

    class Boom(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("a finished cache must be reused, not recomputed")

    again = harvest(cfg, root=tmp_path / "c", model=Boom(), tokenizer=tok, progress=False)
    assert again.manifest == cache.manifest


_CHILD = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import CharTokenizer, tiny_model
import lgsae.harvest as H
real, n = H._write_shard, [0]
def killing_write(*a, **k):
    out = real(*a, **k)
    n[0] += 1
    if n[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
H._write_shard = killing_write
cfg = H.HarvestConfig(**{cfg!r})
H.harvest(cfg, root={root!r}, model=tiny_model("gpt_neox"), tokenizer=CharTokenizer(61),
          batch_size=2, shard_contexts=2, progress=False)
"""


def test_killed_harvest_resumes_to_byte_identical_shards(tmp_path):
    cfg = _cfg(tmp_path, tokens=8 * 16)
    from dataclasses import asdict

    child = _CHILD.format(tests=str(Path(__file__).parent), cfg=asdict(cfg),
                          root=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    # killed right after the 2nd shard was renamed into place with its record: the manifest was
    # not rewritten per shard (that was quadratic); the records say what is done
    assert not manifest["complete"] and "shards" not in manifest
    assert (tmp_path / "killed" / "shard_00001" / "shard.json").is_file()
    assert not (tmp_path / "killed" / "shard_00002").exists()
    with pytest.raises(CorruptCacheError, match="unfinished harvest"):
        ActivationCache(tmp_path / "killed")

    kw = dict(tokenizer=CharTokenizer(61), batch_size=2, shard_contexts=2, progress=False)
    model, calls = tiny_model("gpt_neox"), []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[0]),
                                    with_kwargs=True)
    resumed = harvest(cfg, root=tmp_path / "killed", model=model, **kw)
    assert sum(calls) == 4  # only the 2 missing shards of 2 contexts went through the model
    clean = harvest(cfg, root=tmp_path / "clean", model=tiny_model("gpt_neox"), **kw)
    assert len(resumed.manifest["shards"]) == 4
    def untimed(m):  # wall-clock per shard differs between runs; everything else may not
        return {k: [{**sh, "seconds": 0} for sh in v] if k == "shards" else v
                for k, v in m.items() if k != "seconds"}

    assert untimed(resumed.manifest) == untimed(clean.manifest)  # same sha256 everywhere
    assert len(resumed.manifest["seconds"]) == 4 and resumed.harvest_seconds > 0
    for shard in clean.manifest["shards"]:
        for name in shard["sha256"]:
            a = (tmp_path / "killed" / shard["dir"] / name).read_bytes()
            assert a == (tmp_path / "clean" / shard["dir"] / name).read_bytes(), name


def test_corrupted_shard_is_detected_on_load(tmp_path):
    cache = harvest(_cfg(tmp_path, layers=[0]), root=tmp_path / "c", model=tiny_model(),
                    tokenizer=CharTokenizer(61), progress=False)
    f = tmp_path / "c" / cache.manifest["shards"][0]["dir"] / "L000.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="does not match its checksum"):
        list(cache.iter_shards())
    f.unlink()
    with pytest.raises(CorruptCacheError, match="is missing"):
        list(cache.iter_shards())


def test_bad_input_gives_one_clear_error(tmp_path):
    kw = dict(tokenizer=CharTokenizer(61), progress=False)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \[7\]: this model has blocks 0..3"):
        harvest(_cfg(tmp_path, layers=[1, 7]), root=tmp_path / "a", model=tiny_model(), **kw)

    class NoBlocks(torch.nn.Module):
        config = tiny_model().config

    with pytest.raises(ValueError, match="has no list of 4 transformer blocks"):
        harvest(_cfg(tmp_path), root=tmp_path / "b", model=NoBlocks(), **kw)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="yielded no text"):
        harvest(HarvestConfig(dataset=str(empty), tokens=32, ctx=16), root=tmp_path / "c",
                model=tiny_model(), **kw)
    with pytest.raises(ValueError, match="fewer than one context of 4096"):
        harvest(_cfg(tmp_path, tokens=8192, ctx=4096), root=tmp_path / "d", model=tiny_model(),
                **kw)
    model = tiny_model()
    find_blocks(model)[1].register_forward_hook(
        lambda m, a, out: (out[0] * float("nan"),) + tuple(out[1:]) if isinstance(out, tuple)
        else out * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite activations at layer 1"):
        harvest(_cfg(tmp_path), root=tmp_path / "e", model=model, **kw)
