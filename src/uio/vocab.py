"""The unified Unified-IO vocabulary: one table for text, locations, sentinels and image codes.

Layout (N = SentencePiece size; N = 32000 for the released models, T5's ``spiece.model``)::

    [0, N)                 SentencePiece text (pad 0, eos 1, unk 2)
    [N, N+1000)            1000 location bins, *reversed*: bin b <-> id N+999-b  (T5 <extra_id_{b+100}>)
    [N+1000, N+1100)       the 100 T5 sentinels: <extra_id_i> <-> id N+1099-i
    [N+1100, text_size)    padding up to a multiple of 128 (33152 for N=32000)
    text_size - 1          doubles as the image-decoder BOS (33151)
    [text_size, total)     image codes: code c <-> id text_size + c (16384 for the released VQ-GAN)

The reversed order is what Hugging Face's T5 tokenizer does with ``extra_ids=1100``: ``<extra_id_i>``
is id ``N + 1100 - 1 - i``. The released weights depend on it, so it is kept.

Boxes and points become location tokens y before x, normalised by the padded square (the longest
image side, because inputs are resized with their longest side to the model size and zero-padded
bottom/right), quantised as ``int(999 * v)`` exactly like the original ``region_to_tokens``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

EXTRA_ID_RE = re.compile(r"<extra_id_(\d+)>")


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class Vocab:
    """Id arithmetic of the unified vocabulary, parameterised by the text vocabulary size."""

    text_vocab: int = 32000  # N: SentencePiece pieces
    image_vocab: int = 16384  # image-tokenizer codes
    num_loc_bins: int = 1000
    num_sentinels: int = 100
    pad_to: int = 128
    pad_id: int = 0
    eos_id: int = 1
    unk_id: int = 2

    def __post_init__(self):
        for name in ("text_vocab", "image_vocab", "num_loc_bins", "num_sentinels", "pad_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Vocab.{name} must be a positive int, got {value!r}")
        if self.text_vocab <= 3:
            raise ValueError(f"Vocab.text_vocab must exceed the 3 special ids, got {self.text_vocab}")

    # ---- ranges -------------------------------------------------------------------------------
    @property
    def num_extra_ids(self) -> int:
        return self.num_loc_bins + self.num_sentinels

    @property
    def loc_start(self) -> int:  # id of bin num_loc_bins-1
        return self.text_vocab

    @property
    def loc_end(self) -> int:  # exclusive
        return self.text_vocab + self.num_loc_bins

    @property
    def sentinel_start(self) -> int:  # id of sentinel num_sentinels-1
        return self.loc_end

    @property
    def sentinel_end(self) -> int:
        return self.loc_end + self.num_sentinels

    @property
    def text_vocab_size(self) -> int:
        """Size of the text part of the embedding table (padded; 33152 for N=32000)."""
        return _round_up(self.sentinel_end, self.pad_to)

    @property
    def image_bos_id(self) -> int:
        return self.text_vocab_size - 1

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size

    @property
    def size(self) -> int:
        """Total number of ids (49536 for the released models)."""
        return self.text_vocab_size + self.image_vocab

    # ---- single ids ---------------------------------------------------------------------------
    def loc_id(self, b):
        """Location bin(s) -> token id(s). Works on ints, numpy arrays and tensors."""
        return self.loc_end - 1 - b

    def loc_bin(self, token_id):
        """Token id(s) -> location bin(s). Inverse of :meth:`loc_id` (no off-by-one)."""
        return self.loc_end - 1 - token_id

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index must be in [0, {self.num_sentinels}), got {i}")
        return self.sentinel_end - 1 - i

    def extra_id(self, k: int) -> int:
        """Id of the T5 string ``<extra_id_k>`` (k < 100: sentinel k; k >= 100: location bin k-100)."""
        if not 0 <= k < self.num_extra_ids:
            raise ValueError(f"<extra_id_{k}> is outside [0, {self.num_extra_ids})")
        return self.sentinel_end - 1 - k

    def image_id(self, code):
        return code + self.image_offset

    def image_code(self, token_id):
        return token_id - self.image_offset

    # ---- masks --------------------------------------------------------------------------------
    def is_loc(self, ids):
        return (ids >= self.loc_start) & (ids < self.loc_end)

    def is_sentinel(self, ids):
        return (ids >= self.sentinel_start) & (ids < self.sentinel_end)

    def is_image(self, ids):
        return ids >= self.image_offset

    def is_text(self, ids):
        return ids < self.text_vocab_size

    def text_mask(self, device=None) -> torch.Tensor:
        """Bool (size,) mask of ids a text position may emit."""
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[: self.text_vocab_size] = True
        return m

    def image_mask(self, device=None) -> torch.Tensor:
        """Bool (size,) mask of ids an image position may emit."""
        return ~self.text_mask(device)

    def loc_mask(self, device=None) -> torch.Tensor:
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[self.loc_start : self.loc_end] = True
        return m

    # ---- geometry -----------------------------------------------------------------------------
    def quantize(self, values: np.ndarray, size: float) -> np.ndarray:
        """Coordinates in pixels -> bins, normalised by ``size`` (the longest side)."""
        v = np.asarray(values, dtype=np.float64) / float(size)
        return np.clip((v * (self.num_loc_bins - 1)).astype(np.int64), 0, self.num_loc_bins - 1)

    def dequantize(self, bins: np.ndarray, size: float) -> np.ndarray:
        """Bins -> pixel coordinates at the centre of each bin.

        The original ``tokens_to_regions`` computed ``33100 - id - 100`` = b + 1 (an off-by-one
        against its own encoder) and rejected bin 999; both are bugs and are not copied here.
        """
        b = np.asarray(bins, dtype=np.float64)
        v = np.clip((b + 0.5) / (self.num_loc_bins - 1), 0.0, 1.0)
        return v * float(size)

    def box_to_tokens(self, box, image_hw: tuple[int, int]) -> list[int]:
        """Pixel ``[x1, y1, x2, y2]`` -> 4 location ids in y1, x1, y2, x2 order."""
        box = np.asarray(box, dtype=np.float64).reshape(-1)
        if box.shape != (4,):
            raise ValueError(f"a box must have 4 numbers [x1, y1, x2, y2], got shape {box.shape}")
        size = max(image_hw)
        bins = self.quantize(box[[1, 0, 3, 2]], size)
        return [int(i) for i in self.loc_id(bins)]

    def tokens_to_box(self, ids, image_hw: tuple[int, int]) -> np.ndarray:
        """4 location ids (y1, x1, y2, x2) -> pixel ``[x1, y1, x2, y2]``; ValueError if not locations."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.shape != (4,) or not bool(np.all(self.is_loc(ids))):
            raise ValueError(f"expected 4 location ids in [{self.loc_start}, {self.loc_end}), got {ids.tolist()}")
        yx = self.dequantize(self.loc_bin(ids), max(image_hw))
        return yx[[1, 0, 3, 2]]

    def point_to_tokens(self, xy, image_hw: tuple[int, int]) -> list[int]:
        """Pixel ``(x, y)`` -> 2 location ids (y, x)."""
        x, y = float(xy[0]), float(xy[1])
        bins = self.quantize(np.array([y, x]), max(image_hw))
        return [int(i) for i in self.loc_id(bins)]

    def tokens_to_point(self, ids, image_hw: tuple[int, int]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.shape != (2,) or not bool(np.all(self.is_loc(ids))):
            raise ValueError(f"expected 2 location ids, got {ids.tolist()}")
        y, x = self.dequantize(self.loc_bin(ids), max(image_hw))
        return np.array([x, y])

    def describe(self) -> str:
        return (
            f"text [0, {self.text_vocab}) | locations [{self.loc_start}, {self.loc_end}) | "
            f"sentinels [{self.sentinel_start}, {self.sentinel_end}) | pad to {self.text_vocab_size} "
            f"(image BOS {self.image_bos_id}) | image codes [{self.image_offset}, {self.size})"
        )
