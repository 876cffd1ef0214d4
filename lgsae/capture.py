"""Capture the residual stream after chosen blocks in one forward pass that stops after the last.

Layer l is the output of block l (HF `hidden_states[l + 1]`; for the model's last block HF applies
the final norm to `hidden_states[-1]`, while we keep the raw residual stream, as TransformerLens'
`resid_post` does). The forward stops right after the last requested block: later blocks and the LM
head never run. `forward_layers` is the one function that turns token ids into stored activations,
for the stream, the disk cache and the held-out set alike, so all three see the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The first position of every context is the model's attention sink: its residual stream has up to
# 100x the norm of other tokens (SmolLM2 layer 15: 24,600 vs 175), so it would dominate means,
# scales, FVU and the SAE loss. It is stored in the cache, but statistics, training and FVU skip it
# (the stream drops it at once), and the evaluation splices reconstructions at the other positions.
SINK_POSITIONS = 1
# Special tokens (BOS/EOS/pad and the tokenizer's other special ids) inside packed contexts carry
# norms like the sink's (SmolLM2's document separators); their positions are left out the same way.
KEEP = "keep"  # key of a chunk's or batch's [rows] bool mask of kept positions, beside the layers
OUTLIER_FACTOR = 50.0  # a kept position whose norm exceeds this x the layer median is reported
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _StopForward(Exception):
    """Raised by the hook on the last requested block to end the forward there."""


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


def block_paths(model) -> tuple[str, str]:
    """The module path of the block list, from the model and from its base model (sparsify's
    hookpoints): ("model.layers", "layers") for Llama, ("transformer.h", "h") for GPT-2,
    ("gpt_neox.layers", "layers") for GPT-NeoX; block l's output is "<path>.<l>"."""
    blocks = find_blocks(model)
    full = next(n for n, m in model.named_modules() if m is blocks)
    base_model = getattr(model, "base_model", model)
    base = next((n for n, m in base_model.named_modules() if m is blocks), full)
    return full, base


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


@torch.no_grad()
def forward_layers(cap: LayerCapture, ids: torch.Tensor, batch_size: int, device,
                   store: torch.dtype) -> dict[int, torch.Tensor]:
    """{layer: [contexts * ctx, D]} in `store` dtype on the CPU, forwarding `batch_size` contexts
    at a time (the batching is part of the bits: callers that must agree use the same)."""
    parts: dict[int, list[torch.Tensor]] = {v: [] for v in cap.layers}
    for b in range(0, ids.shape[0], batch_size):
        out = cap.run(ids[b:b + batch_size].to(device))
        for v in cap.layers:
            parts[v].append(out[v].reshape(-1, out[v].shape[-1]).to(store).cpu())
    return {v: torch.cat(p) for v, p in parts.items()}


def special_ids(tokenizer) -> list[int]:
    """Ids whose positions are left out like the sink: BOS, EOS and pad, and the tokenizer's other
    special tokens (all_special_ids) except a separate unknown token (ordinary text maps to it;
    where unk is also BOS/EOS, as GPT-2's and Pythia's <|endoftext|>, it stays out)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        i = getattr(tokenizer, name, None)
        if isinstance(i, int):
            ids.add(i)
    return sorted(ids)


def kept_positions(ids: torch.Tensor, special: Sequence[int]) -> torch.Tensor:
    """[contexts, ctx] bool: the positions statistics, training and FVU use (not the sink, not a
    special token)."""
    keep = ~torch.isin(ids, torch.tensor(list(special), dtype=ids.dtype, device=ids.device)) \
        if special else torch.ones_like(ids, dtype=torch.bool)
    keep[:, :SINK_POSITIONS] = False
    return keep


def kept_rows(ids: torch.Tensor, special: Sequence[int]) -> torch.Tensor:
    """[contexts * (ctx - SINK_POSITIONS)] bool over the rows `drop_sink` leaves."""
    return kept_positions(ids, special)[:, SINK_POSITIONS:].reshape(-1)


def drop_sink(x: torch.Tensor, ctx: int) -> torch.Tensor:
    """Rows of a [contexts * ctx, D] tensor without each context's first SINK_POSITIONS."""
    return x.view(-1, ctx, x.shape[-1])[:, SINK_POSITIONS:].reshape(-1, x.shape[-1])
