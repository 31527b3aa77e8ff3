"""Packaged real text (pydoc topics, gensim's Lee corpus and Wikipedia sample) and the toy tokenizer."""
from __future__ import annotations

import importlib.util
import re

import pytest

from uio.data import text_corpus as tc

HAS_GENSIM = importlib.util.find_spec("gensim") is not None


def test_pydoc_is_always_there_and_is_prose():
    assert "pydoc" in tc.available_sources()
    lines = list(tc.iter_corpus_lines(["pydoc"]))
    assert len(lines) > 500 and sum(map(len, lines)) > 150_000
    for line in lines:
        assert isinstance(line, str) and len(line) >= 40 and "\n" not in line and "  " not in line
        assert not line.startswith((" ", ">>>"))
    assert any("exception" in ln for ln in lines)


@pytest.mark.skipif(not HAS_GENSIM, reason="gensim (the Lee corpus and Wikipedia sample) is not installed")
def test_gensim_sources_are_clean_real_text():
    assert {"lee", "wikipedia"} <= set(tc.available_sources())
    lee = list(tc.iter_corpus_lines(["lee"]))
    assert len(lee) >= 300  # 300 background + 50 test articles, one per line
    wiki = list(tc.iter_corpus_lines(["wikipedia"]))
    assert len(wiki) > 2000 and sum(map(len, wiki)) > 1_500_000
    markup = re.compile(r"\[\[|\]\]|\{\{|\}\}|'''|<ref|==")
    assert not [w for w in wiki if markup.search(w)][:3]
    assert any("Autism" in w for w in wiki)  # one of the pages in gensim's sample dump


def test_default_corpus_is_every_available_source_in_order():
    first = next(iter(tc.iter_corpus_lines()))
    assert first == next(iter(tc.iter_corpus_lines(["pydoc"])))
    n = sum(1 for _ in tc.iter_corpus_lines())
    assert n == sum(sum(1 for _ in tc.iter_corpus_lines([s])) for s in tc.available_sources())


def test_unknown_source_and_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown text source 'c4'"):
        list(tc.iter_corpus_lines(["c4"]))
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        list(tc.iter_passages("test"))
    with pytest.raises(ValueError, match="min_words <= max_words"):
        list(tc.iter_passages("train", max_words=5, min_words=10))
    with pytest.raises(ValueError, match="vocab_size must be in"):
        tc.build_toy_text_tokenizer(vocab_size=10)


def test_passages_split_disjointly_and_respect_the_length_limit():
    train = list(tc.iter_passages("train", max_words=40, sources=["pydoc"]))
    val = list(tc.iter_passages("val", max_words=40, sources=["pydoc"]))
    assert train and val and not set(train) & set(val)
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.15  # ~5 % held out
    for p in train + val:
        assert 12 <= len(p.split()) <= 40
    assert all(tc.split_of(p) == "val" for p in val)
    assert train == list(tc.iter_passages("train", max_words=40, sources=["pydoc"]))  # deterministic


def test_small_toy_tokenizer_trains_saves_and_is_reused(tmp_path):
    from uio.text_tokenizer import TextTokenizer

    out = tmp_path / "spiece_small"
    tok = tc.build_toy_text_tokenizer(out, vocab_size=400, toy_scenes=4, max_lines=800)
    assert isinstance(tok, TextTokenizer) and (out / "spiece.model").is_file()
    assert (tok.sp.pad_id(), tok.sp.eos_id(), tok.sp.unk_id(), tok.sp.bos_id()) == (0, 1, 2, -1)
    assert 300 <= tok.vocab.text_vocab <= 400
    s = "What color is the large cube left of the person in a red shirt?"
    ids = tok.encode(s)
    assert ids[-1] == 1 and tok.decode(ids) == s
    mtime = (out / "spiece.model").stat().st_mtime_ns
    again = tc.ensure_toy_text_tokenizer(out, vocab_size=400)
    assert (out / "spiece.model").stat().st_mtime_ns == mtime and again.encode(s) == ids


def test_toy_world_texts_cover_the_toy_vocabulary():
    texts = tc.toy_world_texts(num_scenes=6)
    words = {w.strip(".,?:").lower() for t in texts for w in t.split()}
    assert {"what", "color", "the", "floor", "room"} <= words
    assert len(words & {"cube", "sphere", "cylinder", "cone", "pyramid", "person"}) >= 3
    assert texts == tc.toy_world_texts(num_scenes=6)


@pytest.mark.slow
def test_default_toy_tokenizer_keeps_toy_words_whole():
    """The default tokenizer (3000 pieces, ~10-20 s): every toy-world word is one piece."""
    tok = tc.ensure_toy_text_tokenizer()
    assert tok.vocab.text_vocab == tc.DEFAULT_TOY_VOCAB
    from uio.data.toyworld_scene import COLORS, SHAPES

    for word in list(COLORS) + list(SHAPES) + ["person", "left", "right", "behind", "floor", "wall", "waving"]:
        pieces = tok.sp.encode(word, out_type=str)
        assert pieces == ["▁" + word], (word, pieces)
