"""Training checkpoints: time-based, the latest only, atomic, removed after a finished run.

A checkpoint is `checkpoints/step_NNNNNN/{sae_NNN.safetensors..., state.json}` (under torchrun,
`checkpoints/rank<r>/...` per rank): SAE weights, Adam moments, dead-latent counters and the step.
The step is the stream position: lgsae.buffer rebuilds the shuffle buffer for it by re-running the
forward over at most one buffer of tokens, so nothing else needs saving. Written through
lgsae.io.write_folder, so a kill at any moment leaves the previous checkpoint or the new one.
Under torchrun the ranks agree on when to save (one tiny all-reduce per step) and each keeps its
previous checkpoint too, so that after a crash every rank still has the latest common step.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lgsae.dist import Dist
from lgsae.io import remove_stale, write_folder


def _delete(folder: Path) -> None:
    """Rename aside, then delete: a kill mid-way leaves a .tmp-* folder, never a half step."""
    aside = folder.parent / f".tmp-del-{folder.name}"
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


class Checkpoints:
    """Saves a Trainer every `minutes` (0: after every step) and at the end of `fit`."""

    def __init__(self, root: Path, minutes: float, dist: Dist | None = None):
        self.dist = dist or Dist()
        self.root = Path(root)
        self.folder = self.root / f"rank{self.dist.rank}" if self.dist.active else self.root
        self.minutes = minutes
        self.last = time.monotonic()
        self.saved_step: int | None = None

    def due(self) -> bool:
        late = self.minutes <= 0 or time.monotonic() - self.last >= 60 * self.minutes
        if self.dist.active:  # every rank saves the same step
            flag = torch.tensor([1 if late else 0])
            self.dist.all_reduce_(flag, "max")
            late = bool(flag.item())
        return late

    def save(self, trainer) -> Path:
        tensors, meta = trainer.state()
        # one file per SAE: safetensors serialises a whole file in memory first, so one file of
        # every SAE's weights and Adam moments would double the run's peak memory for a moment
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            parts.setdefault(f"sae_{int(key.split('.', 1)[0]):03d}.safetensors", {})[key] = t
        meta = {**meta, "files": sorted(parts)}

        def fill(tmp: Path) -> None:
            for name, part in parts.items():
                save_file(part, tmp / name)
            (tmp / "state.json").write_text(json.dumps(meta))

        final = write_folder(self.folder / f"step_{trainer.step:06d}", fill)
        keep = 2 if self.dist.active else 1
        for old in self.steps()[:-keep]:
            _delete(self.folder / f"step_{old:06d}")
        remove_stale(self.folder)
        self.last, self.saved_step = time.monotonic(), trainer.step
        return final

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, in numeric order (step_1000000 after step_999999)."""
        found = self.folder.glob("step_*") if self.folder.is_dir() else []
        return sorted(int(p.name[5:]) for p in found if (p / "state.json").is_file())

    def load(self, trainer) -> bool:
        """Restore the latest checkpoint (under torchrun: the latest every rank has). False if
        there is none."""
        steps = self.steps()
        if self.dist.active:
            common = set(steps)
            for other in self.dist.gather(steps):
                common &= set(other)
            steps = sorted(common)
        if not steps:
            return False
        latest = self.folder / f"step_{steps[-1]:06d}"
        meta = json.loads((latest / "state.json").read_text())
        tensors: dict[str, torch.Tensor] = {}
        for name in meta.get("files", ["state.safetensors"]):  # (one file before 2026-12)
            tensors.update(load_file(latest / name))
        trainer.load_state(tensors, meta)
        self.saved_step = trainer.step
        return True

    def remove(self) -> None:
        """After a finished run: the SAEs are saved, the checkpoint is only disk."""
        for step in self.steps():
            _delete(self.folder / f"step_{step:06d}")
        remove_stale(self.folder)
        try:
            self.folder.rmdir()
        except OSError:
            pass
        try:
            self.root.rmdir()  # when empty (under torchrun, the last rank out removes it)
        except OSError:
            pass
