"""Real English text that ships with installed packages, and the embedded toy text tokenizer.

Sources (no download, ever):

* ``pydoc``: CPython's ``pydoc_data.topics`` (always present): the Python reference prose;
* ``lee``: gensim's test data, the Lee corpus of Australian news articles (``lee_background.cor``,
  ``lee.cor``), when gensim is installed;
* ``wikipedia``: gensim's shortened English Wikipedia dump (206 pages), wiki markup stripped with
  ``gensim.corpora.wikicorpus.filter_wiki``, when gensim is installed.

:func:`iter_corpus_lines` yields clean prose paragraphs; :func:`iter_passages` cuts them into
passages for span corruption with a fixed train/val split; :func:`build_toy_text_tokenizer`
trains a small SentencePiece model (pad 0, eos 1, unk 2, no BOS) on this text plus the toy
world's own vocabulary.
"""
from __future__ import annotations

import bz2
import functools
import importlib.util
import logging
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from uio import paths

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("pydoc", "lee", "wikipedia")
TOY_TOKENIZER_NAME = "spiece_toy"
DEFAULT_TOY_VOCAB = 3000
_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_SPACES = re.compile(r"\s+")


def _gensim_test_data() -> Path | None:
    """gensim's ``test/test_data`` folder, found without importing gensim; None if not installed."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    return folder if folder.is_dir() else None


def available_sources() -> list[str]:
    """The corpus sources present in this environment (``pydoc`` always)."""
    out = ["pydoc"]
    data = _gensim_test_data()
    if data is not None and (data / "lee_background.cor").is_file():
        out.append("lee")
    if data is not None and (data / _WIKI_DUMP).is_file():
        out.append("wikipedia")
    return out


def _is_prose(text: str, min_chars: int) -> bool:
    if len(text) < min_chars:
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / len(text) > 0.85 and text.count(" ") >= 5


def _pydoc_lines(min_chars: int) -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.splitlines()
            # code samples, grammar rules and headings are indented or underlined: skip them
            if not lines or lines[0].startswith((" ", "\t", ">>>")) or set(lines[-1].strip()) <= set("*=-~"):
                continue
            text = _SPACES.sub(" ", " ".join(ln.strip() for ln in lines)).strip()
            text = text.lstrip("* ").replace("“", '"').replace("”", '"').replace("‘", "'").replace("’", "'")
            if _is_prose(text, min_chars):
                yield text


def _lee_lines(min_chars: int) -> Iterator[str]:
    data = _gensim_test_data()
    for fname in ("lee_background.cor", "lee.cor"):
        path = data / fname if data is not None else None
        if path is None or not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            text = _SPACES.sub(" ", line).strip()
            if _is_prose(text, min_chars):
                yield text


def _wikipedia_lines(min_chars: int) -> Iterator[str]:
    data = _gensim_test_data()
    dump = data / _WIKI_DUMP if data is not None else None
    if dump is None or not dump.is_file():
        return
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.BZ2File(dump) as stream:
        for _title, text, _pageid in extract_pages(stream):
            clean = filter_wiki(text)
            for para in re.split(r"\n\s*\n|\n(?==)", clean):
                para = para.strip()
                if not para or para.startswith(("=", "#", "*", "|", "{", "!", ":", ";")):
                    continue
                para = re.sub(r"'{2,}", "", para)
                para = _SPACES.sub(" ", para).replace(" ,", ",").replace(" .", ".").strip()
                if _is_prose(para, min_chars):
                    yield para


_READERS = {"pydoc": _pydoc_lines, "lee": _lee_lines, "wikipedia": _wikipedia_lines}


def iter_corpus_lines(sources: Sequence[str] | None = None, min_chars: int = 40) -> Iterator[str]:
    """Clean English prose paragraphs (one per item, whitespace collapsed) from ``sources``
    (default: every available source, in the order of :data:`SOURCES`)."""
    have = available_sources()
    if sources is None:
        sources = have
    for name in sources:
        if name not in _READERS:
            raise ValueError(f"unknown text source {name!r}; expected some of {list(SOURCES)}")
        if name not in have:
            raise FileNotFoundError(f"text source {name!r} is not installed here (gensim missing?); "
                                    f"available: {have}")
    for name in sources:
        yield from _cached_lines(name, min_chars)


@functools.lru_cache(maxsize=8)
def _cached_lines(name: str, min_chars: int) -> tuple[str, ...]:
    """A source's paragraphs, read once per process (the Wikipedia dump takes ~2 s to clean)."""
    return tuple(_READERS[name](min_chars))


def split_of(text: str, val_percent: int = 5) -> str:
    """A stable train/val assignment of a passage from its crc32 ("val" for ``val_percent``%)."""
    return "val" if zlib.crc32(text.encode("utf-8")) % 100 < val_percent else "train"


def iter_passages(split: str = "train", max_words: int = 96, min_words: int = 12,
                  sources: Sequence[str] | None = None, val_percent: int = 5) -> Iterator[str]:
    """Passages of at most ``max_words`` words (whole sentences where possible) for span
    corruption. Each passage belongs to one split, fixed by its text (:func:`split_of`)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    for para in iter_corpus_lines(sources):
        words: list[str] = []
        for sentence in re.split(r"(?<=[.!?])\s+", para):
            sw = sentence.split()
            if words and len(words) + len(sw) > max_words:
                yield from _emit(words, split, min_words, val_percent)
                words = []
            words.extend(sw)
            while len(words) > max_words:  # one very long sentence
                yield from _emit(words[:max_words], split, min_words, val_percent)
                words = words[max_words:]
        yield from _emit(words, split, min_words, val_percent)


def _emit(words: list[str], split: str, min_words: int, val_percent: int) -> Iterator[str]:
    if len(words) >= min_words:
        text = " ".join(words)
        if split_of(text, val_percent) == split:
            yield text


# ---- the toy text tokenizer ----------------------------------------------------------------------
def toy_world_texts(num_scenes: int = 300, seed: int = 12345) -> list[str]:
    """Sentences the toy world produces (captions, questions, answers, expressions, descriptions),
    from small renders, so that the tokenizer keeps the toy world's words whole."""
    import numpy as np

    from uio.data.toyworld_scene import SceneConfig, sample_scene
    from uio.data.toyworld_tasks import scene_examples

    cfg = SceneConfig(image_size=(48, 48))
    out: list[str] = []
    for i in range(num_scenes):
        scene = sample_scene(np.random.default_rng([seed, i]), cfg)
        for exs in scene_examples(scene, np.random.default_rng([seed, i, 1]), f"tok{i}").values():
            for ex in exs:
                out.extend(_strings(ex))
    return list(dict.fromkeys(out))


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in ("id", "dataset", "candidates"):
                yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def toy_tokenizer_dir() -> Path:
    return paths.tokenizers_dir() / TOY_TOKENIZER_NAME


def build_toy_text_tokenizer(out_dir: str | Path | None = None, vocab_size: int = DEFAULT_TOY_VOCAB,
                             extra_texts: Iterable[str] | None = None, toy_scenes: int = 300,
                             max_lines: int = 60_000):
    """Train the toy SentencePiece model on packaged text + toy-world text; returns a
    :class:`uio.text_tokenizer.TextTokenizer` saved in ``out_dir/spiece.model``."""
    from uio.text_tokenizer import TextTokenizer

    if not 100 <= vocab_size <= 64_000:
        raise ValueError(f"vocab_size must be in [100, 64000], got {vocab_size}")
    out = Path(out_dir) if out_dir is not None else toy_tokenizer_dir()
    lines = []
    for line in iter_corpus_lines():
        lines.append(line)
        if len(lines) >= max_lines:
            break
    toy = toy_world_texts(toy_scenes) if toy_scenes else []
    # the toy world's sentences are short and repetitive: repeat them so they weigh like real text
    lines += toy * 3
    if extra_texts is not None:
        lines += [t for t in extra_texts if t.strip()]
    log.info("training the toy text tokenizer (%d pieces) on %d lines -> %s", vocab_size, len(lines), out)
    return TextTokenizer.train(lines, out, vocab_size=vocab_size)


def ensure_toy_text_tokenizer(out_dir: str | Path | None = None, vocab_size: int = DEFAULT_TOY_VOCAB):
    """The toy tokenizer at ``out_dir`` (default ``$UIO_HOME/tokenizers/spiece_toy``), trained on
    first use."""
    from uio.text_tokenizer import MODEL_FILENAME, TextTokenizer

    out = Path(out_dir) if out_dir is not None else toy_tokenizer_dir()
    if (out / MODEL_FILENAME).is_file():
        return TextTokenizer.from_dir(out)
    return build_toy_text_tokenizer(out, vocab_size=vocab_size)
