"""SentencePiece text tokenizer placed inside the unified vocabulary.

Loads any SentencePiece ``.model`` (T5's ``spiece.model`` reproduces the released ids) and maps the
T5 strings ``<extra_id_k>`` onto the unified layout of :mod:`uio.vocab`: ``k < 100`` is sentinel k,
``k >= 100`` is location bin ``k - 100``. It can also train a new model offline from text.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from uio.vocab import EXTRA_ID_RE, Vocab

MODEL_FILENAME = "spiece.model"


class TextTokenizer:
    """Text <-> ids in the unified vocabulary. ``pad=0``, ``eos=1``, ``unk=2`` as in T5."""

    def __init__(self, model_file: str | os.PathLike, image_vocab: int = 16384):
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"SentencePiece model {str(path)!r} not found. Pass T5's spiece.model for the released weights, "
                "or train one with TextTokenizer.train(...).")
        self.model_file = path
        self._proto = path.read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        n = self.sp.get_piece_size()
        ids = (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if ids != (0, 1, 2):
            raise ValueError(
                f"{path}: expected pad/eos/unk ids (0, 1, 2) as in T5's spiece.model, got {ids}; "
                "train with pad_id=0, eos_id=1, unk_id=2, bos_id=-1")
        self.vocab = Vocab(text_vocab=n, image_vocab=image_vocab)

    # ---- encoding -----------------------------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def encode(self, text: str, add_eos: bool = True, max_length: int | None = None) -> list[int]:
        """Text -> ids; ``<extra_id_k>`` substrings become single unified ids.

        ``max_length`` truncates (keeping the EOS when ``add_eos``).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        pos = 0
        for m in EXTRA_ID_RE.finditer(text):
            ids += self._encode_plain(text[pos : m.start()])
            ids.append(self.vocab.extra_id(int(m.group(1))))
            pos = m.end()
        ids += self._encode_plain(text[pos:])
        if max_length is not None:
            if max_length < (1 if add_eos else 0):
                raise ValueError(f"max_length must be >= 1 when add_eos=True, got {max_length}")
            ids = ids[: max_length - (1 if add_eos else 0)]
        if add_eos:
            ids.append(self.vocab.eos_id)
        return ids

    def __call__(self, text: str, **kw) -> list[int]:
        return self.encode(text, **kw)

    # ---- decoding -----------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Ids -> text. Stops at EOS, drops pad and image ids, renders locations/sentinels as
        ``<extra_id_k>`` (so decode(encode(s)) round-trips modulo SentencePiece normalisation)."""
        v = self.vocab
        out: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                out.append(self.sp.decode(run))
                run.clear()

        for i in ids:
            i = int(i)
            if i == v.eos_id and stop_at_eos:
                break
            if i == v.pad_id or i == v.eos_id or i >= v.text_vocab_size or i < 0:
                continue
            if i >= v.text_vocab:
                if i < v.sentinel_end:
                    flush()
                    out.append(f"<extra_id_{v.sentinel_end - 1 - i}>")
                continue  # padding ids between the sentinels and the image codes
            run.append(i)
        flush()
        return " ".join(s for s in out if s)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __len__(self) -> int:
        return self.vocab.text_vocab

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        dst = d / MODEL_FILENAME
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(self._proto)
        os.replace(tmp, dst)
        return dst

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, **kw) -> "TextTokenizer":
        d = Path(directory)
        f = d / MODEL_FILENAME if d.is_dir() else d
        return cls(f, **kw)

    # ---- training -----------------------------------------------------------------------------
    @staticmethod
    def train(texts: Iterable[str] | Sequence[str | os.PathLike], out_dir: str | os.PathLike, vocab_size: int,
              model_type: str = "unigram", character_coverage: float = 1.0, num_threads: int = 2,
              seed_sentences: int = 2_000_000, **kw) -> "TextTokenizer":
        """Train a T5-style SentencePiece model (pad 0, eos 1, unk 2, no BOS) offline.

        ``texts`` is either an iterable of lines or a list of text-file paths.
        """
        items = list(texts) if not isinstance(texts, (str, bytes)) else [texts]
        if not items:
            raise ValueError("TextTokenizer.train needs some text: got an empty corpus")
        if all(isinstance(t, os.PathLike) or (isinstance(t, str) and "\n" not in t and Path(t).is_file())
               for t in items):
            lines = (ln for f in items for ln in Path(f).read_text(encoding="utf-8", errors="ignore").splitlines())
        else:
            lines = (ln for t in items for ln in str(t).splitlines())
        lines = [ln.strip() for ln in lines if ln.strip()]
        if not lines:
            raise ValueError("TextTokenizer.train: the corpus has no non-empty lines")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=character_coverage,
            num_threads=num_threads, input_sentence_size=seed_sentences, shuffle_input_sentence=True,
            hard_vocab_limit=False, minloglevel=2, **kw)
        dst = out / MODEL_FILENAME
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(model.getvalue())
        os.replace(tmp, dst)
        return TextTokenizer(dst)


def copy_model_file(src: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Copy a SentencePiece model into ``directory/spiece.model``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(src, d / MODEL_FILENAME))
