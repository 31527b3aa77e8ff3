"""Image pre/post-processing and the :class:`Processor` every task encodes and decodes with.

Follows the original release (``uio/utils.py`` of allenai/unified-io-inference):

* input images: longest side resized to the model size (bilinear, antialias), zero-padded
  bottom/right, ImageNet normalisation *after* padding (pad pixels become ``-mean/std``);
* the patch mask: a patch is visible if it holds any real (non-padding) pixel. The original
  nearest-resized the pixel mask to the patch grid, i.e. sampled each patch's top-left pixel;
  because the real pixels form a rectangle anchored at the top-left, the two rules agree;
* target images: resize-padded to the image-tokenizer size and mapped with ``x * 2 - 1``, with a
  mask over the code grid;
* undo: crop the padding, resize back to the original size (nearest for dense maps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from uio.vocab import Vocab

if TYPE_CHECKING:  # pragma: no cover
    from uio.config import ModelConfig
    from uio.text_tokenizer import TextTokenizer

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

_INTERP = {"bilinear", "nearest", "bicubic"}


# ---- conversion -------------------------------------------------------------------------------
def to_float_image(image: Any) -> np.ndarray:
    """Any supported image -> float32 ``(H, W, 3)`` in [0, 1].

    Accepts PIL images, numpy ``uint8`` HWC/HW, float HWC/HW in [0, 1], torch ``(3, H, W)`` /
    ``(1, H, W)`` / ``(H, W)`` tensors (uint8, or float in [0, 1]). Grayscale is repeated to RGB,
    RGBA drops alpha.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):  # tensors are CHW (torchvision convention)
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"unsupported image type {type(image).__name__}; expected a PIL image, a numpy array (H, W, 3) "
            "uint8 or float in [0, 1], or a torch tensor (3, H, W)")
    arr = image
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 1|3|4) or a (3, H, W) tensor, got shape {image.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image has an empty side: shape {image.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise ValueError("image contains NaN or inf values")
        lo, hi = float(out.min()), float(out.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(
                f"float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; pass uint8 for 0-255 data")
        return np.clip(out, 0.0, 1.0)
    raise TypeError(f"unsupported image dtype {arr.dtype}; expected uint8, bool or float in [0, 1]")


def to_uint8(image_hwc: np.ndarray) -> np.ndarray:
    """Float ``(H, W, C)`` in [0, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(image_hwc, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def resize(array: np.ndarray, size: tuple[int, int], mode: str = "bilinear", antialias: bool | None = None) -> np.ndarray:
    """Resize a float ``(H, W)`` or ``(H, W, C)`` array to ``size=(h, w)`` with torch.

    ``antialias`` defaults to True for bilinear/bicubic (as torchvision's resize) and is not used
    for nearest. Nearest samples pixel centres (torch's ``nearest-exact``): the original's legacy
    rule (``floor(i * in / out)``) shifts content by up to a pixel, so a label map resized up and
    back down with it does not come back; with pixel centres it does.
    """
    if mode not in _INTERP:
        raise ValueError(f"resize mode must be one of {sorted(_INTERP)}, got {mode!r}")
    arr = np.asarray(array)
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"resize target must be positive, got {size}")
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    if arr.shape[:2] == (h, w):
        out = arr.astype(np.float32)
        return out[:, :, 0] if squeeze else out
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, C, H, W)
    if mode == "nearest":
        t = F.interpolate(t, size=(h, w), mode="nearest-exact")
    else:
        aa = True if antialias is None else antialias
        t = F.interpolate(t, size=(h, w), mode=mode, align_corners=False, antialias=aa)
    out = t[0].permute(1, 2, 0).numpy()
    return out[:, :, 0] if squeeze else out


# ---- geometry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResizeInfo:
    """How an image was resized and padded; enough to undo it."""

    original_hw: tuple[int, int]
    scaled_hw: tuple[int, int]  # size of the real content inside the padded canvas
    padded_hw: tuple[int, int]

    @property
    def scale(self) -> float:
        """Resize factor original -> canvas (before the integer truncation of the scaled size)."""
        return min(self.padded_hw[0] / self.original_hw[0], self.padded_hw[1] / self.original_hw[1])

    def to_dict(self) -> dict[str, list[int]]:
        return {k: list(getattr(self, k)) for k in ("original_hw", "scaled_hw", "padded_hw")}


def scaled_size(original_hw: Sequence[int], canvas_hw: Sequence[int]) -> tuple[int, int]:
    """Size after fitting the longest side into ``canvas_hw`` (aspect ratio kept, as the original)."""
    h, w = int(original_hw[0]), int(original_hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {tuple(original_hw)}")
    scale = min(canvas_hw[0] / h, canvas_hw[1] / w)
    if scale == 1.0:
        return h, w
    return max(1, min(int(canvas_hw[0]), int(h * scale))), max(1, min(int(canvas_hw[1]), int(w * scale)))


def resize_and_pad(image: np.ndarray, canvas_hw: Sequence[int], mode: str = "bilinear") -> tuple[np.ndarray, np.ndarray, ResizeInfo]:
    """Float ``(H, W, C)`` -> ``(canvas_h, canvas_w, C)`` zero-padded bottom/right, pixel mask, info."""
    h, w = image.shape[:2]
    ch, cw = int(canvas_hw[0]), int(canvas_hw[1])
    sh, sw = scaled_size((h, w), (ch, cw))
    scaled = resize(image, (sh, sw), mode=mode)
    if scaled.ndim == 2:
        scaled = scaled[:, :, None]
    out = np.zeros((ch, cw, scaled.shape[-1]), dtype=np.float32)
    out[:sh, :sw] = scaled
    mask = np.zeros((ch, cw), dtype=bool)
    mask[:sh, :sw] = True
    return out, mask, ResizeInfo((h, w), (sh, sw), (ch, cw))


def patch_mask_from_pixels(pixel_mask: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Bool pixel mask ``(H, W)`` -> flat bool patch mask ``(gh * gw,)``, row-major.

    A patch is visible when it holds any real pixel (see the module docstring for why this equals
    the original's nearest resize of the padding mask).
    """
    gh, gw = int(grid[0]), int(grid[1])
    H, W = pixel_mask.shape
    if H % gh or W % gw:
        raise ValueError(f"pixel mask {pixel_mask.shape} is not divisible into a {gh}x{gw} patch grid")
    blocks = pixel_mask.reshape(gh, H // gh, gw, W // gw)  # (gh, ph, gw, pw)
    return blocks.any(axis=(1, 3)).reshape(-1)


def region_patch_mask(box: Sequence[float], info: ResizeInfo, grid: Sequence[int]) -> np.ndarray:
    """Flat bool ``(gh * gw,)``: True for patches that overlap ``box`` (original-image pixels).

    Used to hide the inpainting region. Any overlapping patch is hidden (the original hid a patch
    only when its top-left pixel fell inside the box, which leaks parts of the blanked object).
    """
    box = np.asarray(box, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)):
        raise ValueError(f"a region must be 4 finite numbers [x1, y1, x2, y2], got {box.tolist()}")
    s = info.scale
    x1, y1, x2, y2 = np.round(box * s).astype(np.int64)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    H, W = info.padded_hw
    pm = np.zeros((H, W), dtype=bool)
    pm[max(0, y1) : max(0, min(H, y2)), max(0, x1) : max(0, min(W, x2))] = True
    return patch_mask_from_pixels(pm, grid)


def undo_resize_and_pad(image_hwc: np.ndarray, original_hw: Sequence[int], mode: str = "nearest") -> np.ndarray:
    """Crop the padding off a canvas-sized output and resize it back to ``original_hw``.

    ``image_hwc`` is ``(Hc, Wc)`` or ``(Hc, Wc, C)`` at the canvas size the target was built at
    (the image-tokenizer size); the content region is recomputed from ``original_hw``.
    """
    arr = np.asarray(image_hwc, dtype=np.float32)
    sh, sw = scaled_size(original_hw, arr.shape[:2])
    cropped = arr[:sh, :sw]
    return resize(cropped, (int(original_hw[0]), int(original_hw[1])), mode=mode, antialias=False)


def normalize(image_hwc: np.ndarray) -> np.ndarray:
    """ImageNet normalisation of a float ``(H, W, 3)`` image in [0, 1]."""
    return (image_hwc - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(image_chw: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize` for a ``(3, H, W)`` array; returns ``(H, W, 3)``."""
    return np.transpose(image_chw, (1, 2, 0)) * IMAGENET_STD + IMAGENET_MEAN


# ---- the processor ----------------------------------------------------------------------------
@dataclass
class ImageInput:
    image: np.ndarray  # float32 (3, H, W), normalised
    mask: np.ndarray  # bool (P,), visible patches
    info: ResizeInfo | None


@dataclass
class ImageTarget:
    image: np.ndarray | None  # float32 (3, Ht, Wt) in [-1, 1]
    mask: np.ndarray  # bool (Ni,)
    info: ResizeInfo | None


class Processor:
    """Text and image processing shared by every task: the tokenizer, the vocabulary and geometry."""

    def __init__(self, text_tokenizer: "TextTokenizer", vocab: Vocab | None = None,
                 image_input_size: Sequence[int] = (384, 384), patch_size: int = 16,
                 image_target_size: Sequence[int] = (256, 256), image_target_grid: Sequence[int] = (16, 16),
                 max_input_len: int = 256, max_target_len: int = 256):
        if text_tokenizer is None:
            raise ValueError("Processor needs a TextTokenizer (uio.text_tokenizer.TextTokenizer)")
        self.text_tokenizer = text_tokenizer
        self.vocab = vocab if vocab is not None else text_tokenizer.vocab
        if self.vocab.text_vocab != text_tokenizer.vocab.text_vocab:
            raise ValueError(
                f"the text tokenizer has {text_tokenizer.vocab.text_vocab} pieces but the vocabulary expects "
                f"text_vocab={self.vocab.text_vocab}; set ModelConfig.text_vocab to the tokenizer's size")
        self.image_input_size = (int(image_input_size[0]), int(image_input_size[1]))
        self.patch_size = int(patch_size)
        if self.image_input_size[0] % self.patch_size or self.image_input_size[1] % self.patch_size:
            raise ValueError(f"image_input_size {self.image_input_size} must be divisible by patch_size {patch_size}")
        self.image_target_size = (int(image_target_size[0]), int(image_target_size[1]))
        self.image_target_grid = (int(image_target_grid[0]), int(image_target_grid[1]))
        if self.image_target_size[0] % self.image_target_grid[0] or self.image_target_size[1] % self.image_target_grid[1]:
            raise ValueError(
                f"image_target_size {self.image_target_size} must be divisible by image_target_grid {self.image_target_grid}")
        if max_input_len < 2 or max_target_len < 2:
            raise ValueError(f"max text lengths must be >= 2, got {max_input_len}, {max_target_len}")
        self.max_input_len = int(max_input_len)
        self.max_target_len = int(max_target_len)

    @classmethod
    def from_config(cls, config: "ModelConfig", text_tokenizer: "TextTokenizer") -> "Processor":
        return cls(text_tokenizer, vocab=config.vocab, image_input_size=config.image_input_size,
                   patch_size=config.patch_size, image_target_size=config.image_target_size,
                   image_target_grid=config.image_target_grid, max_input_len=config.encoder_max_text_len,
                   max_target_len=config.decoder_max_text_len)

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def patch_grid(self) -> tuple[int, int]:
        return (self.image_input_size[0] // self.patch_size, self.image_input_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    @property
    def num_image_targets(self) -> int:
        return self.image_target_grid[0] * self.image_target_grid[1]

    # ---- text ----------------------------------------------------------------------------------
    def encode_text(self, text: str, max_len: int | None = None, add_eos: bool = True) -> list[int]:
        """Prompt text -> ids (EOS-terminated, truncated to the encoder length)."""
        return self.text_tokenizer.encode(text, add_eos=add_eos, max_length=max_len or self.max_input_len)

    def encode_target(self, text: str, max_len: int | None = None) -> list[int]:
        """Target text -> ids (EOS-terminated, truncated to the decoder length)."""
        return self.text_tokenizer.encode(text, add_eos=True, max_length=max_len or self.max_target_len)

    def tokens(self, text: str) -> list[int]:
        """Ids of ``text`` with no EOS and no truncation (for assembling sequences piecewise)."""
        return self.text_tokenizer.encode(text, add_eos=False)

    def decode_text(self, ids) -> str:
        return self.text_tokenizer.decode([int(i) for i in ids]).strip()

    def region_text(self, box: Sequence[float], image_hw: Sequence[int]) -> str:
        """A box as the original's ``"<extra_id_a> <extra_id_b> <extra_id_c> <extra_id_d>"`` string."""
        ids = self.vocab.box_to_tokens(box, tuple(image_hw))
        return " ".join(f"<extra_id_{self.vocab.num_sentinels + int(self.vocab.loc_bin(i))}>" for i in ids)

    # ---- images --------------------------------------------------------------------------------
    def image_input(self, image: Any, mask_region: Sequence[float] | None = None) -> ImageInput:
        """Model input image: resize-pad, normalise, patch mask (minus ``mask_region``'s patches)."""
        img = to_float_image(image)
        padded, pixel_mask, info = resize_and_pad(img, self.image_input_size, mode="bilinear")
        mask = patch_mask_from_pixels(pixel_mask, self.patch_grid)
        if mask_region is not None:
            mask &= ~region_patch_mask(mask_region, info, self.patch_grid)
        arr = np.ascontiguousarray(np.transpose(normalize(padded), (2, 0, 1)), dtype=np.float32)
        return ImageInput(arr, mask, info)

    def empty_image_input(self) -> ImageInput:
        """Text-only tasks: a zero image with every patch masked."""
        h, w = self.image_input_size
        return ImageInput(np.zeros((3, h, w), np.float32), np.zeros(self.num_patches, bool), None)

    def image_target(self, image: Any, mode: str = "bilinear", valid: np.ndarray | None = None) -> ImageTarget:
        """Target image: resize-pad to the tokenizer size, ``x * 2 - 1``, mask over the code grid.

        ``mode="nearest"`` keeps label colours pure (segmentation maps). ``valid`` (bool (H, W))
        marks pixels with a label: resizing then averages valid pixels only (normalised
        convolution), so holes do not bleed into their neighbours; pixels mostly covered by holes
        stay black.
        """
        img = to_float_image(image)
        if valid is None:
            padded, pixel_mask, info = resize_and_pad(img, self.image_target_size, mode=mode)
        else:
            v = np.asarray(valid, dtype=np.float32)
            if v.shape != img.shape[:2]:
                raise ValueError(f"valid mask shape {v.shape} does not match the image {img.shape[:2]}")
            stacked = np.concatenate([img * v[..., None], v[..., None]], axis=-1)
            padded, pixel_mask, info = resize_and_pad(stacked, self.image_target_size, mode=mode)
            cover = padded[..., 3:]
            padded = np.where(cover >= 0.5, padded[..., :3] / np.maximum(cover, 1e-6), 0.0)
            padded = np.clip(padded, 0.0, 1.0).astype(np.float32)
        mask = patch_mask_from_pixels(pixel_mask, self.image_target_grid)
        arr = np.ascontiguousarray(np.transpose(padded * 2.0 - 1.0, (2, 0, 1)), dtype=np.float32)
        return ImageTarget(arr, mask, info)

    def empty_image_target(self) -> ImageTarget:
        return ImageTarget(None, np.zeros(self.num_image_targets, bool), None)

    def output_image(self, image: Any, original_hw: Sequence[int] | None = None, mode: str = "nearest") -> np.ndarray | None:
        """A generated image ``(3, Ht, Wt)`` in [-1, 1] -> float ``(H, W, 3)`` in [0, 1] at ``original_hw``.

        Returns None when ``image`` is not a 3-channel image (a generation of the wrong modality).
        ``original_hw=None`` keeps the full canvas.
        """
        arr = as_chw_image(image)
        if arr is None:
            return None
        hwc = np.clip((np.transpose(arr, (1, 2, 0)) + 1.0) / 2.0, 0.0, 1.0)
        if original_hw is None:
            return hwc
        return np.clip(undo_resize_and_pad(hwc, original_hw, mode=mode), 0.0, 1.0)


def as_chw_image(image: Any) -> np.ndarray | None:
    """``(3, H, W)`` float array from a tensor/array (``(H, W, 3)`` accepted), or None if unusable."""
    if image is None:
        return None
    try:
        arr = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        return None
    if arr.shape[0] != 3 and arr.shape[-1] == 3:
        arr = np.transpose(arr, (2, 0, 1))
    if arr.shape[0] != 3 or arr.shape[1] == 0 or arr.shape[2] == 0:
        return None
    return np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
