"""Which SAEs a run trains: the groups and the paper's equal-cost baselines (Table 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lgsae.groups import even_partition, parse_layers
from lgsae.sae import LAYER_PARAMS

METHODS = ("groups", "per-layer", "even", "smaller", "single")
GROUPED = ("groups", "even", "single")  # methods whose SAEs serve several layers


@dataclass
class SAESpec:
    """One SAE to train: which method it belongs to, the layers it serves, its width."""

    name: str
    method: str
    layers: list[int]
    num_latents: int
    layer_params: list[str] = field(default_factory=list)  # GroupSAE's per-member-layer options


def _name(method: str, group: list[int]) -> str:
    span = f"L{group[0]:02d}" if len(group) == 1 else f"L{group[0]:02d}-L{group[-1]:02d}"
    return f"{method}/{span}" if len(group) == len(range(group[0], group[-1] + 1)) \
        else f"{method}/" + "_".join(f"L{v:02d}" for v in group)


def plan_saes(groups: dict, partition: list[list[int]], methods: list[str], d: int,
              expansion: int, k: int, layer_params: list[str] | None = None) -> list[SAESpec]:
    """The SAEs of every method. `groups` is the groups.json dict; `partition` the chosen groups
    of the grouped layers; the separate layers (the last one by default) get their own SAE in
    every grouped method. `layer_params`: the per-member-layer options of every multi-layer SAE
    of groups, even and single; a method "groups+<p>+<q>" (variant_methods) is the groups again
    with the options p, q instead."""
    M = expansion * d
    separate = [[v] for v in groups["separate_layers"]]
    every = [[v] for v in groups["layers"]]
    G = len(partition)
    partitions = {
        "groups": partition + separate,
        "per-layer": every,
        "even": groups["even"]["groups"] + separate if G == groups["chosen_G"]
        else _even(groups["grouped_layers"], G) + separate,
        "smaller": every,
        "single": [groups["grouped_layers"]] + separate,
    }
    # equal cost: L smaller SAEs hold as many latents in all as the G group SAEs (paper Table 1)
    small = max(k, round(M * G / len(groups["grouped_layers"])))
    specs = []
    for method in methods:
        base, _, options = method.partition("+")
        width = small if base == "smaller" else M
        params = options.split("+") if options else \
            list(layer_params or []) if base in GROUPED else []
        specs += [SAESpec(_name(method, g), method, list(g), width,
                          params if len(g) > 1 else []) for g in partitions[base]]
    return specs


def layer_params_from(text: str, flag: str = "--layer-params") -> list[str]:
    """'b_dec,scale' -> ['b_dec', 'scale'] (LAYER_PARAMS order); '' or 'none' -> []."""
    names = [] if text.strip() in ("", "none") else [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in LAYER_PARAMS]
    if bad:
        raise ValueError(f"{flag}: unknown {bad}; choose from {', '.join(LAYER_PARAMS)}")
    return [p for p in LAYER_PARAMS if p in names]


def variant_methods(text: str) -> list[str]:
    """--group-variants 'b_dec,b_enc,b_dec+b_enc+scale' -> ['groups+b_dec', 'groups+b_enc',
    'groups+b_dec+b_enc+scale']: each entry a '+'-joined set of per-member-layer options."""
    out = []
    for entry in ([] if text.strip() in ("", "none") else text.split(",")):
        params = layer_params_from(entry.replace("+", ","), "--group-variants")
        if not params:
            raise ValueError(f"--group-variants: empty entry in {text!r}")
        name = "groups+" + "+".join(params)
        if name not in out:
            out.append(name)
    return out


def sae_flops_per_token(spec: SAESpec, d: int, k: int) -> int:
    """Training work of one SAE per token: encoder GEMM + sparse decode and backward (the
    per-layer b_enc widens the GEMM by the layer one-hot, padded to 16; the per-layer b_dec and
    scale add the encoder's input gradient: lgsae.sae)."""
    lp = spec.layer_params
    width = d + (-(d + len(spec.layers)) % 16 + len(spec.layers) if "b_enc" in lp else 0)
    return 2 * width * spec.num_latents + 8 * k * d + \
        (2 * k * d if "b_dec" in lp or "scale" in lp else 0)


def milestones(eval_at: list, specs: list[SAESpec], tokens: int, batch: int, d: int,
               k: int) -> dict[int, int]:
    """{step: tokens} at which the per-layer SAEs are also evaluated (--eval-at, as parsed by
    lgsae.config.eval_at_tokens), each rounded to a whole step. equal-compute: the step where
    the per-layer SAEs have cost what the group SAEs cost over the whole run (FLOPs; the L
    per-layer and Ĝ+1 group SAEs are equally wide, so tokens · (Ĝ+1) / L)."""
    from lgsae.config import EQUAL_COMPUTE

    if not eval_at:
        return {}
    cost = {m: sum(sae_flops_per_token(s, d, k) for s in specs if s.method == m)
            for m in ("groups", "per-layer")}
    if not cost["per-layer"]:
        raise ValueError("--eval-at evaluates the per-layer SAEs part-way: add per-layer to "
                         "--baselines")
    out = {}
    for t in eval_at:
        want = tokens * cost["groups"] / cost["per-layer"] if t == EQUAL_COMPUTE else t
        step = max(1, round(want / batch))
        if step < tokens // batch:
            out[step] = step * batch
    return dict(sorted(out.items()))


def _even(layers: list[int], G: int) -> list[list[int]]:
    return even_partition(layers, G)


def methods_from(text: str) -> list[str]:
    """'groups' plus the baselines named in --baselines, in METHODS order."""
    names = [] if text.strip() in ("", "none") else [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in METHODS[1:]]
    if bad:
        raise ValueError(f"--baselines: unknown {bad}; choose from {', '.join(METHODS[1:])}")
    return ["groups"] + [m for m in METHODS[1:] if m in names]


def choose_partition(spec: str, groups: dict) -> list[list[int]]:
    """The groups to train from --groups: auto, a number G, or explicit 'a-b;c,d;...'."""
    parts = groups["partitions"]
    if spec == "auto":
        return parts[str(groups["chosen_G"])]["groups"]
    if spec.isdigit():
        if spec not in parts:
            raise ValueError(f"--groups {spec}: choose G in 1..{len(parts)}")
        return parts[spec]["groups"]
    explicit = [parse_layers(g) or [] for g in spec.split(";")]
    flat = sorted(v for g in explicit for v in g)
    want = groups["grouped_layers"]
    if flat != want:
        unknown = sorted(set(flat) - set(groups["layers"]))
        separate = sorted(set(flat) & set(groups["separate_layers"]))
        raise ValueError(
            f"--groups {spec!r} must split layers {want} into groups, each layer once"
            + (f"; unknown layers {unknown}" if unknown else "")
            + (f"; layers {separate} get their own SAE and are not grouped" if separate else ""))
    return explicit
