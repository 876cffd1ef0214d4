"""Harvest throughput vs a bare forward of the same model up to the last harvested layer.
Target (issue 4): harvest >= 0.9x the bare forward's tokens/s. Run:
pytest bench/bench_harvest.py --benchmark-only [--scale small|paper]

`bare` runs the same batches through the model and stops after the last block (the hook raises),
keeping nothing; `harvest` is `lgsae.harvest.harvest` into a fresh folder: tokenising, capturing
every layer, finiteness checks, statistics, safetensors shards, checksums and the manifest, with
activations stored in the model's dtype (fp32); `harvest_bf16_store` stores them as bf16.
Tokens: 2,048 at scale small, 32,768 at paper; $LGSAE_BENCH_HARVEST_TOKENS overrides.
extra_info: flops = 2·(parameters of the blocks run)·tokens (attention scores left out),
gb_per_s_stored = activation bytes stored per second, peak_memory_mb of one extra run.
"""

import os
import tempfile

import pytest
from conftest import DEVICE, device_name, peak_memory_mb, scale, sync

from lgsae.data import token_contexts
from lgsae.harvest import HarvestConfig, LayerCapture, find_blocks, harvest
from lgsae.models import load_model, load_tokenizer

TOKENS = int(os.environ.get("LGSAE_BENCH_HARVEST_TOKENS",
                            {"tiny": 512, "small": 2048, "paper": 32768}[scale()]))
CTX, BATCH = 256, 8


@pytest.fixture(scope="module")
def lm():
    return load_model(None, device=DEVICE), load_tokenizer(None)


@pytest.mark.parametrize("provider", ["bare", "harvest", "harvest_bf16_store"])
def test_harvest_throughput(benchmark, record, lm, provider):
    model, tok = lm
    n_layers = model.config.num_hidden_layers
    store = "bfloat16" if provider.endswith("bf16_store") else None
    cfg = HarvestConfig(tokens=TOKENS, ctx=CTX, cache_dtype=store)
    ids = token_contexts(tok, n_tokens=TOKENS, ctx_len=CTX)

    if provider == "bare":
        cap = LayerCapture(model, [n_layers - 1])

        def run():
            with cap:
                for b in range(0, ids.shape[0], BATCH):
                    cap.run(ids[b:b + BATCH].to(DEVICE))
            sync(DEVICE)
    else:
        def run():
            with tempfile.TemporaryDirectory() as root:
                harvest(cfg, root=root, model=model, tokenizer=tok, device=DEVICE,
                        batch_size=BATCH, progress=False)
            sync(DEVICE)

    benchmark.pedantic(run, warmup_rounds=1, rounds=3)
    record(benchmark, f"harvest {TOKENS} tokens, {n_layers} layers", provider)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to report
        return
    t = benchmark.stats.stats.median
    params = sum(p.numel() for p in find_blocks(model).parameters())  # blocks 0..L-1
    stored = TOKENS * n_layers * model.config.hidden_size * (2 if store else 4)
    benchmark.extra_info.update(
        tokens=TOKENS, ctx=CTX, layers=n_layers, dtype="float32", device=device_name(),
        scale=scale(), tokens_per_s=TOKENS / t, flops=2 * params * TOKENS,
        flop_per_s=2 * params * TOKENS / t,
        gb_per_s_stored=None if provider == "bare" else stored / t / 1e9,
        peak_memory_mb=peak_memory_mb(run))
