"""Named colours for segmentation images, and mask extraction from generated colour images.

Unified-IO draws instances/classes in distinct colours on black and names the colours in the text
(paper §3.1). The palette is the original's ``GEN_SEGMENTATION_COLORS`` (the basic HTML colours)
without its duplicated first entry ([255, 0, 0] was named "white" there; here every name matches).
"""
from __future__ import annotations

import numpy as np

PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (255, 0, 0)),
    ("lime", (0, 255, 0)),
    ("blue", (0, 0, 255)),
    ("white", (255, 255, 255)),
    ("gray", (128, 128, 128)),
    ("fuchsia", (255, 0, 255)),
    ("yellow", (255, 255, 0)),
    ("aqua", (0, 255, 255)),
    ("silver", (192, 192, 192)),
    ("maroon", (128, 0, 0)),
    ("olive", (128, 128, 0)),
    ("green", (0, 128, 0)),
    ("teal", (0, 128, 128)),
    ("navy", (0, 0, 128)),
    ("purple", (128, 0, 128)),
)
COLOR_NAMES: tuple[str, ...] = tuple(n for n, _ in PALETTE)
COLOR_RGB: dict[str, tuple[int, int, int]] = dict(PALETTE)
MAX_COLORS = len(PALETTE)
MIN_COMPONENT = 8  # paper A.1.3: connected components of fewer than 8 pixels are removed


def pick_colors(n: int, rng: np.random.Generator | None, train: bool) -> list[str]:
    """``n`` distinct colour names: random in training (paper: randomly selected), palette order otherwise."""
    if n > MAX_COLORS:
        raise ValueError(f"at most {MAX_COLORS} distinct colours are available, asked for {n}")
    if train and rng is not None:
        return [COLOR_NAMES[i] for i in rng.permutation(MAX_COLORS)[:n]]
    return list(COLOR_NAMES[:n])


def paint(masks: list[np.ndarray], colors: list[str], hw: tuple[int, int]) -> np.ndarray:
    """Bool masks + colour names -> uint8 ``(H, W, 3)`` image on black (later masks paint over)."""
    img = np.zeros((hw[0], hw[1], 3), np.uint8)
    for m, c in zip(masks, colors):
        img[m] = COLOR_RGB[c]
    return img


def remove_small(mask: np.ndarray, min_size: int = MIN_COMPONENT) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_size`` pixels."""
    from scipy import ndimage

    if not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def colors_in_text(text: str) -> list[str]:
    """Palette names mentioned in ``text`` in order of appearance (duplicates dropped)."""
    out: list[str] = []
    for word in text.lower().replace(",", " ").replace(":", " ").split():
        if word in COLOR_RGB and word not in out:
            out.append(word)
    return out


def masks_from_colors(image_u8: np.ndarray, names: list[str] | None = None,
                      min_size: int = MIN_COMPONENT) -> list[tuple[str, np.ndarray]]:
    """Cluster a generated colour image into instance masks.

    Every pixel goes to the nearest of black (background) and the palette colours (``names`` when
    given, e.g. the colours the model named, else the whole palette); each colour's pixels, with
    components under ``min_size`` pixels removed, are one instance.
    """
    img = np.asarray(image_u8)
    if img.ndim != 3 or img.shape[-1] != 3 or img.size == 0:
        return []
    names = [n for n in (names or []) if n in COLOR_RGB] or list(COLOR_NAMES)
    centers = np.array([(0, 0, 0)] + [COLOR_RGB[n] for n in names], dtype=np.float32)  # (K+1, 3)
    px = img.reshape(-1, 3).astype(np.float32)
    d = (centers ** 2).sum(-1)[None, :] - 2.0 * px @ centers.T  # (HW, K+1): squared distance minus |px|^2
    assign = d.argmin(1).reshape(img.shape[:2])
    out = []
    for k, name in enumerate(names, start=1):
        m = remove_small(assign == k, min_size)
        if m.any():
            out.append((name, m))
    return out


def mask_from_gray(image_u8: np.ndarray, threshold: float = 127.5, min_size: int = MIN_COMPONENT) -> np.ndarray | None:
    """A white-on-black mask image -> bool mask (mean channel above ``threshold``, small bits removed)."""
    img = np.asarray(image_u8)
    if img.ndim != 3 or img.size == 0:
        return None
    return remove_small(img.astype(np.float32).mean(-1) > threshold, min_size)
