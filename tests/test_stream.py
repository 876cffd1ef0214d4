"""Streaming: the shuffle buffer, streamed = cached bit for bit, resume by position, budgets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_dir, write_texts

from lgsae.buffer import ShuffleBuffer
from lgsae.sources import Layout
from lgsae.train import main


class FakeSource:
    """Chunks whose rows carry their own identity: value = global token index."""

    def __init__(self, layout: Layout, d: int = 3):
        self.layout, self.d, self.loaded = layout, d, []

    def chunks(self, start: int = 0):
        first = sum(self.layout.chunk_tokens(c) for c in range(start))
        for c in range(start, self.layout.n_chunks):
            n = self.layout.chunk_tokens(c)
            self.loaded.append(c)
            ids = torch.arange(first, first + n, dtype=torch.float64)
            first += n
            yield {0: ids[:, None].repeat(1, self.d), 5: -ids[:, None].repeat(1, self.d)}


def layout(contexts=40, chunk=8, ctx=17) -> Layout:
    return Layout(ctx=ctx, stat_contexts=3, eval_contexts=2, train_contexts=contexts,
                  chunk_contexts=chunk)


def test_every_token_is_used_once_and_batches_mix_many_contexts():
    lay = layout()
    buf = ShuffleBuffer(FakeSource(lay), lay, batch=32, seed=1)
    batches = list(buf.batches())
    ids = torch.cat([b[0][:, 0] for b in batches]).long()
    assert len(batches) == buf.total_steps == lay.train_tokens // 32
    assert ids.unique().numel() == ids.numel()  # never twice
    assert ids.numel() == lay.train_tokens - lay.train_tokens % 32  # all but the last partial
    for b in batches:  # the layers of one row are the same token
        assert torch.equal(b[5], -b[0])
    per_ctx = lay.tokens_per_context
    contexts = [(b[0][:, 0].long() // per_ctx).unique().numel() for b in batches]
    # a batch of 32 from a buffer of 16 contexts x 16 tokens draws from most of them (the
    # first and the last phase hold one chunk, 8 contexts)
    assert min(contexts) >= 6 and sum(contexts) / len(contexts) >= 12
    # and it is not the stream order: consecutive tokens rarely meet in one batch
    assert all((b[0][:, 0].sort().values.diff() == 1).float().mean() < 0.5 for b in batches)


@pytest.mark.parametrize("contexts, chunk, ctx, batch", [
    (37, 6, 17, 24),  # a short last chunk
    (133, 8, 32, 128),  # chunks of 248 tokens: halves never fall on a batch boundary
    (50, 3, 17, 24),  # chunks of 48 tokens, two batches each
])
def test_resume_at_any_step_gives_the_same_batches_and_loads_at_most_one_buffer(
        contexts, chunk, ctx, batch):
    lay = layout(contexts=contexts, chunk=chunk, ctx=ctx)
    ref = list(ShuffleBuffer(FakeSource(lay), lay, batch=batch, seed=3).batches())
    for s in range(len(ref)):
        src = FakeSource(lay)
        it = ShuffleBuffer(src, lay, batch=batch, seed=3).batches(start_step=s)
        assert torch.equal(next(it)[0], ref[s][0]), s
        assert len(src.loaded) <= 2, s  # the two chunks of the phase: one buffer of forward
        if s % 7 == 0:
            rest = list(it)
            assert len(rest) == len(ref) - s - 1
            assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, ref[s + 1:]))
    assert list(ShuffleBuffer(FakeSource(lay), lay, batch, 3).batches(start_step=len(ref))) == []


def test_buffer_takes_any_seed_and_refuses_a_source_of_the_wrong_shape():
    lay = layout()
    assert next(ShuffleBuffer(FakeSource(lay), lay, 32, seed=2**40).batches())[0].shape == (32, 3)

    class Short(FakeSource):
        def chunks(self, start=0):
            for c in super().chunks(start):
                yield {v: x[:-1] for v, x in c.items()}

    with pytest.raises(ValueError, match="gave 127 tokens for chunk 0, the layout expects 128"):
        next(ShuffleBuffer(Short(lay), lay, 32, 0).batches())


def test_checkpoints_are_found_in_numeric_order(tmp_path):
    from lgsae.checkpoint import Checkpoints

    ck = Checkpoints(tmp_path, minutes=0)
    for step in (999_999, 1_000_000, 5):
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / "state.json").write_text("x")
    (tmp_path / "step_2000000").mkdir()  # no state.json: not a checkpoint
    assert ck.steps() == [5, 999_999, 1_000_000]


def test_another_seed_shuffles_differently():
    lay = layout()
    a = next(ShuffleBuffer(FakeSource(lay), lay, 32, seed=0).batches())[0]
    b = next(ShuffleBuffer(FakeSource(lay), lay, 32, seed=1).batches())[0]
    assert not torch.equal(a, b)


def test_group_layer_draws_are_uniform_over_the_members():
    from lgsae.config import TrainConfig
    from lgsae.plan import SAESpec
    from lgsae.trainer import Trainer

    spec = SAESpec("groups/L00-L02", "groups", [0, 1, 2], 16)
    t = Trainer([spec], TrainConfig(k=2, batch=4096), "x", d_model=4,
                scales={0: 1.0, 1: 1.0, 2: 1.0}, total_tokens=4096 * 4)
    counts = torch.zeros(3)
    for step in range(4):
        t.step = step
        batch = {v: torch.full((4096, 4), float(v)) for v in (0, 1, 2)}
        x, layer = t._inputs(0, batch, None)
        assert torch.equal(x[:, 0], layer.float())  # each row comes from the layer it names
        counts += torch.bincount(layer, minlength=3)
    share = counts / counts.sum()
    # 16,384 draws: each share within 4 standard errors of 1/3
    assert (share - 1 / 3).abs().max() < 4 * (2 / 9 / counts.sum()) ** 0.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    return {"model": tiny_model_dir(d / "m", n_layers=4),
            "text": write_texts(d / "t.jsonl", n_docs=600), "root": d}


def flags(tiny, out, *extra, tokens=4096):
    return ["--model", tiny["model"], "--dataset", tiny["text"], "--tokens", str(tokens),
            "--eval-tokens", "64", "--stat-tokens", "256", "--ctx", "32", "--batch", "128",
            "--buffer-tokens", "512", "--expansion", "2", "--k", "4", "--out", str(out),
            "--no-progress", "--no-browse", *extra]


def sae_bytes(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes()
            for p in sorted((run / "saes").rglob("*.safetensors"))}  # weights, firing counts


def test_streamed_and_cached_runs_give_bit_identical_saes(tiny, monkeypatch):
    monkeypatch.setenv("LGSAE_CACHE", str(tiny["root"] / "cache"))
    root = tiny["root"]
    main(flags(tiny, root / "streamed"))
    m = main(flags(tiny, root / "cached", "--from-cache"))
    a, b = sae_bytes(root / "streamed"), sae_bytes(root / "cached")
    assert a.keys() == b.keys() and len(a) == 12  # 2 group SAEs + 4 per-layer, 2 files each
    assert a == b
    assert m["source"] == "cache"
    caches = list((root / "cache" / "activations").iterdir())
    assert len(caches) == 1  # the training stream only: statistics and held-out stay in memory
    # a second cached run reuses it, and the streamed run wrote no activations at all
    main(flags(tiny, root / "cached2", "--from-cache"))
    assert list((root / "cache" / "activations").iterdir()) == caches
    assert sae_bytes(root / "cached2") == b
    # another buffer size cuts the stream into other chunks: a cache of its own, never the
    # first one read with the wrong chunk boundaries
    main(flags(tiny, root / "cached3", "--from-cache", "--buffer-tokens", "4096"))
    assert len(list((root / "cache" / "activations").iterdir())) == 2


_KILL = """
import os, signal, sys
import lgsae.sources as S
import lgsae.trainer as TR
real_step, real_fwd = TR.Trainer.train_batch, S.Forward._run
def dying(self, batch):
    if self.step == int(os.environ["DIE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, batch)
def counting(self, ids):
    with open(os.environ["COUNT_FILE"], "a") as f:
        f.write(f"{ids.shape[0]}\\n")
    return real_fwd(self, ids)
TR.Trainer.train_batch = dying
S.Forward._run = counting
import lgsae.train as T
T.main(sys.argv[1:])
"""


@pytest.mark.parametrize("die_at", [3, 13])
def test_resume_after_sigkill_is_bit_identical_and_redoes_at_most_one_buffer(
        tiny, tmp_path, die_at):
    root = tiny["root"]
    if not (root / "streamed").exists():
        main(flags(tiny, root / "streamed"))
    script, counts = tmp_path / "kill.py", tmp_path / "count.txt"
    script.write_text(_KILL)
    env = {**os.environ, "DIE_AT": str(die_at), "COUNT_FILE": str(counts),
           "LGSAE_CACHE": str(root / "cache")}
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(script),
                           *flags(tiny, run, "--checkpoint-minutes", "0")],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == [f"step_{die_at:06d}"]
    counts.write_text("")
    env["DIE_AT"] = "-1"
    proc = subprocess.run([sys.executable, str(script),
                           *flags(tiny, run, "--checkpoint-minutes", "0", "--resume")],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sae_bytes(run) == sae_bytes(root / "streamed")
    # forward work of the resumed run: statistics + held-out + the rest of the stream + at
    # most one buffer (two chunks) re-done; the chunks before the kill are not replayed
    from lgsae.sources import make_layout

    lay = make_layout(ctx=32, stat_tokens=256, eval_tokens=64, train_tokens=4096,
                      buffer_tokens=512, fwd_batch=8, batch=128)
    done_ctx = die_at * 128 // lay.tokens_per_context  # contexts consumed before the kill
    redo = sum(int(n) for n in counts.read_text().split())
    assert redo <= lay.train_start + (lay.train_contexts - done_ctx) + 2 * lay.chunk_contexts
    if done_ctx > 2 * lay.chunk_contexts:  # killed past the first buffer: less than a replay
        assert redo < lay.train_start + lay.train_contexts
    assert not (run / "checkpoints").exists()


def test_tokens_beyond_the_text_is_one_clear_error_and_writes_nothing(tiny, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("LGSAE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"holds [\d,]+ contexts of 32 .*at most [\d,]+ "
                                         r"training tokens fit\. Lower --tokens"):
        main(flags(tiny, tmp_path / "run", tokens=10_000_000))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--buffer-tokens", "100", "--buffer-tokens must be >= 256, got 100"),
    ("--stat-tokens", "8", "--stat-tokens must be >= 32, got 8"),
])
def test_bad_settings_name_the_flag(tiny, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:  # the CLI parser prints the error and exits 2
        main(flags(tiny, tmp_path / "run", flag, value))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


_MEASURE = """
import resource, sys
import lgsae.train as T
T.main(sys.argv[1:])
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_memory_and_disk_do_not_grow_with_tokens(tmp_path):
    """Two streamed runs 2x apart in tokens on a wider model (the 24k-token stream of 4 layers x
    512 x 4 B is 200 MB, 100 MB more than the 12k one's: holding it would break the bound): peak
    RSS and the run folder's size within 10 %."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = tmp_path / "wide"
    tiny_model_dir(model_dir, n_layers=4)
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.hidden_size, cfg.intermediate_size = 512, 1024
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    text = write_texts(tmp_path / "t.jsonl", n_docs=5000)
    rss, disk = [], []
    for tokens in (12_288, 24_576):
        out = tmp_path / f"run{tokens}"
        argv = ["--model", str(model_dir), "--dataset", text, "--tokens", str(tokens),
                "--eval-tokens", "64", "--stat-tokens", "512", "--ctx", "64", "--batch", "512",
                "--buffer-tokens", "2048", "--expansion", "1", "--k", "4", "--act-dtype",
                "float32", "--baselines", "none", "--out", str(out), "--no-progress", "--no-browse",
                "--checkpoint-minutes", "0", "--keep-checkpoint"]  # the checkpoint is measured
        proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True,
                              text=True, env={**os.environ, "LGSAE_CACHE": str(tmp_path / "c")})
        assert proc.returncode == 0, proc.stderr[-2000:]
        rss.append(int(proc.stdout.split("MAXRSS")[-1]))
        disk.append(_du(out))
        assert json.loads((out / "metrics.json").read_text())["tokens_train"] == tokens
    assert rss[1] <= 1.10 * rss[0], rss
    assert disk[1] <= 1.10 * disk[0], disk
    assert not (tmp_path / "c" / "activations").exists()  # nothing harvested to disk
