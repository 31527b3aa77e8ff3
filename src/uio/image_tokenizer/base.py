"""The image-tokenizer interface and its registry.

An image tokenizer turns images ``(B, 3, H, W)`` in ``[-1, 1]`` into discrete codes ``(B, gh*gw)`` in
row-major order (code ``r * gw + c`` is grid cell row ``r``, column ``c``) and back. Unified-IO
keeps it inside the model, frozen, to tokenise image targets on the fly (UIO §3.1; the release
uses taming-transformers' ImageNet VQ-GAN, f=16, 16384 codes).

Another tokenizer plugs in by subclassing :class:`ImageTokenizer`, registering a builder with
:func:`register_image_tokenizer` and adding a ``conf/tokenizer/<name>.yaml`` whose keys are the spec
that :func:`build_image_tokenizer` receives.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

SpecBuilder = Callable[[dict[str, Any]], "ImageTokenizer"]
_REGISTRY: dict[str, SpecBuilder] = {}


class ImageTokenizer(nn.Module):
    """Base class: discrete image codes. Subclasses set the three attributes and implement
    :meth:`_encode`, :meth:`_decode` and :meth:`spec`; inputs are validated here."""

    num_codes: int  # codebook size
    grid: tuple[int, int]  # (gh, gw) code grid
    image_size: tuple[int, int]  # (H, W) image size it encodes / decodes

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False

    # ---- the interface ------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Codes per image (gh * gw)."""
        return self.grid[0] * self.grid[1]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float in [-1, 1] -> LongTensor (B, gh*gw) of row-major codes."""
        self.check_images(images)
        codes = self._encode(images)
        return codes.reshape(images.shape[0], self.num_tokens).long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, gh*gw) (or (B, gh, gw)) -> FloatTensor (B, 3, H, W) in about [-1, 1]."""
        codes = self.check_codes(codes)
        return self._decode(codes)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """The dict that :func:`build_image_tokenizer` turns back into this architecture (weights
        travel separately: in the owner's state dict or via a ``weights`` entry)."""
        raise NotImplementedError

    # ---- freezing -----------------------------------------------------------------------------
    def freeze(self) -> "ImageTokenizer":
        """Eval mode for good, no gradients: how :class:`uio.Model` holds it."""
        self.requires_grad_(False)
        super().train(False)
        self._frozen = True
        return self

    @property
    def frozen(self) -> bool:
        return self._frozen

    def train(self, mode: bool = True) -> "ImageTokenizer":
        # A frozen tokenizer stays in eval mode when its owner calls .train().
        return super().train(False if self._frozen else mode)

    # ---- validation ---------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor, range_tol: float = 1e-3) -> None:
        """Raise a clear error unless ``images`` is float (B, 3, H, W) of this size in [-1, 1]."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype} "
                            "(convert uint8 with x / 127.5 - 1)")
        if tuple(images.shape[2:]) != tuple(self.image_size):
            raise ValueError(f"images must be {self.image_size[0]}x{self.image_size[1]} (H x W) for this "
                             f"tokenizer, got {images.shape[2]}x{images.shape[3]}")
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo < -1 - range_tol or hi > 1 + range_tol:
                raise ValueError(f"images must be in [-1, 1], got values in [{lo:.3f}, {hi:.3f}] "
                                 "(ImageNet-normalised or [0, 255] input?)")

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Validate codes and return them as (B, gh*gw) int64."""
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes must be a torch.Tensor (B, {self.num_tokens}), got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        gh, gw = self.grid
        if codes.dim() == 3 and tuple(codes.shape[1:]) == (gh, gw):
            codes = codes.reshape(codes.shape[0], gh * gw)
        if codes.dim() != 2 or codes.shape[1] != gh * gw:
            raise ValueError(f"codes must have shape (B, {gh * gw}) for a {gh}x{gw} grid, got {tuple(codes.shape)}")
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.num_codes:
                raise ValueError(f"codes must be in [0, {self.num_codes}), got values in [{lo}, {hi}] "
                                 "(unified-vocabulary ids? subtract Vocab.image_offset first)")
        return codes.long()

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, grid={tuple(self.grid)}, image_size={tuple(self.image_size)}"
                + (", frozen" if self._frozen else ""))


# ---- registry ---------------------------------------------------------------------------------
def register_image_tokenizer(name: str) -> Callable[[SpecBuilder], SpecBuilder]:
    """Decorator: ``@register_image_tokenizer("vqgan")`` on a function ``spec -> ImageTokenizer``
    or on an :class:`ImageTokenizer` subclass with a ``from_spec(spec)`` classmethod."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an image tokenizer name must be a non-empty string, got {name!r}")

    def wrap(obj):
        if name in _REGISTRY:
            raise ValueError(f"image tokenizer {name!r} is already registered")
        if isinstance(obj, type):
            if not hasattr(obj, "from_spec"):
                raise TypeError(f"{obj.__name__} needs a from_spec(spec) classmethod to be registered")
            _REGISTRY[name] = obj.from_spec
        else:
            _REGISTRY[name] = obj
        return obj

    return wrap


def available_image_tokenizers() -> list[str]:
    return sorted(_REGISTRY)


def _plain(spec: Any) -> dict[str, Any]:
    """A spec as a plain dict (accepts OmegaConf DictConfig from a Hydra config group)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(spec, DictConfig):
            spec = OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    if not isinstance(spec, Mapping):
        raise TypeError(f"an image-tokenizer spec must be a dict like {{'name': 'vqgan', ...}}, got {type(spec).__name__}")
    return dict(spec)


def build_image_tokenizer(spec: Mapping[str, Any]) -> ImageTokenizer:
    """Build a tokenizer from its spec, e.g. ``{"name": "vqgan", "config": "vqgan_toy", "weights": ...}``.

    Optional checks ``num_codes``, ``grid`` (and, for tokenizers that do not take it as an
    argument, ``image_size``) are compared with the built tokenizer, so a config that interpolates
    them into the model cannot silently disagree with the tokenizer it names.
    """
    spec = _plain(spec)
    name = spec.get("name")
    if name not in _REGISTRY:
        raise ValueError(f"unknown image tokenizer {name!r}; expected one of {available_image_tokenizers()}")
    checks = {k: spec.pop(k) for k in ("num_codes", "grid") if k in spec}
    tok = _REGISTRY[name](spec)
    if not isinstance(tok, ImageTokenizer):
        raise TypeError(f"the builder of {name!r} returned {type(tok).__name__}, not an ImageTokenizer")
    if "num_codes" in checks and int(checks["num_codes"]) != tok.num_codes:
        raise ValueError(f"spec says num_codes={checks['num_codes']} but {name!r} has {tok.num_codes} codes")
    if "grid" in checks and tuple(int(v) for v in checks["grid"]) != tuple(tok.grid):
        raise ValueError(f"spec says grid={tuple(checks['grid'])} but {name!r} has grid {tuple(tok.grid)}")
    return tok
