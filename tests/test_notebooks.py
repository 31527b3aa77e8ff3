"""The notebooks run top to bottom (nbclient, the venv's kernel) on a tiny model built here.

``notebooks/quickstart.ipynb`` reads ``$UIO_MODEL``; the test points it at a tiny random model so
the run is quick, and checks that every code cell ran and that the pictures were drawn.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _execute(path: Path, env: dict[str, str], timeout: int = 600):
    nb = nbformat.read(path, as_version=4)
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


def test_quickstart_runs_every_task(text_tokenizer, tmp_path):
    from test_inference import tiny_model

    model_dir = tiny_model(text_tokenizer).save_pretrained(tmp_path / "model")
    nb = _execute(NOTEBOOKS / "quickstart.ipynb", {"UIO_MODEL": str(model_dir), "UIO_HOME": str(tmp_path / "home"),
                                                   "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
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
