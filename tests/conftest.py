"""Shared fixtures. Every test runs offline with a private UIO_HOME."""
from __future__ import annotations

import os

import pytest
import torch

# The suite runs as 2 xdist workers on 2 cores: one intra-op thread each avoids oversubscription,
# which otherwise stalls the many small tensor ops in these tests.
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread per test, restored afterwards (a test or a recipe it runs
    may change the count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _private_uio_home(tmp_path_factory, monkeypatch):
    """Artefacts built during a test never touch the user's ~/.cache/uio."""
    monkeypatch.setenv("UIO_HOME", str(tmp_path_factory.mktemp("uio_home")))


def _corpus_lines() -> list[str]:
    import pydoc_data.topics as topics

    lines = [ln for text in topics.topics.values() for ln in text.splitlines() if ln.strip()]
    shapes = ["cube", "sphere", "cylinder", "cone"]
    colors = ["red", "green", "blue", "yellow", "purple", "gray"]
    lines += [f"a {c} {s} is left of the {c2} {s2} ." for c in colors for s in shapes for c2 in colors for s2 in shapes]
    return lines


@pytest.fixture(scope="session")
def text_tokenizer(tmp_path_factory):
    """A small SentencePiece model (1000 pieces) trained on CPython's bundled docs; ~1 s."""
    from uio.text_tokenizer import TextTokenizer

    return TextTokenizer.train(_corpus_lines(), tmp_path_factory.mktemp("spiece"), vocab_size=1000)
