"""Crash-safe checkpoints: atomic single-file writes and atomic sharded-directory swaps.

A checkpoint is first written next to its destination under a temporary name, flushed and
``fsync``-ed, then moved into place with ``os.replace`` (atomic on POSIX), and the directory entry
is ``fsync``-ed too. A process killed at any moment therefore leaves either the previous complete
checkpoint or the new complete one — never a truncated file under the real name. Leftover
temporaries from a killed writer are named ``.<name>.tmp-<pid>`` and are ignored by Lightning.
"""
from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

__all__ = ["atomic_write_bytes", "atomic_torch_save", "atomic_replace_dir", "AtomicCheckpointIO"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(f)`` on a temporary file, fsync it, then atomically rename it to ``path``.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content and the
    temporary file is removed (on exceptions) or left as a hidden ``.tmp-<pid>`` file (on kills).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_replace_dir(tmp_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the complete directory ``tmp_dir`` to ``path``, replacing what was there.

    Directories cannot be swapped in one ``rename`` when the target exists, so the old one is
    first renamed aside (``.<name>.old``), the new one renamed in, then the old one deleted; a
    crash in between leaves the old checkpoint complete under ``.<name>.old`` (and
    :func:`recover_dir` puts it back).
    """
    tmp_dir, path = Path(tmp_dir), Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if path.exists():
        os.replace(path, old)
    os.replace(tmp_dir, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return path


def recover_dir(path: str | os.PathLike) -> Path | None:
    """After a crash inside :func:`atomic_replace_dir`: restore ``.<name>.old`` if ``path`` is missing."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.replace(old, path)
        return path
    return path if path.exists() else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` writing local checkpoints atomically (tmp + fsync + os.replace).

    Remote URLs (``s3://`` …) fall back to Lightning's own transaction-based writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options, "
                            f"got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
