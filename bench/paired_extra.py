"""Paired differences between methods of a finished `--preset paper-table` run that the run did
not compute (runs before issue 19 had no `paired_vs`): re-evaluates the saved SAEs of the chosen
methods on the run's own held-out contexts with the pipeline's evaluation (same contexts,
statistics means and medians) and checks that it reproduces the run's own means. Not in CI.

    python bench/paired_extra.py RUN groups,even,smaller even,smaller OUT.json
"""

import json
import sys
import time
from pathlib import Path

from lgsae.capture import DTYPES, check_layers, special_ids
from lgsae.config import PipelineConfig, parse
from lgsae.evaluate import evaluate
from lgsae.groups import parse_layers
from lgsae.models import load_model, load_tokenizer
from lgsae.sae import GroupSAE
from lgsae.sources import Forward, InMemoryActivations, context_batches, make_layout
from lgsae.stats import summarize_eval
from lgsae.train import expand_preset


def main(run: Path, methods: list[str], bases: list[str], out: Path) -> None:
    flags = json.loads((run / "run.json").read_text())
    c = parse(PipelineConfig, expand_preset(["--preset", "paper-table", "--out", str(run)]), "x")
    dc, tc = c.data, c.train
    for key, have in (("model_dtype", dc.model_dtype), ("tokens", tc.tokens),
                      ("eval_tokens", dc.eval_tokens), ("seed", tc.seed)):
        if flags[key] != have:
            raise ValueError(f"{run} was not a paper-table run ({key}: {flags[key]} != {have})")
    t0 = time.time()
    model = load_model(dc.model, dtype=DTYPES[dc.model_dtype], device="cpu")
    tok = load_tokenizer(dc.model)
    layers = check_layers(parse_layers(dc.layers), model.config.num_hidden_layers)
    layout = make_layout(ctx=dc.ctx, stat_tokens=dc.stat_tokens, eval_tokens=dc.eval_tokens,
                         train_tokens=tc.tokens, buffer_tokens=tc.buffer_tokens,
                         fwd_batch=dc.fwd_batch, batch=tc.batch)
    forward = Forward(model, layers, batch_size=dc.fwd_batch, store=DTYPES[dc.act_dtype],
                      device="cpu")
    text, special = dc.text(tc.seed), special_ids(tok)

    def contexts(start, count):
        return context_batches(tok, text, ctx=dc.ctx, start=start, count=count,
                               per=layout.chunk_contexts)

    sample = InMemoryActivations.collect(forward, contexts(0, layout.stat_contexts), dc.ctx,
                                         special)
    means = {v: m.float() for v, m in zip(sample.layers, sample.means())}
    medians = sample.medians
    del sample
    metrics = json.loads((run / "metrics.json").read_text())
    by: dict[str, dict] = {}
    for m in methods:
        for name, s in metrics["methods"][m]["saes"].items():
            sae = GroupSAE.load(run / "saes" / name)
            for v in s["layers"]:
                by.setdefault(m, {})[v] = sae
    tally = evaluate(by, model, contexts(layout.stat_contexts, layout.eval_contexts),
                     special=special, means=means, medians=medians, progress=False,
                     n_contexts=layout.eval_contexts)
    D, last = model.config.hidden_size, max(layers)
    result = {"command": "python bench/paired_extra.py " + " ".join(sys.argv[1:]),
              "seconds": time.time() - t0,
              "means": summarize_eval(tally, D, last=last)["means"],
              "paired_vs": {b: summarize_eval(tally, D, last=last, base=b)["paired"]
                            for b in bases}}
    for m in methods:  # the re-evaluation must reproduce the run's own means
        for k in ("fvu", "loss_recovered"):
            a, b = result["means"][m][k], metrics["methods"][m][k]
            if abs(a - b) > 1e-6:
                raise AssertionError(f"{m} {k}: re-evaluated {a} != the run's {b}")
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(","), Path(sys.argv[4]))
