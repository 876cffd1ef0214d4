"""`python -m lgsae.train`: the whole method on one command (see lgsae.pipeline for the run).

With no arguments it runs on the offline default (SmolLM2-135M and the packaged Wikipedia text):
statistics -> groups (Ĝ) -> train the Ĝ group SAEs + the last layer's SAE and the baselines,
streamed from the model -> evaluate on held-out tokens -> report (metrics.json, report.md, plots,
saved SAEs). `--help` lists every flag (generated from lgsae.config).
"""

from __future__ import annotations

import sys

from lgsae.config import PipelineConfig, parse
from lgsae.dist import LaunchError
from lgsae.step import tune_cpu_allocator


def main(argv: list[str] | None = None) -> dict:
    from lgsae.pipeline import run

    config = parse(PipelineConfig, argv, prog="python -m lgsae.train")
    tune_cpu_allocator()
    return run(config)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, OSError, FloatingPointError,
            LaunchError) as e:
        sys.exit(f"lgsae.train: error: {e}")
