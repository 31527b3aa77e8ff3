"""Model configuration: the released sizes (small/base/large/xl) plus small CPU sizes."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uio.vocab import Vocab

# name: (d_model, encoder layers, decoder layers, heads, d_ff, segment embeddings)
# From the original UnifiedIOConfig / uio/configs.py. head_dim is 64 for every size, so heads*64
# differs from d_model for `small` (384 vs 512).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=256, num_encoder_layers=4, num_decoder_layers=4, num_heads=4, d_ff=768, num_segments=2),
    "mini": dict(d_model=384, num_encoder_layers=6, num_decoder_layers=6, num_heads=6, d_ff=1024, num_segments=2),
    "small": dict(d_model=512, num_encoder_layers=8, num_decoder_layers=8, num_heads=6, d_ff=1024, num_segments=2),
    "base": dict(d_model=768, num_encoder_layers=12, num_decoder_layers=12, num_heads=12, d_ff=2048, num_segments=2),
    "large": dict(d_model=1024, num_encoder_layers=24, num_decoder_layers=24, num_heads=16, d_ff=2816, num_segments=2),
    "xl": dict(d_model=2048, num_encoder_layers=24, num_decoder_layers=24, num_heads=32, d_ff=5120, num_segments=8),
}


@dataclass
class ModelConfig:
    """Everything needed to build the network. Sizes are data (see :data:`SIZES`)."""

    name: str = "small"
    d_model: int = 512
    num_heads: int = 6
    head_dim: int = 64  # its own field: heads * head_dim need not equal d_model
    d_ff: int = 1024  # width of each of the two gated-GELU input projections
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    num_segments: int = 2
    # vocabulary
    text_vocab: int = 32000  # SentencePiece size N
    image_vocab: int = 16384  # image-tokenizer codebook size
    # geometry / lengths
    encoder_max_text_len: int = 256
    decoder_max_text_len: int = 256
    image_input_size: tuple[int, int] = (384, 384)
    patch_size: int = 16
    image_target_grid: tuple[int, int] = (16, 16)  # image-tokenizer code grid (decoder image slots)
    image_target_size: tuple[int, int] = (256, 256)  # image-tokenizer image size
    # relative position buckets
    rel_num_buckets: int = 32
    rel_max_distance: int = 128
    img_rel_num_buckets: int = 8
    img_rel_max_distance: int = 20
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    # add the decoder's cross-attention absolute position bias (decoder slot x encoder token, through
    # cross_position_{q,k}_linear), which the original computes but never applies: False reproduces
    # the released network; True is for models trained here (see uio.modeling.network)
    cross_position_bias: bool = False
    # initialise the image position embeddings (encoder patches, decoder image slots) with 2-D sin-cos
    # tables and the location-token embeddings with the matching 1-D table, all in location-bin units,
    # instead of N(0, 1): a patch, the decoder slot over it and the location bins of its coordinates
    # start on one ordinal basis. Initialisation only (the parameters stay learnable, the checkpoint
    # format is unchanged); for training from scratch (see UnifiedIONetwork.init_weights)
    sincos_init: bool = False
    # image tokenizer spec (see uio.image_tokenizer.build_image_tokenizer); None = codes only
    image_tokenizer: dict[str, Any] | None = field(default=None)

    def __post_init__(self):
        self.image_input_size = tuple(int(v) for v in self.image_input_size)
        self.image_target_grid = tuple(int(v) for v in self.image_target_grid)
        self.image_target_size = tuple(int(v) for v in self.image_target_size)
        for name in ("d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers", "num_decoder_layers",
                     "num_segments", "encoder_max_text_len", "decoder_max_text_len", "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        h, w = self.image_input_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image_input_size {self.image_input_size} must be divisible by patch_size {self.patch_size}")
        self.vocab  # validates the vocabulary fields

    # ---- derived ------------------------------------------------------------------------------
    @property
    def vocab(self) -> Vocab:
        return Vocab(text_vocab=self.text_vocab, image_vocab=self.image_vocab)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def patch_grid(self) -> tuple[int, int]:
        return (self.image_input_size[0] // self.patch_size, self.image_input_size[1] // self.patch_size)

    @property
    def encoder_max_image_len(self) -> int:
        gh, gw = self.patch_grid
        return gh * gw

    @property
    def decoder_max_image_len(self) -> int:
        return self.image_target_grid[0] * self.image_target_grid[1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_size(cls, name: str, **overrides) -> "ModelConfig":
        """``ModelConfig.from_size("xl")``; keyword overrides replace any field."""
        if name not in SIZES:
            raise ValueError(f"unknown model size {name!r}; expected one of {sorted(SIZES)}")
        return cls.from_dict({"name": name, **SIZES[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("image_input_size", "image_target_grid", "image_target_size"):
            d[k] = list(d[k])
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
