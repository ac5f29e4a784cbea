"""Files and directories that appear complete or not at all.

Every output a run or tool leaves (metrics, results, summaries, plots, datasets, checkpoints) is
written under a temporary name in the same directory, flushed to disk, and renamed into place: a
crash or a full disk leaves the previous version or nothing, never half a file that a later resume
or comparison would read. This module is the one place that does it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class TargetExistsError(FileExistsError):
    """An output directory that already holds something, and the caller did not ask to replace it."""


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable; best effort, as some file systems refuse fsync on a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error it becomes `path`.

    For writers that want a file name (matplotlib's savefig, safetensors): they write the temporary
    path, and the rename publishes it. The suffix is kept, so writers that choose a format by it work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:  # the rename must not publish data still in flight
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False, marker: str = "") -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only when complete.

    An existing target (a non-empty directory, or a file) is refused unless `overwrite`; `marker`
    names the file that shows the target is one of ours (for the message). An exception removes the
    temporary directory, so a failed or interrupted writer never leaves something that looks finished.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        what = "a checkpoint" if marker and (target / marker).exists() else "files"
        raise TargetExistsError(f"{target} already holds {what}; pass --overwrite to replace it")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
