"""Harvest throughput vs a bare forward of the same model up to the last harvested layer.
Target (issue 4): harvest >= 0.9x the bare forward's tokens/s. Run:
pytest bench/bench_harvest.py --benchmark-only

`bare` runs the same batches through the model and stops after the last block (the hook raises),
keeping nothing; `harvest` is `lgsae.harvest.harvest` into a fresh folder: tokenising, capturing
every layer, finiteness checks, statistics, safetensors shards, checksums and the manifest, with
activations stored in the model's dtype (fp32); `harvest_bf16_store` stores them as bf16.
"""

import os
import tempfile

import pytest
import torch
from conftest import device_name, sync

from lgsae.data import token_contexts
from lgsae.harvest import HarvestConfig, LayerCapture, harvest
from lgsae.models import load_model, load_tokenizer

TOKENS = int(os.environ.get("LGSAE_BENCH_HARVEST_TOKENS", 2048))
CTX, BATCH = 256, 8
DEVICE = torch.device(os.environ.get("LGSAE_BENCH_DEVICE", "cuda" if torch.cuda.is_available()
                                     else "cpu"))


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
    benchmark.extra_info.update(tokens=TOKENS, ctx=CTX, layers=n_layers, device=device_name(DEVICE),
                                tokens_per_s=TOKENS / benchmark.stats.stats.median)
