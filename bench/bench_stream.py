"""Streaming throughput: is training from the live forward as fast as its two parts apart?

Target (issue 12): the streamed run costs no more than 1.1x (forward alone + SAE steps alone).
Providers, timed side by side in one run on the default model, its default groups set (Ĝ group
SAEs + the last layer's, from a statistics prefix as `python -m lgsae.train` computes it):
- `forward`: lgsae.sources.StreamSource over the training stream, nothing else (model forward to
  the last layer, capture, sink dropped, stored dtype);
- `steps`: the same SAEs trained on the same batches, already in memory (shuffled by the buffer
  beforehand, outside the clock);
- `stream`: the two together as the trainer runs them: StreamSource -> ShuffleBuffer -> Trainer.
extra_info of `stream` holds `ratio_stream_over_sum` = stream / (forward + steps). A second test
records the peak RSS of a streamed run at two budgets (2x apart).

    pytest bench/bench_stream.py --benchmark-only [--scale tiny|small|paper]
"""

import os

import pytest
from conftest import DEVICE, device_name, measured, median, scale, sync

from lgsae.buffer import ShuffleBuffer
from lgsae.capture import DTYPES
from lgsae.config import TrainConfig
from lgsae.groups import compute_groups
from lgsae.models import load_model, load_tokenizer
from lgsae.plan import plan_saes
from lgsae.similarity import layer_distances
from lgsae.sources import (
    Forward,
    InMemoryActivations,
    StreamSource,
    context_batches,
    make_layout,
)
from lgsae.trainer import Trainer

TOKENS = int(os.environ.get("LGSAE_BENCH_STREAM_TOKENS",
                            {"tiny": 1024, "small": 8192, "paper": 262_144}[scale()]))
STAT_TOKENS = {"tiny": 1024, "small": 4096, "paper": 65_536}[scale()]
CTX, FWD_BATCH = 256, 8 if DEVICE.type == "cpu" else 32
BATCH = {"tiny": 256, "small": 256, "paper": 4096}[scale()]
DTYPE = "bfloat16"  # model forward, stored activations and SAE matmuls, as on a GPU
TEXT = {"dataset": None, "text_column": "text", "seed": 0}


@pytest.fixture(scope="module")
def setting():
    model = load_model(None, dtype=DTYPES[DTYPE], device=DEVICE)
    tok = load_tokenizer(None)
    layers = list(range(model.config.num_hidden_layers))
    fwd = Forward(model, layers, batch_size=FWD_BATCH, store=DTYPES[DTYPE], device=DEVICE)
    lay = make_layout(ctx=CTX, stat_tokens=STAT_TOKENS, eval_tokens=CTX, train_tokens=TOKENS,
                      buffer_tokens=max(2 * BATCH, TOKENS // 4), fwd_batch=FWD_BATCH, batch=BATCH)
    sample = InMemoryActivations.collect(
        fwd, context_batches(tok, TEXT, ctx=CTX, start=0, count=lay.stat_contexts, per=8), CTX)
    groups = compute_groups(layer_distances(sample), layers)
    cfg = TrainConfig(tokens=TOKENS, batch=BATCH, dtype=DTYPE,
                      buffer_tokens=2 * lay.chunk_tokens(0))
    chosen = groups["partitions"][str(groups["chosen_G"])]["groups"]
    specs = plan_saes(groups, chosen, ["groups"], sample.d_model, cfg.expansion, cfg.k)
    return dict(model=model, tok=tok, fwd=fwd, layout=lay, specs=specs, cfg=cfg,
                scales=sample.scales, d_model=sample.d_model)


def _trainer(s) -> Trainer:
    return Trainer(s["specs"], s["cfg"], "bench", d_model=s["d_model"], scales=s["scales"],
                   total_tokens=TOKENS, device=DEVICE)


def _source(s) -> StreamSource:
    return StreamSource(s["fwd"], s["layout"], s["tok"], TEXT)


GROUP = f"stream {TOKENS} tokens, default groups"


@pytest.mark.parametrize("provider", ["forward", "steps", "stream"])
def test_stream_throughput(benchmark, record, setting, provider):
    s = setting
    if provider == "forward":
        def run():
            for _chunk in _source(s).chunks():
                pass
            sync()
        setup = None
    elif provider == "steps":
        held = list(ShuffleBuffer(_source(s), s["layout"], BATCH, 0).batches())

        def setup():
            return (_trainer(s),), {}

        def run(trainer):
            trainer.fit(held, progress=False)
            sync()
    else:
        def setup():
            return (_trainer(s),), {}

        def run(trainer):
            trainer.fit(ShuffleBuffer(_source(s), s["layout"], BATCH, 0).batches(),
                        progress=False)
            sync()

    if setup is None:
        benchmark.pedantic(run, warmup_rounds=1, rounds=3)
    else:
        benchmark.pedantic(run, setup=setup, warmup_rounds=1, rounds=3)
    record(benchmark, GROUP, provider)
    if benchmark.stats is None:
        return
    t = benchmark.stats.stats.median
    info = dict(tokens=TOKENS, batch=BATCH, saes=len(s["specs"]), dtype=DTYPE, scale=scale(),
                device=device_name(), tokens_per_s=TOKENS / t,
                buffer_tokens=2 * s["layout"].chunk_tokens(0))
    if provider == "stream" and median(GROUP, "forward") and median(GROUP, "steps"):
        parts = median(GROUP, "forward") + median(GROUP, "steps")
        info.update(ratio_stream_over_sum=t / parts, target_ratio=1.1)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("factor", [1, 2])
def test_stream_peak_rss(benchmark, setting, factor):
    """Peak resident memory of a streamed run at TOKENS and 2 x TOKENS (one round each)."""
    s = setting
    tokens = TOKENS * factor
    lay = make_layout(ctx=CTX, stat_tokens=STAT_TOKENS, eval_tokens=CTX, train_tokens=tokens,
                      buffer_tokens=2 * s["layout"].chunk_tokens(0), fwd_batch=FWD_BATCH,
                      batch=BATCH)
    out: dict = {}

    def run():
        t = Trainer(s["specs"], s["cfg"], "bench", d_model=s["d_model"], scales=s["scales"],
                    total_tokens=tokens, device=DEVICE)
        src = StreamSource(s["fwd"], lay, s["tok"], TEXT)
        t.fit(ShuffleBuffer(src, lay, BATCH, 0).batches(), progress=False)
        return t.tokens

    trained = benchmark.pedantic(measured(run, out), rounds=1)
    assert trained == tokens // BATCH * BATCH
    benchmark.extra_info.update(group="stream peak memory", provider=f"{factor}x", tokens=tokens,
                                device=device_name(), scale=scale(),
                                **{k: v for k, v in out.items() if v is not None})
