"""`GroupSAE`: one TopK sparse autoencoder serving one or more layers of a model (DESIGN §1).

Each served layer has an input scale (the factor that brings its activations to unit mean norm):
`forward` multiplies raw activations by it on the way in and divides the reconstruction by it on
the way out, so callers always pass and receive raw activations. Latent activations, FVU and AuxK
live in the scaled space, where every layer of a group looks alike.

Per-member-layer parameters (`layer_params`, issue 19; a group SAE only, a one-layer SAE has none):
- "b_dec": an offset Δb_dec[l] added to b_dec for member layer l, in the input centring and in the
  output (started at each layer's own batch mean by `init_b_dec_`);
- "b_enc": an offset Δb_enc[l] added to the encoder bias before the top-k. It is computed as a
  learned layer embedding: the encoder input gets a one-hot of the layer appended and W_enc the
  columns Δb_encᵀ, so the fused encode kernels serve it unchanged;
- "scale": a learned factor g_l = exp(layer_log_gain[l]) (starting at 1, always > 0, applied in
  the parameters' precision) on the encoder input, so the encoder sees
  g_l·s_l·x: a learned input scale started at the fixed one. The losses stay in the fixed-scale
  space (a scale learned on both sides would let the loss shrink the hardest layer's share).
With all three, z = TopK(ReLU(g_l·W_enc (s_l·x − b_dec − Δb_dec[l]) + b_enc + Δb_enc[l])) and
x̂ = (W_decᵀ z + b_dec + Δb_dec[l]) / s_l; per layer this is again a plain TopK SAE
(lgsae.export.fold).

On disk a GroupSAE is sparsify's layout (`cfg.json` + `sae.safetensors` holding `encoder.weight`,
`encoder.bias`, `W_dec`, `b_dec`), with the group fields as extra cfg keys that sparsify ignores
(with layer_params the folder also holds `layer_b_dec` [L, D], `layer_b_enc` [L, M] and
`layer_log_gain` [L], and only lgsae loads it; lgsae.export folds them into plain per-layer SAEs).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lgsae import ops, reference
from lgsae.io import write_folder

# sparsify's SparseCoderConfig fields, in its order; written so sparsify can load our folders.
_SPARSIFY_DEFAULTS = {
    "activation": "topk",
    "expansion_factor": 32,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 32,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
}
_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
LAYER_PARAMS = ("b_dec", "b_enc", "scale")  # per-member-layer options (module docstring)
_LAYER_TENSORS = {"b_dec": "layer_b_dec", "b_enc": "layer_b_enc", "scale": "layer_log_gain"}
FIRING_FILE = "firing.safetensors"  # training firing counts per (layer, latent), if recorded


class ForwardOutput(NamedTuple):
    recon: Tensor  # [..., D] reconstruction, in the raw (unscaled) space of the input
    top_acts: Tensor  # [..., K] activations of the chosen latents (scaled space)
    top_indices: Tensor  # [..., K] their ids
    fvu: Tensor  # scalar: ‖x − x̂‖² / ‖x − mean(x)‖², scaled space, fp32 (inf for 1 token)
    auxk_loss: Tensor  # scalar: AuxK loss (0 without a dead mask or dead latents), fp32


class GroupSAE(nn.Module):
    """TopK SAE: z = TopK(ReLU(W_enc (s·x − b_dec) + b_enc)), x̂ = (W_decᵀ z + b_dec) / s.

    d_in: model width D. k: latents active per token. num_latents: M (0: expansion_factor·D).
    layers: the 0-based block indices this SAE serves. scales: per-layer input factor s (default 1).
    model, hookpoints: provenance, saved with the weights. k_aux: AuxK latents (default D // 2).
    layer_params: per-member-layer parameters, a subset of LAYER_PARAMS (module docstring);
    ignored for a one-layer SAE.
    """

    def __init__(
        self,
        d_in: int,
        *,
        k: int = 32,
        num_latents: int = 0,
        expansion_factor: int = 16,
        layers: Sequence[int] = (0,),
        scales: Sequence[float] | None = None,
        model: str | None = None,
        hookpoints: Sequence[str] | None = None,
        k_aux: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        seed: int | None = None,
        compute_dtype: torch.dtype | None = None,
        encoder_norm: float = 1.0,
        layer_params: Sequence[str] = (),
    ):
        super().__init__()
        M = num_latents or expansion_factor * d_in
        layers = [layers] if isinstance(layers, numbers.Integral) else list(layers)
        _check(all(_is_int(v) for v in (d_in, k, M, *layers)) and
               (k_aux is None or _is_int(k_aux)),
               "d_in, k, num_latents, k_aux and layers must be integers")
        layers = [int(layer) for layer in layers]
        scales = [1.0] * len(layers) if scales is None else [float(s) for s in scales]
        _check(d_in >= 1, f"d_in must be >= 1, got {d_in}")
        _check(M >= 1, f"num_latents must be >= 1 (or expansion_factor >= 1), got {M}")
        _check(1 <= k <= M, f"k must be in [1, num_latents={M}], got {k}")
        _check(len(layers) >= 1 and len(set(layers)) == len(layers) and min(layers) >= 0,
               f"layers must be distinct block indices >= 0, got {layers}")
        _check(len(scales) == len(layers),
               f"scales needs one value per layer ({len(layers)}), got {len(scales)}")
        _check(all(s > 0 and s < float("inf") for s in scales),
               f"scales must be finite and > 0, got {scales}")
        _check(k_aux is None or k_aux >= 0, f"k_aux must be >= 0 (0 turns AuxK off), got {k_aux}")
        _check(compute_dtype is None or (isinstance(compute_dtype, torch.dtype) and
                                         compute_dtype.is_floating_point),
               f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")
        _check(isinstance(encoder_norm, numbers.Real) and 0 < encoder_norm < float("inf"),
               f"encoder_norm must be finite and > 0, got {encoder_norm!r}")
        layer_params = [layer_params] if isinstance(layer_params, str) else list(layer_params)
        _check(all(p in LAYER_PARAMS for p in layer_params),
               f"layer_params must be a subset of {LAYER_PARAMS}, got {layer_params}")
        self._compute_dtype = compute_dtype
        self.d_in, self.num_latents, self.k = d_in, M, k
        self.expansion_factor = M // d_in if M % d_in == 0 else M / d_in  # the true width
        self.k_aux = d_in // 2 if k_aux is None else k_aux
        self.layers, self.model_name, self._scale_values = layers, model, scales
        self.hookpoints = list(hookpoints) if hookpoints is not None else None

        # Decoder rows start as random unit vectors and the encoder as their copy (DESIGN §1),
        # scaled to `encoder_norm` (the trainer's default is below 1: README, Trainer defaults).
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W = torch.randn(M, d_in, generator=gen, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True)
        fk = dict(dtype=dtype, device=device)
        self.encoder = nn.Linear(d_in, M, **fk)
        with torch.no_grad():
            self.encoder.weight.copy_(W * encoder_norm)
            self.encoder.bias.zero_()
        self.W_dec = nn.Parameter(W.to(**fk))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **fk))
        # Not in the state dict (sparsify's loader is strict about tensor names): cfg.json has them.
        # per-member-layer offsets, all starting where the shared parameters are (a no-op)
        L = len(layers)
        self.layer_params = tuple(p for p in LAYER_PARAMS if p in layer_params) if L > 1 else ()
        if "b_dec" in self.layer_params:
            self.layer_b_dec = nn.Parameter(torch.zeros(L, d_in, **fk))
        if "b_enc" in self.layer_params:
            self.layer_b_enc = nn.Parameter(torch.zeros(L, M, **fk))
        if "scale" in self.layer_params:
            self.layer_log_gain = nn.Parameter(torch.zeros(L, **fk))
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32, device=device),
                             persistent=False)
        lut = torch.full((max(layers) + 1,), -1, dtype=torch.int64)
        lut[torch.tensor(layers)] = torch.arange(len(layers))
        self.register_buffer("_layer_pos", lut.to(device), persistent=False)
        self._lut_host = lut  # the same table on the host: layers given there stay there

    # ------------------------------------------------------------------ scales
    def scale_for(self, layer: int | Tensor | None, n: int) -> Tensor:
        """The input factor for `layer`: [1, 1] for one layer, [n, 1] for per-token layers."""
        return self._scale_at(self.layer_pos(layer, n))

    def layer_pos(self, layer: int | Tensor | None, n: int) -> int | Tensor:
        """Where `layer` is in self.layers: an int for one layer, an int64 [n] tensor on the
        SAE's device for per-token layers. Raises for a layer this SAE does not serve."""
        if layer is None:
            _check(len(self.layers) == 1,
                   f"this SAE serves layers {self.layers}: pass layer= "
                   "(an int or a per-token tensor)")
            return 0
        if isinstance(layer, (list, tuple)):
            layer = torch.as_tensor(layer)
        if isinstance(layer, Tensor):
            _check(not (layer.is_floating_point() or layer.is_complex() or
                        layer.dtype == torch.bool),
                   f"layer must hold integer block indices, got a {layer.dtype} tensor")
        elif not _is_int(layer):
            raise ValueError(f"layer must be an int block index or a per-token integer tensor, "
                             f"got {layer!r}")
        if isinstance(layer, Tensor) and layer.numel() != 1:
            layer = layer.reshape(-1)
            _check(layer.numel() == n, f"layer has {layer.numel()} entries for {n} tokens")
            # validated where the tensor lives: a CPU tensor (what the trainer passes) costs the
            # device no host sync; a device tensor is read back once
            lut = self._layer_pos if layer.device == self._layer_pos.device else \
                self._lut_host.to(layer.device)
            pos = lut[layer.clamp(0, lut.numel() - 1)]
            bad = (pos < 0) | (layer < 0) | (layer >= lut.numel())
            if bool(bad.any()):
                raise ValueError(f"layer {int(layer[bad][0])} is not served by this SAE "
                                 f"(layers {self.layers})")
            return pos.to(self.scales.device, non_blocking=True)
        layer = int(layer)
        _check(layer in self.layers,
               f"layer {layer} is not served by this SAE (layers {self.layers})")
        return self.layers.index(layer)

    def _scale_at(self, pos: int | Tensor) -> Tensor:
        return self.scales[pos].view(1, 1) if isinstance(pos, int) else \
            self.scales[pos].unsqueeze(1)

    def _layer_rows(self, name: str, pos: int | Tensor) -> Tensor:
        """Rows `pos` of a per-member-layer parameter, in the compute dtype: [1, ·] or [n, ·]."""
        t = getattr(self, name)[pos]
        return (t.unsqueeze(0) if isinstance(pos, int) else t).to(self.compute_dtype)

    def _out_bias(self, b_dec: Tensor, pos: int | Tensor) -> Tensor:
        """What the decoder adds to W_decᵀ z: b_dec (+ Δb_dec of each row's layer)."""
        return b_dec + self._layer_rows("layer_b_dec", pos) if "b_dec" in self.layer_params \
            else b_dec

    def _encoder_args(self, xs: Tensor, pos: int | Tensor, W_enc: Tensor, b_enc: Tensor,
                      b_dec: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x, W_enc, b_enc, b_dec) for ops.topk_encode, which computes W_enc (x − b_dec) + b_enc.
        Plain: the SAE's own. With layer_params the centring and the gain are applied here and
        Δb_enc rides in the GEMM as a layer embedding (a one-hot appended to x, Δb_encᵀ to W_enc,
        padded to a multiple of 16 columns), so the kernels run unchanged."""
        lp = self.layer_params
        if not lp:
            return xs, W_enc, b_enc, b_dec
        x = xs - self._layer_rows("layer_b_dec", pos) if "b_dec" in lp else xs
        if "scale" in lp:  # g·(x − b_dec): the centring moves out of the kernel; the gain in
            # the parameters' precision (a bf16 gain would move in steps of ~0.4 %)
            gain = self.layer_log_gain[pos].exp().reshape(-1, 1)
            x = ((x - b_dec) * gain).to(self.compute_dtype)
            b_dec = torch.zeros_like(b_dec)
        if "b_enc" in lp:
            L, D = len(self.layers), self.d_in
            pad = -(D + L) % 16
            onehot = torch.zeros(x.shape[0], L + pad, dtype=x.dtype, device=x.device)
            if isinstance(pos, int):
                onehot[:, pos] = 1
            else:
                onehot.scatter_(1, pos.view(-1, 1), 1)
            x = torch.cat([x, onehot], 1)
            emb = self.layer_b_enc.to(W_enc.dtype).t()  # [M, L]
            W_enc = torch.cat([W_enc, emb, W_enc.new_zeros(W_enc.shape[0], pad)], 1)
            b_dec = torch.cat([b_dec, b_dec.new_zeros(L + pad)])
        return x, W_enc, b_enc, b_dec

    def _flat(self, x: Tensor) -> Tensor:
        _check(x.shape[-1] == self.d_in,
               f"input width {x.shape[-1]} does not match the SAE's d_in={self.d_in}")
        return x.reshape(-1, self.d_in)

    # ------------------------------------------------------------------ core
    def forward(self, x: Tensor, layer: int | Tensor | None = None,
                dead_mask: Tensor | None = None, total_variance: Tensor | None = None
                ) -> ForwardOutput:
        """x: [..., D] raw activations of `layer`. dead_mask: [M] bool, enables AuxK.
        total_variance: the FVU denominator Σ‖x − mean‖² (scaled space, fp32) when x is one
        rank's part of a larger batch (data parallel); default: x's own."""
        lead = x.shape[:-1]
        xf = self._flat(x)
        if dead_mask is not None:
            _check(dead_mask.dtype == torch.bool and dead_mask.shape == (self.num_latents,),
                   f"dead_mask must be a bool tensor of shape [{self.num_latents}] (one flag per "
                   f"latent), got {dead_mask.dtype} {tuple(dead_mask.shape)}")
        pos = self.layer_pos(layer, xf.shape[0])
        s = self._scale_at(pos)
        xs = (xf * s).to(self.compute_dtype)
        acc = torch.promote_types(self.compute_dtype, torch.float32)  # losses in fp32 (or fp64)
        xs32 = xs.to(acc)
        total_var = (xs32 - xs32.mean(0)).pow(2).sum() if total_variance is None \
            else total_variance.to(acc)
        W_enc, b_enc, W_dec, b_dec = self._weights()
        top_acts, top_idx, aux_acts, aux_idx = ops.topk_encode(
            *self._encoder_args(xs, pos, W_enc, b_enc, b_dec), self.k, dead_mask,
            self.k_aux if dead_mask is not None else 0,
        )
        recon_s = ops.sparse_decode(top_idx, top_acts, W_dec, self.compute_dtype) + \
            self._out_bias(b_dec, pos)
        resid = xs32 - recon_s.to(acc)  # what the chosen latents failed to explain
        fvu = resid.pow(2).sum() / total_var
        if aux_idx.shape[1] > 0:
            # AuxK (Gao et al. 2024): the top dead latents reconstruct the residual; weight shrinks
            # when fewer latents are dead than k_aux.
            if reference.same_on_every_row(aux_idx):  # every dead latent on every row:
                # one GEMM over their decoder rows instead of an N·kk-row gather
                e_hat = (aux_acts @ W_dec[aux_idx[0]].to(self.compute_dtype)).to(acc)
            else:
                e_hat = ops.sparse_decode(aux_idx, aux_acts, W_dec, self.compute_dtype).to(acc)
            # on the device (no host read): min(#dead / k_aux, 1), in the loss dtype
            weight = (dead_mask.sum().double() / self.k_aux).clamp(max=1.0).to(
                resid.device, acc, non_blocking=True)
            auxk = weight * (e_hat - resid.detach()).pow(2).sum() / total_var
        else:
            auxk = fvu.new_zeros(())
        recon = (recon_s / s).to(x.dtype)
        return ForwardOutput(
            recon.view(*lead, self.d_in), top_acts.view(*lead, self.k),
            top_idx.view(*lead, self.k), fvu, auxk,
        )

    def loss_input(self, x: Tensor, layer: int | Tensor | None = None) -> Tensor:
        """x [..., D] as `forward` sees it in its losses: scaled, compute dtype, then fp32."""
        xf = self._flat(x)
        xs = (xf * self.scale_for(layer, xf.shape[0])).to(self.compute_dtype)
        return xs.to(torch.promote_types(self.compute_dtype, torch.float32))

    def encode(self, x: Tensor, layer: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [..., D] raw activations -> (top_acts [..., K], top_indices [..., K])."""
        lead = x.shape[:-1]
        xf = self._flat(x)
        pos = self.layer_pos(layer, xf.shape[0])
        xs = (xf * self._scale_at(pos)).to(self.compute_dtype)
        W_enc, b_enc, _, b_dec = self._weights()
        acts, idx, _, _ = ops.topk_encode(*self._encoder_args(xs, pos, W_enc, b_enc, b_dec),
                                          self.k)
        return acts.view(*lead, self.k), idx.view(*lead, self.k)

    def decode(self, top_acts: Tensor, top_indices: Tensor,
               layer: int | Tensor | None = None) -> Tensor:
        """(top_acts, top_indices) [..., K] -> [..., D] reconstruction, raw space of `layer`,
        in the SAE's compute dtype (`forward` returns the input's dtype instead)."""
        _check(top_acts.shape == top_indices.shape,
               f"top_acts {tuple(top_acts.shape)} and top_indices {tuple(top_indices.shape)} "
               "must have the same shape [..., K]")
        lead, K = top_acts.shape[:-1], top_acts.shape[-1]
        acts = top_acts.reshape(-1, K).to(self.compute_dtype)
        idx = top_indices.reshape(-1, K)
        pos = self.layer_pos(layer, acts.shape[0])
        _, _, W_dec, b_dec = self._weights()
        recon = (ops.sparse_decode(idx, acts, W_dec, self.compute_dtype) +
                 self._out_bias(b_dec, pos)) / \
            self._scale_at(pos)
        return recon.to(self.compute_dtype).view(*lead, self.d_in)

    def encode_dense(self, x: Tensor, layer: int | Tensor | None = None) -> Tensor:
        """x: [..., D] -> [..., M] latent vector with K non-zeros per token."""
        acts, idx = self.encode(x, layer)
        return acts.new_zeros(*acts.shape[:-1], self.num_latents).scatter_(-1, idx, acts)

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Before the optimizer step: drop the gradient component parallel to each decoder row."""
        if self.W_dec.grad is not None:
            ops.project_decoder_grad_(self.W_dec.data, self.W_dec.grad)

    @torch.no_grad()
    def init_b_dec_(self, x: Tensor, layer: int | Tensor | None = None) -> None:
        """Set b_dec to the mean of the batch x (raw activations of `layer`) in the scaled space
        the SAE works in, so that the encoder sees centred inputs from the first step (what
        sparsify's trainer does; the paper starts b_dec at zero)."""
        xs = self.loss_input(x, layer)
        _check(xs.shape[0] >= 1, "init_b_dec_ needs at least one row")
        self.init_b_dec_from_sums_(*self.layer_sums(xs, self.layer_pos(layer, xs.shape[0])))

    def layer_sums(self, xs: Tensor, pos: int | Tensor) -> tuple[Tensor, Tensor]:
        """(Σ rows [L, D], row counts [L]) of scaled rows xs [n, D] by member layer, fp64."""
        L = len(self.layers)
        sums = xs.new_zeros(L, self.d_in, dtype=torch.float64)
        counts = sums.new_zeros(L)
        if isinstance(pos, int):
            sums[pos] = xs.double().sum(0)
            counts[pos] = xs.shape[0]
        else:
            sums.index_add_(0, pos.to(xs.device), xs.double())
            counts.index_add_(0, pos.to(xs.device), counts.new_ones(len(pos)))
        return sums, counts

    @torch.no_grad()
    def init_b_dec_from_sums_(self, sums: Tensor, counts: Tensor) -> None:
        """b_dec at the mean of all rows; with the per-layer b_dec, Δb_dec[l] at layer l's mean
        minus that (0 for a layer with no rows). sums [L, D], counts [L] as from layer_sums."""
        _check(float(counts.sum()) >= 1, "init_b_dec_ needs at least one row")
        mean = sums.sum(0) / counts.sum()
        self.b_dec.copy_(mean.to(self.b_dec.device, self.b_dec.dtype))
        if "b_dec" in self.layer_params:
            own = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], mean)
            self.layer_b_dec.copy_((own - mean).to(self.layer_b_dec.device,
                                                   self.layer_b_dec.dtype))

    @torch.no_grad()
    def renorm_decoder_(self) -> None:
        """After the optimizer step: decoder rows back to unit norm."""
        ops.renorm_decoder_(self.W_dec.data)

    def _apply(self, fn, recurse=True):
        # .to(bf16)/.half() would round the scales buffer too; rebuild it from the exact values.
        # A cast of the parameters (.double(), .to(dtype)) makes them the compute dtype again.
        before = self.W_dec.dtype
        super()._apply(fn, recurse)
        if self.W_dec.dtype != before:
            self._compute_dtype = None
        self.scales = torch.tensor(self._scale_values, dtype=torch.float32,
                                   device=self.scales.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.W_dec.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the matmuls: the parameters' own, or (mixed precision) e.g. bf16 over fp32
        master weights."""
        return self._compute_dtype or self.W_dec.dtype

    def _weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_enc, b_enc, W_dec, b_dec) for the ops. The M-sized ones are the parameters
        themselves: under mixed precision the ops cast them to the compute dtype and return
        their gradients in fp32 straight from the fp32 sums (an autograd cast here would round
        them to bf16 and copy them back, three M×D passes a step). b_dec, which the SAE adds to
        the reconstruction itself, comes cast to the compute dtype."""
        cd, b_dec = self.compute_dtype, self.b_dec
        return (self.encoder.weight, self.encoder.bias, self.W_dec,
                b_dec if b_dec.dtype == cd else b_dec.to(cd))

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ------------------------------------------------------------------ save / load
    def config(self) -> dict:
        """cfg.json: sparsify's keys first, then the group fields."""
        return {
            **_SPARSIFY_DEFAULTS,
            # the true width over d_in (an int when exact); num_latents is what loaders use
            "expansion_factor": self.expansion_factor if isinstance(self.expansion_factor, int)
            else round(self.expansion_factor, 6),
            "num_latents": self.num_latents,
            "k": self.k,
            "d_in": self.d_in,
            "layers": self.layers,
            "scales": list(self._scale_values),
            "model": self.model_name,
            "hookpoints": self.hookpoints,
            "k_aux": self.k_aux,
            "dtype": str(self.dtype).removeprefix("torch."),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "layer_params": list(self.layer_params),
            "format": "lgsae.GroupSAE/1",
        }

    def save(self, path: str | os.PathLike, firing: dict[str, Tensor] | None = None) -> Path:
        """Write `path/cfg.json` and `path/sae.safetensors` (and, given the trainer's firing
        counts {"counts": [layers, M], "tokens": [layers]}, `path/firing.safetensors`); the
        folder appears (or replaces an older one) whole, through lgsae.io.write_folder."""
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}

        def fill(tmp: Path) -> None:
            save_file(tensors, tmp / "sae.safetensors")
            if firing is not None:
                save_file({k: v.contiguous().cpu() for k, v in firing.items()},
                          tmp / FIRING_FILE)
            (tmp / "cfg.json").write_text(json.dumps(self.config(), indent=2) + "\n")

        return write_folder(path, fill)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> GroupSAE:
        """Read a folder written by `save`, or by sparsify (a one-layer SAE with scale 1)."""
        path = Path(path)
        cfg_file, st_file = path / "cfg.json", path / "sae.safetensors"
        for f in (cfg_file, st_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: an SAE folder holds cfg.json and "
                                        "sae.safetensors (as written by GroupSAE.save or sparsify)")
        cfg = json.loads(cfg_file.read_text())
        tensors = load_file(st_file)
        missing = [n for n in _TENSORS if n not in tensors]
        if missing:
            raise ValueError(f"{st_file} lacks tensors {missing} (found {sorted(tensors)})")
        if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or \
                cfg.get("skip_connection"):
            raise ValueError(f"{cfg_file}: only plain TopK autoencoders load as GroupSAE "
                             "(activation=topk, no transcode, no skip connection)")
        W_dec = tensors["W_dec"]
        sae = cls(
            int(cfg["d_in"]), k=int(cfg["k"]), num_latents=W_dec.shape[0],
            layers=cfg.get("layers", [0]), scales=cfg.get("scales"), model=cfg.get("model"),
            hookpoints=cfg.get("hookpoints"), k_aux=cfg.get("k_aux"),
            dtype=dtype or W_dec.dtype, device=device,
            compute_dtype=_dtype(cfg.get("compute_dtype")) if cfg.get("compute_dtype") !=
            cfg.get("dtype") else None, layer_params=cfg.get("layer_params", ()),
        )
        names = [*_TENSORS, *(_LAYER_TENSORS[p] for p in sae.layer_params)]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{st_file} lacks tensors {missing} that cfg.json's layer_params "
                             f"{list(sae.layer_params)} need (found {sorted(tensors)})")
        sae.load_state_dict({n: tensors[n] for n in names})
        return sae


def _dtype(name: str | None) -> torch.dtype | None:
    dt = getattr(torch, name, None) if name else None
    return dt if isinstance(dt, torch.dtype) else None


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)
