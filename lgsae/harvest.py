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
    shard_00000/shard.json             that shard's record: contexts, sha256 per file, seconds
Each shard is written into a temporary folder that is renamed into place with its record; the
manifest is written at the start and once more, complete, at the end. A killed harvest resumes at
the first missing shard (tokenising up to it, never re-running the model on finished shards), a
finished one is reused as is. The token stream is read lazily, one shard of contexts at a time.
This is the optional cache (`--from-cache`): training streams from the model by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from lgsae.capture import (  # noqa: F401  (re-exported: older imports)
    DTYPES,
    SINK_POSITIONS,
    LayerCapture,
    check_layers,
    drop_sink,
    find_blocks,
    forward_layers,
)
from lgsae.data import iter_contexts
from lgsae.io import write_json
from lgsae.models import cache_dir, load_model, load_tokenizer

MANIFEST = "manifest.json"
_FORMAT = 2  # 2: statistics exclude the attention-sink position


class CorruptCacheError(RuntimeError):
    """A cache file is missing or its checksum does not match the manifest."""


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
                    skip_sink: bool = False, start: int = 0
                    ) -> Iterator[dict[int, torch.Tensor]]:
        """Yield {layer: [tokens, D]} one shard at a time (memory: one shard of those layers);
        with `skip_sink`, without the first SINK_POSITIONS positions of each context."""
        layers = self.layers if layers is None else list(layers)
        missing = [v for v in layers if v not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} are not in this cache (it has {self.layers})")
        ctx = self.manifest["ctx_len"]
        for shard in self.manifest["shards"][start:]:
            out = {v: self._load(shard, f"L{v:03d}.safetensors", verify)["x"] for v in layers}
            if skip_sink:  # the stream's own sink removal: the same rows, the same order
                out = {v: drop_sink(x, ctx) for v, x in out.items()}
            yield out

    def means(self) -> torch.Tensor:
        """[L, D] fp64 per-layer mean activation over the harvested tokens (sink excluded)."""
        total = sum(self._load(s, "stats.safetensors", True)["sum"] for s in
                    self.manifest["shards"])
        return total / self.n_stat_tokens

    def tokens(self) -> torch.Tensor:
        """[contexts, ctx] token ids of the harvest, in order."""
        return torch.cat(list(self.iter_tokens()))

    def iter_tokens(self, start: int = 0) -> Iterator[torch.Tensor]:
        """[shard contexts, ctx] token ids, one shard at a time from shard `start`."""
        for s in self.manifest["shards"][start:]:
            yield self._load(s, "tokens.safetensors", True)["ids"]


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
    dtype = DTYPES[cfg.dtype]
    store = DTYPES[cfg.cache_dtype or cfg.dtype]
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
    want = cfg.tokens // cfg.ctx
    if want < 1:
        raise ValueError(f"tokens={cfg.tokens} is fewer than one context of {cfg.ctx}")
    d = model.config.hidden_size
    per = shard_contexts or _shard_contexts(len(layers), d, cfg.ctx, store.itemsize)
    if manifest is None:
        root.mkdir(parents=True, exist_ok=True)
        manifest = {"format": _FORMAT, "config": asdict(cfg), "model": cfg.model or "default",
                    "text": cfg.dataset or "default", "ctx_len": cfg.ctx, "dtype": cfg.dtype,
                    "cache_dtype": str(store).removeprefix("torch."), "layers": layers,
                    "d_model": d, "shard_contexts": per, "complete": False}
        write_json(root / MANIFEST, manifest)
    per = manifest["shard_contexts"]
    # each finished shard carries its own record (shard.json, renamed into place with the shard),
    # so progress costs one small file per shard instead of rewriting a growing manifest
    shards = _finished_shards(root)
    n_shards = -(-want // per)
    done = sum(sh["n_contexts"] for sh in shards)
    contexts = iter_contexts(tokenizer, cfg.dataset, ctx_len=cfg.ctx, text_column=cfg.text_column,
                             seed=cfg.seed, start=cfg.skip_contexts + done)
    bar = tqdm(total=want * cfg.ctx, initial=done * cfg.ctx, unit="tok", unit_scale=True,
               desc="harvest", disable=not progress)
    with LayerCapture(model, layers) as cap:
        for s in range(len(shards), n_shards):
            rows = [row for _, row in zip(range(min(per, want - done)), contexts)]
            if not rows:
                break
            ids = torch.stack(rows)
            t0 = time.perf_counter()
            acts = forward_layers(cap, ids, batch_size, device, store)
            seconds = time.perf_counter() - t0
            shards.append(_write_shard(root, s, ids, acts, layers, done, cfg.ctx, seconds))
            done += ids.shape[0]
            bar.update(ids.numel())
            bar.set_postfix(tok_per_s=f"{ids.numel() / seconds:.0f}")
            if len(rows) < per:
                break
    bar.close()
    if done == 0:
        raise ValueError(f"text source {cfg.dataset or 'default'!r} has fewer than one context "
                         f"of {cfg.ctx} tokens after skipping {cfg.skip_contexts} contexts")
    if done < want:
        warnings.warn(f"text source {cfg.dataset or 'default'!r} ran out: {done} contexts of "
                      f"{cfg.ctx} tokens instead of {want}", stacklevel=2)
    norms = torch.zeros(len(layers), dtype=torch.float64)
    for shard in shards:
        norms += load_file(root / shard["dir"] / "stats.safetensors")["norm_sum"]
    n_tokens = done * cfg.ctx
    stat_tokens = n_tokens - done * SINK_POSITIONS
    manifest.update(shards=shards, n_tokens=n_tokens, seconds=[sh["seconds"] for sh in shards],
                    mean_norm=(norms / stat_tokens).tolist(), complete=True)
    write_json(root / MANIFEST, manifest)
    return ActivationCache(root)


def _finished_shards(root: Path) -> list[dict]:
    """Records of the shards already on disk, in order (a harvest resumes after the last)."""
    out = []
    while (root / f"shard_{len(out):05d}" / "shard.json").is_file():
        out.append(json.loads((root / f"shard_{len(out):05d}" / "shard.json").read_text()))
    return out


def _write_shard(root: Path, s: int, ids: torch.Tensor, acts: dict[int, torch.Tensor],
                 layers: list[int], first_context: int, ctx: int, seconds: float) -> dict:
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
                f"{first_context + ids.shape[0] - 1}); try --model-dtype float32 or check the "
                "model")
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
        record = {"dir": name, "n_contexts": ids.shape[0], "sha256": sums, "seconds": seconds}
        (tmp / "shard.json").write_text(json.dumps(record))
        shutil.rmtree(root / name, ignore_errors=True)  # a stale folder from a killed run
        os.replace(tmp, root / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
