"""Where run-time artefacts live (toy-world shards, locally trained tokenizers, exported models)."""
from __future__ import annotations

import os
from pathlib import Path


def uio_home() -> Path:
    """``$UIO_HOME`` if set, else ``~/.cache/uio``. Created on first use."""
    root = Path(os.environ.get("UIO_HOME") or Path.home() / ".cache" / "uio").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def toyworld_dir() -> Path:
    return uio_home() / "toyworld"


def tokenizers_dir() -> Path:
    return uio_home() / "tokenizers"


def package_conf_dir() -> Path:
    """The Hydra config tree: ``uio/conf`` (a symlink to the repository's ``conf/`` in a source
    checkout; a real directory inside a built wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent.parent / "conf"):
        if (candidate / "train.yaml").is_file() or candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"uio's config tree was not found next to {here}")
