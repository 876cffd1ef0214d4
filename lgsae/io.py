"""Atomic writes: every file a run leaves (run.json, groups.json, metrics.json, report.md, plots,
SAE folders, checkpoints) appears whole or not at all, so a kill at any moment never leaves a
half-written file where a finished one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _publish(tmp: str | Path, folder: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give them the mode a plain open()/mkdir() would
    have (readable by others under the usual umask), so a shared run folder stays shareable."""
    os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it into place."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())

    return save_with(path, write)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    return write_atomic(path, json.dumps(obj, indent=indent))


def save_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """`writer(tmp_path)` writes a file (e.g. matplotlib's savefig); it is renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        writer(Path(tmp))
        _publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_folder(dest: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """`writer(tmp_dir)` fills a temporary folder beside `dest`, which then replaces `dest` (an
    older `dest` is moved aside first and removed last, so a complete copy is always on disk)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".tmp-{dest.name}."))
    try:
        writer(tmp)
        _publish(tmp, folder=True)
        if dest.exists():
            aside = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".tmp-old-{dest.name}."))
            os.replace(dest, aside / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def remove_stale(folder: Path, keep: Path | None = None) -> None:
    """Drop temporary folders/files left in `folder` by a process killed while writing."""
    for stale in list(folder.glob(".tmp-*")):
        if stale != keep:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
