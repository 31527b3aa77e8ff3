"""The notebooks run top to bottom (nbclient, the venv's kernel) on a tiny model built here.

``notebooks/quickstart.ipynb`` reads ``$UIO_MODEL``; the tests point it at a tiny random model and
check that every code cell ran and that the pictures were drawn. The default suite runs a smoke
version (loading, the toy-world scene, classification and the sparse-labelling cell, which draws); the whole
notebook runs in the slow suite (a Jupyter kernel on a busy 2-core machine takes ~30-60 s for it).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _execute(path: Path, env: dict[str, str], timeout: int = 600, keep=None):
    nb = nbformat.read(path, as_version=4)
    if keep is not None:  # only the code cells for which keep(source) is true (markdown stays)
        nb.cells = [c for c in nb.cells if c.cell_type != "code" or keep(c.source)]
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _env(model_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {"UIO_MODEL": str(model_dir), "UIO_HOME": str(tmp_path / "home"),
            "MPLBACKEND": "module://matplotlib_inline.backend_inline"}


def test_quickstart_smoke(text_tokenizer, tmp_path):
    """Setup (the $UIO_MODEL model), the toy-world scene, classification and the sparse-labelling pictures."""
    from test_inference import tiny_model

    model_dir = tiny_model(text_tokenizer).save_pretrained(tmp_path / "model")
    keep = ("def find_model", "examples_for_scene", "labels = all_labels()", "dets = model.detect")
    nb = _execute(NOTEBOOKS / "quickstart.ipynb", _env(model_dir, tmp_path),
                  keep=lambda src: any(k in src for k in keep))
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 4 and all(c.get("execution_count") for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert f"loaded {model_dir}" in text and "Detections(" in text
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) == 2


@pytest.mark.slow
def test_quickstart_runs_every_task(text_tokenizer, tmp_path):
    from test_inference import tiny_model

    model_dir = tiny_model(text_tokenizer).save_pretrained(tmp_path / "model")
    nb = _execute(NOTEBOOKS / "quickstart.ipynb", _env(model_dir, tmp_path))
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert f"loaded {model_dir}" in text and "UNTRAINED" not in text
    for needle in ("caption:", "image class:", "depth RMSE", "astronaut:", "summary:"):
        assert needle in text
    pictures = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert pictures >= 5  # the scene; sparse, dense and synthesis outputs; the photos


@pytest.mark.slow
def test_quickstart_without_a_trained_model_says_so_and_still_runs(tmp_path):
    """No $UIO_MODEL and no runs/ export: the notebook explains and runs on an untrained tiny model."""
    import shutil

    nb_path = tmp_path / "quickstart.ipynb"
    shutil.copy(NOTEBOOKS / "quickstart.ipynb", nb_path)
    old = os.environ.pop("UIO_MODEL", None)
    try:
        nb = _execute(nb_path, {"UIO_HOME": str(tmp_path / "home"),
                                "MPLBACKEND": "module://matplotlib_inline.backend_inline"}, timeout=1200)
    finally:
        if old is not None:
            os.environ["UIO_MODEL"] = old
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")
    assert "No trained model found" in text and "uio-train +experiment=tiny_multitask" in text
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
