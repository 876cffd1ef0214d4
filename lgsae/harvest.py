"""Harvest the residual stream of every requested layer in one forward pass, into a disk cache.

Layer l is the output of block l (HF `hidden_states[l + 1]`; for the model's last block HF applies
the final norm to `hidden_states[-1]`, while we keep the raw residual stream, as TransformerLens'
`resid_post` does). The forward stops right after the last requested block: later blocks and the LM
head never run.

Cache layout (`<LGSAE_CACHE>/activations/<key>/`, key = hash of the settings):
    manifest.json                      settings, shard list with sha256 per file, per-layer scale
    shard_00000/L003.safetensors       [tokens, D] activations of layer 3 in that shard
    shard_00000/tokens.safetensors     [contexts, ctx_len] token ids
    shard_00000/stats.safetensors      per-layer Σx [L, D] and Σ‖x‖ [L] (fp64), for centring/scales
Every file is written into a temporary folder that is renamed into place, and the manifest is
rewritten atomically after each shard, so a killed harvest resumes at the first missing shard and a
finished one is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from lgsae.data import token_contexts
from lgsae.models import cache_dir, load_model, load_tokenizer

MANIFEST = "manifest.json"
_FORMAT = 2  # 2: statistics exclude the attention-sink position
# The first position of every context is the model's attention sink: its residual stream has up to
# 100x the norm of other tokens (SmolLM2 layer 15: 24,600 vs 175), so it would dominate means,
# scales, FVU and the SAE loss. It is stored, but statistics, training and FVU skip it, and the
# evaluation splices reconstructions at the other positions only (like excluding BOS elsewhere).
SINK_POSITIONS = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _StopForward(Exception):
    """Raised by the hook on the last requested block to end the forward there."""


class CorruptCacheError(RuntimeError):
    """A cache file is missing or its checksum does not match the manifest."""


def find_blocks(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: the ModuleList with num_hidden_layers entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and n is not None and len(module) == n:
            return module
    raise ValueError(
        f"{type(model).__name__} has no list of {n} transformer blocks (an nn.ModuleList of "
        "config.num_hidden_layers), so it has no residual-stream hidden states to harvest; "
        "pass a decoder-only causal LM (Llama, GPT-NeoX, GPT-2, Gemma, ...)")


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """Sorted, distinct, in-range block indices (all blocks when None)."""
    if layers is None:
        return list(range(n_layers))
    layers = sorted({int(v) for v in layers})
    bad = [v for v in layers if not 0 <= v < n_layers]
    if bad or not layers:
        raise ValueError(f"unknown layer(s) {bad or layers}: this model has blocks "
                         f"0..{n_layers - 1}")
    return layers


class LayerCapture:
    """Context manager: hooks that copy block outputs of `layers` and stop after the last one."""

    def __init__(self, model, layers: Sequence[int]):
        self.model, self.blocks, self.layers = model, find_blocks(model), list(layers)
        self.out: dict[int, torch.Tensor] = {}
        self.handles = []

    def _hook(self, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            self.out[layer] = h.detach()
            if layer == self.layers[-1]:
                raise _StopForward

        return hook

    def __enter__(self):
        self.handles = [self.blocks[v].register_forward_hook(self._hook(v)) for v in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """{layer: [B, T, D]} for one batch of token ids."""
        self.out = {}
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        return self.out


@dataclass
class HarvestConfig:
    """What to harvest; every field is part of the cache key."""

    model: str | None = None  # HF name or local path; None: the offline default
    dataset: str | None = None  # HF dataset, local file or None: the offline default text
    text_column: str = "text"
    tokens: int = 20_480  # tokens to harvest (rounded down to whole contexts)
    ctx: int = 256  # context length
    layers: list[int] | None = None  # 0-based blocks; None: all
    dtype: str = "float32"  # model compute dtype
    cache_dtype: str | None = None  # stored dtype; None: same as dtype
    seed: int = 0  # document order of the text
    skip_contexts: int = 0  # start this many contexts into the token stream
    extra: dict = field(default_factory=dict)  # anything else the caller wants in the key

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "format": _FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class ActivationCache:
    """Read side of a finished harvest: per-layer shards, scales, per-layer means."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not an lgsae activation cache")
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise CorruptCacheError(f"{self.root} is an unfinished harvest: run harvest() with "
                                    "the same settings to resume it")

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    @property
    def d_model(self) -> int:
        return self.manifest["d_model"]

    @property
    def n_stat_tokens(self) -> int:
        """Tokens behind the statistics and training: all but the sink position of each context."""
        return self.n_tokens - (self.n_tokens // self.manifest["ctx_len"]) * SINK_POSITIONS

    @property
    def harvest_seconds(self) -> float:
        """Wall-clock seconds the harvest took when it was computed (0 if unrecorded)."""
        return float(sum(self.manifest.get("seconds", [])))

    @property
    def scales(self) -> dict[int, float]:
        """Per-layer factor that brings activations to unit mean norm: 1 / E‖x‖."""
        return {v: 1.0 / n for v, n in zip(self.layers, self.manifest["mean_norm"])}

    def _load(self, shard: dict, name: str, verify: bool) -> dict[str, torch.Tensor]:
        path = self.root / shard["dir"] / name
        if not path.is_file():
            raise CorruptCacheError(f"{path} is missing; delete {self.root} and harvest again")
        if verify and _sha256(path) != shard["sha256"][name]:
            raise CorruptCacheError(f"{path} does not match its checksum in {MANIFEST} (corrupted "
                                    f"or changed after the harvest); delete {self.root} and "
                                    "harvest again")
        return load_file(path)

    def iter_shards(self, layers: Sequence[int] | None = None, verify: bool = True,
                    skip_sink: bool = False) -> Iterator[dict[int, torch.Tensor]]:
        """Yield {layer: [tokens, D]} one shard at a time (memory: one shard of those layers);
        with `skip_sink`, without the first SINK_POSITIONS positions of each context."""
        layers = self.layers if layers is None else list(layers)
        missing = [v for v in layers if v not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} are not in this cache (it has {self.layers})")
        ctx = self.manifest["ctx_len"]
        for shard in self.manifest["shards"]:
            out = {v: self._load(shard, f"L{v:03d}.safetensors", verify)["x"] for v in layers}
            if skip_sink:
                keep = _kept_rows(next(iter(out.values())).shape[0], ctx)
                out = {v: x[keep] for v, x in out.items()}
            yield out

    def means(self) -> torch.Tensor:
        """[L, D] fp64 per-layer mean activation over the harvested tokens (sink excluded)."""
        total = sum(self._load(s, "stats.safetensors", True)["sum"] for s in
                    self.manifest["shards"])
        return total / self.n_stat_tokens

    def tokens(self) -> torch.Tensor:
        """[contexts, ctx] token ids of the harvest, in order."""
        return torch.cat([self._load(s, "tokens.safetensors", True)["ids"]
                          for s in self.manifest["shards"]])


def _kept_rows(n_rows: int, ctx: int) -> torch.Tensor:
    return (torch.arange(n_rows) % ctx) >= SINK_POSITIONS


def _shard_contexts(n_layers: int, d: int, ctx: int, itemsize: int, budget: int = 256 << 20
                    ) -> int:
    """Contexts per shard so that one shard of all layers stays under `budget` bytes in RAM."""
    return max(1, budget // (n_layers * d * ctx * itemsize))


def harvest(cfg: HarvestConfig, *, device: str | torch.device = "cpu", batch_size: int = 8,
            root: str | os.PathLike | None = None, model=None, tokenizer=None,
            progress: bool = True, shard_contexts: int | None = None) -> ActivationCache:
    """Run (or resume, or reuse) the harvest that `cfg` describes; returns the finished cache.

    `model`/`tokenizer` may be passed already loaded (they must be what cfg.model names).
    """
    root = Path(root) if root is not None else cache_dir() / "activations" / cfg.key()
    dtype = _DTYPES[cfg.dtype]
    store = _DTYPES[cfg.cache_dtype or cfg.dtype]
    if (root / MANIFEST).is_file():
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("complete"):
            return ActivationCache(root)
        if manifest["config"] != asdict(cfg):
            raise ValueError(f"{root} holds a harvest with other settings; pass another root")
    else:
        manifest = None
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    model = model or load_model(cfg.model, dtype=dtype, device=device)
    n_blocks = model.config.num_hidden_layers
    layers = check_layers(cfg.layers, n_blocks)
    contexts = token_contexts(tokenizer, cfg.dataset, n_tokens=cfg.tokens, ctx_len=cfg.ctx,
                              text_column=cfg.text_column, seed=cfg.seed,
                              skip_contexts=cfg.skip_contexts)
    d = model.config.hidden_size
    per = shard_contexts or _shard_contexts(len(layers), d, cfg.ctx, store.itemsize)
    if manifest is None:
        root.mkdir(parents=True, exist_ok=True)
        manifest = {"format": _FORMAT, "config": asdict(cfg), "model": cfg.model or "default",
                    "text": cfg.dataset or "default", "ctx_len": cfg.ctx, "dtype": cfg.dtype,
                    "cache_dtype": str(store).removeprefix("torch."), "layers": layers,
                    "d_model": d, "n_tokens": contexts.numel(), "shard_contexts": per,
                    "shards": [], "complete": False}
        _write_json_atomic(root / MANIFEST, manifest)
    per = manifest["shard_contexts"]
    n_shards = -(-contexts.shape[0] // per)
    bar = tqdm(total=contexts.numel(), initial=len(manifest["shards"]) * per * cfg.ctx,
               unit="tok", unit_scale=True, desc="harvest", disable=not progress)
    with LayerCapture(model, layers) as cap:
        for s in range(len(manifest["shards"]), n_shards):
            ids = contexts[s * per:(s + 1) * per]
            t0 = time.perf_counter()
            acts = _run_shard(cap, ids, layers, batch_size, device, store)
            manifest["shards"].append(_write_shard(root, s, ids, acts, layers, s * per, cfg.ctx))
            manifest.setdefault("seconds", []).append(time.perf_counter() - t0)
            _write_json_atomic(root / MANIFEST, manifest)
            bar.update(ids.numel())
            bar.set_postfix(tok_per_s=f"{ids.numel() / (time.perf_counter() - t0):.0f}")
    bar.close()
    norms = torch.zeros(len(layers), dtype=torch.float64)
    for shard in manifest["shards"]:
        path = root / shard["dir"] / "stats.safetensors"
        norms += load_file(path)["norm_sum"]
    stat_tokens = manifest["n_tokens"] - (manifest["n_tokens"] // cfg.ctx) * SINK_POSITIONS
    manifest["mean_norm"] = (norms / stat_tokens).tolist()
    manifest["complete"] = True
    _write_json_atomic(root / MANIFEST, manifest)
    return ActivationCache(root)


def _run_shard(cap: LayerCapture, ids: torch.Tensor, layers: list[int], batch_size: int,
               device, store: torch.dtype) -> dict[int, torch.Tensor]:
    parts: dict[int, list[torch.Tensor]] = {v: [] for v in layers}
    for b in range(0, ids.shape[0], batch_size):
        out = cap.run(ids[b:b + batch_size].to(device))
        for v in layers:
            parts[v].append(out[v].reshape(-1, out[v].shape[-1]).to(store).cpu())
    return {v: torch.cat(p) for v, p in parts.items()}


def _write_shard(root: Path, s: int, ids: torch.Tensor, acts: dict[int, torch.Tensor],
                 layers: list[int], first_context: int, ctx: int) -> dict:
    sink = ~_kept_rows(ids.numel(), ctx)  # subtracting the few sink rows avoids copying the rest
    norm = [torch.linalg.vector_norm(acts[v].float(), dim=1) for v in layers]
    stats = {"sum": torch.stack([acts[v].sum(0, dtype=torch.float64)
                                 - acts[v][sink].sum(0, dtype=torch.float64) for v in layers]),
             "norm_sum": torch.stack([n.sum(dtype=torch.float64) - n[sink].sum(dtype=torch.float64)
                                      for n in norm])}
    # any NaN/inf in a layer makes its norm sum non-finite: the check costs no extra pass
    finite = torch.isfinite(torch.stack([n.sum() for n in norm])).tolist()
    for v, ok in zip(layers, finite):
        if not ok:
            raise FloatingPointError(
                f"non-finite activations at layer {v} (contexts {first_context}.."
                f"{first_context + ids.shape[0] - 1}); try --dtype float32 or check the model")
    name = f"shard_{s:05d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        files = {"tokens.safetensors": {"ids": ids.contiguous()}, "stats.safetensors": stats}
        files.update({f"L{v:03d}.safetensors": {"x": acts[v].contiguous()} for v in layers})
        sums = {}
        for fname, tensors in files.items():
            blob = save(tensors)  # hash the bytes we write instead of reading the file back
            (tmp / fname).write_bytes(blob)
            sums[fname] = hashlib.sha256(blob).hexdigest()
        shutil.rmtree(root / name, ignore_errors=True)  # a stale folder from a killed run
        os.replace(tmp, root / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": name, "n_contexts": ids.shape[0], "sha256": sums}
