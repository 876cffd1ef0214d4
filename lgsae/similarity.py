"""Mean angular distance between layers: d(i, j) = E_token[arccos(cos(x_i, x_j)) / π].

Streamed over activations one shard at a time (`cache`: lgsae.sources.InMemoryActivations, the
statistics prefix, or a finished lgsae.harvest.ActivationCache: anything with layers, means() and
iter_shards()); within a shard, tokens go through in
chunks as a batched [chunk, L, D] × [chunk, D, L] product, so there is no Python loop over tokens
or layer pairs. With `centre=True` (the default, as in the authors' code) each layer's mean
activation over the whole harvest is subtracted first: without it the residual stream's large
shared mean direction makes every pair of layers look alike.
"""

from __future__ import annotations

import math

import torch


def angular_distance_chunk(x: torch.Tensor) -> torch.Tensor:
    """x: [T, L, D] (one row of L layer activations per token) -> [L, L] sum over tokens of
    arccos(cos)/π, in fp64."""
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    cos = torch.bmm(xn, xn.transpose(1, 2)).clamp_(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).sum(0)


def layer_distances(cache, layers: list[int] | None = None, *,
                    centre: bool = True, chunk: int = 1024) -> torch.Tensor:
    """[L, L] mean angular distance between the cache's layers (or `layers`), fp64, symmetric,
    zero diagonal."""
    layers = cache.layers if layers is None else list(layers)
    means = None
    if centre:
        all_means = cache.means()
        means = all_means[[cache.layers.index(v) for v in layers]].unsqueeze(0)  # [1, L, D]
    total = torch.zeros(len(layers), len(layers), dtype=torch.float64)
    count = 0
    for shard in cache.iter_shards(layers, skip_sink=True):
        x = torch.stack([shard[v] for v in layers], dim=1)  # [T, L, D]
        for s in range(0, x.shape[0], chunk):
            xc = x[s:s + chunk].double()
            if means is not None:
                xc = xc - means
            total += angular_distance_chunk(xc)
            count += xc.shape[0]
    dist = total / count
    dist.fill_diagonal_(0.0)
    return (dist + dist.T) / 2  # exact symmetry, for scipy's squareform
