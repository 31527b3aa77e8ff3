"""Command-line apps (Hydra): ``uio-train`` (:mod:`uio.cli.train`), ``uio-eval`` (:mod:`uio.cli.eval`).

Both read the Hydra tree shipped inside the package (``uio/conf``, the repository's ``conf/``),
located with :func:`uio.paths.package_conf_dir`, so they work from any working directory and from
an installed wheel.
"""
from __future__ import annotations

from pathlib import Path

from uio.paths import package_conf_dir

__all__ = ["conf_dir", "list_options"]


def conf_dir() -> str:
    """Absolute path of the config tree (what ``hydra.main(config_path=...)`` receives)."""
    return str(package_conf_dir().resolve())


def list_options(group: str) -> list[str]:
    """Names of the options of a config group, e.g. ``list_options("experiment")``."""
    d = Path(conf_dir()) / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []
