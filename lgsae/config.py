"""Settings, one dataclass per stage; the command-line flags are generated from them (tyro), so a
flag, its default and its help text are written once, in the field's docstring.

`python -m lgsae.train` = DataConfig + GroupConfig + TrainConfig + RunConfig;
`python -m lgsae.groups` = DataConfig + GroupConfig + an output folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from tyro.conf import Positional

Precision = Literal["float32", "bfloat16"]



def _positive(name: str, value, minimum=1) -> None:
    if value < minimum:
        raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def parse_device(name) -> torch.device:
    """torch.device(name), with one clear error for a name torch does not know."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name torch knows; use cpu, cuda or "
                         "cuda:N") from None


def check_device(name: str) -> torch.device:
    """torch.device(name) if this machine has that device; one clear error otherwise (torch's
    own is an AssertionError deep inside the first CUDA call)."""
    dev = parse_device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA build" if torch.version.cuda is None else \
                "torch sees no GPU (driver or CUDA_VISIBLE_DEVICES)"
            raise ValueError(f"--device {name}: no CUDA device on this machine ({why}, torch "
                             f"{torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: lgsae runs on cpu or cuda, not {dev.type}")
    return dev


EQUAL_COMPUTE = "equal-compute"


def eval_at_tokens(text: str, tokens: int) -> list[int | str]:
    """--eval-at as a list of token counts and/or EQUAL_COMPUTE (resolved once the groups are
    known: lgsae.plan.milestones)."""
    out: list[int | str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == EQUAL_COMPUTE:
            out.append(part)
            continue
        try:
            n = int(part.replace("_", ""))
        except ValueError:
            raise ValueError(f"--eval-at: {part!r} is neither a token count nor "
                             f"{EQUAL_COMPUTE!r}; e.g. --eval-at 250000,equal-compute") from None
        if not 0 < n < tokens:
            raise ValueError(f"--eval-at: {n} must be between 0 and --tokens ({tokens}), "
                             "exclusive (the end of training is always evaluated)")
        out.append(n)
    return out


@dataclass
class DataConfig:
    """Model, text and where in the token stream each part of the run reads."""

    model: str | None = None
    """HF name or local model folder; None: SmolLM2-135M-Instruct, packaged (offline)."""
    dataset: str | None = None
    """HF dataset (streamed) or local .json/.jsonl/.txt; None: the packaged Wikipedia leads."""
    text_column: str = "text"
    """Text column of --dataset."""
    ctx: int = 256
    """Context length in tokens."""
    layers: str = "all"
    """Blocks to train SAEs for: all, 0-29, 0,2,4."""
    stat_tokens: int = 16_384
    """Tokens for layer scales and distances (hence the groups), kept in memory (paper: 5M-10M)."""
    eval_tokens: int = 8192
    """Held-out tokens for evaluation (32 contexts of 256: error bars over contexts)."""
    model_dtype: Precision = "float32"
    """Model compute dtype for the forward (statistics, training stream, evaluation)."""
    act_dtype: Precision = "bfloat16"
    """Dtype activations are kept in, in the shuffle buffer and the cache."""
    fwd_batch: int = 8
    """Contexts per model forward."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    """Device for the model and the SAEs: cpu, cuda or cuda:N (unset: cuda when this machine has
    one, else cpu)."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with --model (off unless you trust it)."""

    def __post_init__(self):
        _positive("ctx", self.ctx, 2)
        _positive("stat_tokens", self.stat_tokens, self.ctx)
        _positive("eval_tokens", self.eval_tokens, self.ctx)
        _positive("fwd_batch", self.fwd_batch)

    def text(self, seed: int) -> dict:
        return {"dataset": self.dataset, "text_column": self.text_column, "seed": seed}


@dataclass
class GroupConfig:
    """How layers are grouped (Ghilardi et al.: complete linkage, AMAD rule)."""

    groups: str = "auto"
    """auto (Ĝ by the AMAD rule), a number G, or explicit groups like '0-8;9-10;11-28'."""
    threshold: float = 0.2
    """AMAD threshold for --groups auto."""
    contiguous: bool = False
    """Only merge neighbouring layers."""
    centre: bool = True
    """Subtract each layer's mean before the cosine (the authors' code); --no-centre: raw."""
    include_last: bool = False
    """Cluster the last layer too instead of giving it its own SAE."""

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise ValueError(f"--threshold must be in (0, 1), got {self.threshold}")


# What a run gets when --batch / --dtype are not given. A GPU step at 256 tokens leaves the device
# idle and fp32 sends the fused encoder through its FMA path; on a 2-core CPU bf16 saves nothing
# at batch 256 (README, Precision) and a larger batch only means fewer, slower steps.
DEVICE_DEFAULTS = {"cpu": {"batch": 256, "dtype": "float32"},
                   "cuda": {"batch": 4096, "dtype": "bfloat16"}}


@dataclass
class TrainConfig:
    """Training budget and hyper-parameters (every SAE of every method sees the same batches).

    The shuffle buffer's halves are rounded to whole forward batches of contexts and hold at least
    two batches each; metrics.json's buffer_tokens is the size used."""

    tokens: int = 98_304
    """Training tokens per SAE (one pass of the stream, sink positions excluded)."""
    k: int = 32
    """Latents active per token."""
    expansion: int = 8
    """Latents = expansion × model width."""
    batch: int | None = None
    """Tokens per step; None: 4096 on CUDA, 256 on CPU."""
    lr: float | None = None
    """Learning rate; None: --lr-scale x the paper's 2e-4 / sqrt(M / 2^14) for each SAE."""
    lr_scale: float = 2.0
    """Factor on the paper's lr rule when --lr is unset (2: measured best at 256-token batches)."""
    dtype: Precision | None = None
    """SAE matmuls: float32 or bfloat16 (fp32 weights, Adam); None: bf16 on CUDA, fp32 on CPU."""
    seed: int = 0
    """Seeds the document order, the shuffle buffer, the SAEs' initialisation and layer draws."""
    dead_window: int = 0
    """Tokens with no firing until a latent is dead (x a group's layers); 0: min(10M, tokens/24)."""
    init_b_dec: Literal["mean", "zero"] = "mean"
    """b_dec at start: the first batch's mean (scaled space), or zero (the paper)."""
    encoder_norm: float = 0.58
    """Norm of the encoder rows at start (copies of the unit decoder rows; the paper: 1)."""
    buffer_tokens: int = 32_768
    """Shuffle buffer: a batch mixes its contexts; memory tokens × layers × width × act-dtype."""
    baselines: str = "per-layer"
    """Comma list of per-layer,even,smaller,single (or 'none')."""
    eval_at: str = ""
    """Also evaluate per-layer SAEs at: token counts and/or equal-compute (the groups' cost)."""
    layer_params: str = ""
    """Per-member-layer parameters of every group SAE: comma list of b_dec,b_enc,scale (or '')."""
    group_variants: str = ""
    """Ablation: the groups again as methods with other layer params, e.g. 'b_dec,b_dec+scale'."""
    from_cache: bool = False
    """Harvest the training stream to the disk cache ($LGSAE_CACHE) or reuse it, then train."""
    data_parallel: bool = False
    """Under torchrun: every rank trains every SAE on its rows (default: SAEs spread over ranks)."""

    def __post_init__(self):
        _positive("k", self.k)
        _positive("expansion", self.expansion)
        if self.batch is not None:  # else for_device fills it in (and checks again)
            _positive("batch", self.batch, 2)  # FVU needs a variance
            _positive("tokens", self.tokens, self.batch)
            _positive("buffer_tokens", self.buffer_tokens, 2 * self.batch)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.lr_scale < float("inf"):
            raise ValueError(f"--lr-scale must be finite and > 0, got {self.lr_scale}")
        _positive("dead_window", self.dead_window, 0)
        if eval_at_tokens(self.eval_at, self.tokens) and "per-layer" not in [
                b.strip() for b in self.baselines.split(",")]:
            raise ValueError("--eval-at evaluates the per-layer SAEs part-way: add per-layer to "
                             "--baselines")
        from lgsae.plan import layer_params_from, variant_methods

        # each parsed here, so that an unknown name is the flag parser's one clear error
        own, variants = layer_params_from(self.layer_params), variant_methods(self.group_variants)
        if own and variants:
            raise ValueError("--group-variants compares variants against the plain groups: "
                             "leave --layer-params empty (or add its options to each variant)")
        if not 0 < self.encoder_norm < float("inf"):
            raise ValueError(f"--encoder-norm must be finite and > 0, got {self.encoder_norm}")

    def for_device(self, device) -> TrainConfig:
        """This config with an unset batch and dtype filled in for `device` (DEVICE_DEFAULTS)."""
        kind = "cuda" if parse_device(device).type == "cuda" else "cpu"
        d = DEVICE_DEFAULTS[kind]
        return replace(self, batch=self.batch or d["batch"], dtype=self.dtype or d["dtype"])

    def sae_settings(self) -> dict:
        """What the SAEs' training depends on (checked when a checkpoint is loaded)."""
        return {k: getattr(self, k) for k in ("k", "expansion", "batch", "lr", "dtype", "seed",
                                              "dead_window")}


@dataclass
class RunConfig:
    """The run folder, checkpoints and logging."""

    out: str = "runs/default"
    """Run folder (run.json, groups.json, saes/, metrics.json, report.md, plots)."""
    resume: bool = False
    """Continue the run in --out from its checkpoint (bit-identical to an uninterrupted run)."""
    overwrite: bool = False
    """Delete --out first if it holds a run."""
    checkpoint_minutes: float = 10.0
    """Minutes between checkpoints (0: after every step); one more at the end of training."""
    keep_checkpoint: bool = False
    """Keep the last checkpoint after a finished run (default: delete it; the SAEs are saved)."""
    progress: bool = True
    """Progress bars."""
    wandb: str | None = None
    """Also log training to this Weights & Biases project (needs `pip install wandb`)."""
    browse: bool = True
    """Build the latent browser (RUN/browser, python -m lgsae.browse) at the end of the run."""


# flags that may differ between a run and its resumption (they change nothing in the result)
COSMETIC = ("resume", "overwrite", "checkpoint_minutes", "keep_checkpoint", "progress", "wandb",
            "browse")


@dataclass
class PipelineConfig:
    """Train one TopK SAE per group of similar layers (and baselines), evaluate, report."""

    data: DataConfig = field(default_factory=DataConfig)
    groups: GroupConfig = field(default_factory=GroupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        self.train = self.train.for_device(self.data.device)  # --batch/--dtype by device

    def flags(self) -> dict:
        """Every setting by flag name, as run.json records them."""
        out = {}
        for part in (self.data, self.groups, self.train, self.run):
            out.update(vars(part))
        return out


@dataclass
class GroupsConfig:
    """Measure layer distances on a sample of the text and group similar layers."""

    data: DataConfig = field(default_factory=lambda: DataConfig(stat_tokens=20_480))
    groups: GroupConfig = field(default_factory=GroupConfig)
    out: str = "runs/groups"
    """Folder for groups.json and the plots (never a python -m lgsae.train run's folder)."""
    overwrite: bool = False
    """Replace the groups.json and plots of an earlier python -m lgsae.groups in --out."""


@dataclass
class ExportConfig:
    """Export a run's SAEs for SAELens or sparsify/delphi: one folder per (method, layer), each
    reconstructing that layer's raw activations (the layer's scale folded into the weights)."""

    run: Positional[str]
    """The run folder (as written by python -m lgsae.train)."""
    format: Literal["saelens", "sparsify"] = "saelens"
    """saelens: SAELens-native folders (SAE.load_from_disk); sparsify: per-hookpoint folders."""
    out: str = "export"
    """Output folder (must not exist or be empty)."""
    methods: str = "all"
    """Comma list of the run's methods to export (groups, per-layer, ...), or all."""


@dataclass
class BrowseConfig:
    """Build a static site showing every latent of a run's SAEs (examples by layer, logit lens)."""

    run: Positional[str]
    """The run folder (as written by python -m lgsae.train)."""
    out: str = ""
    """Site folder (default RUN/browser); an older site there is replaced whole."""
    tokens: int = 8192
    """Held-out tokens to encode (the run's eval contexts, then text after its training stream)."""
    top: int = 20
    """Top-activating examples kept per latent."""
    random: int = 3
    """Further random firings kept per latent."""
    methods: str = "all"
    """Comma list of the run's methods to include (groups, per-layer, ...), or all."""
    progress: bool = True
    """Show a progress bar."""


def parse(cls, argv: list[str] | None, prog: str, epilog: str = ""):
    """The dataclass `cls` filled from command-line flags (flat names: --tokens, --k, ...)."""
    import tyro

    return tyro.cli(cls, args=argv, prog=prog, config=(tyro.conf.OmitArgPrefixes,),
                    description=cls.__doc__ + (f"\n\n{epilog}" if epilog else ""))
