import pytest
import torch


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    return 0


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_close(actual, expected, *, atol=0.0, rtol=0.0, name="tensor"):
    """torch.testing-style check that names the first mismatching index and both values."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.double(), expected.double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatched, first at {first}: "
            f"{a[first].item()!r} vs {e[first].item()!r}; max abs err {(a - e).abs().max():.3g}"
        )


class CharTokenizer:
    """Stand-in tokenizer for tiny models: one id per character (1..vocab-1), EOS = 0."""

    eos_token_id = 0

    def __init__(self, vocab: int = 1 << 20):
        self.vocab = vocab

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[1 + ord(c) % (self.vocab - 1) for c in t] for t in texts]}


TINY = {  # tiny random-initialised configs of the architectures lgsae must handle
    "llama": dict(intermediate_size=64),
    "gpt_neox": dict(intermediate_size=64),
    "gpt2": dict(bos_token_id=0, eos_token_id=0),
}


def tiny_model(arch: str = "llama", n_layers: int = 4, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, vocab_size=61, hidden_size=32, num_hidden_layers=n_layers,
                               num_attention_heads=4, **TINY[arch])
    return AutoModelForCausalLM.from_config(cfg).eval()


WORDS = ["alpha", "beta", "gamma", "delta", "layer", "group", "token", "sparse", "model"]


def write_texts(path, n_docs: int = 40):
    import json
    import random

    rng = random.Random(0)
    words = WORDS
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n")
    return str(path)


def tiny_model_dir(path, arch: str = "llama", n_layers: int = 4, bos: bool = False):
    """A saved tiny model with a word-level tokenizer over WORDS: loadable by name like a real
    HF folder (lgsae.models.load_model / load_tokenizer). bos: the tokenizer puts <s> (id
    len(WORDS) + 2) before every document, as Llama-3's and Gemma's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    extra = {}
    if bos:
        vocab["<s>"] = len(vocab)
        extra["bos_token"] = "<s>"
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]",
                                  **extra)
    tiny_model(arch, n_layers).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
