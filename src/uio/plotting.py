"""Drawing task outputs: boxes, joints, masks, depth and normal maps.

The ``draw_*`` / ``colorize_*`` functions return PIL images (so the evaluation's HTML grid and a
notebook use the same pictures); :func:`render` picks the right one for any result of the
:class:`uio.Model` task methods, and :func:`show` lays pictures out with matplotlib.

>>> from uio import plotting
>>> plotting.draw_boxes(photo, dets.boxes, dets.labels, dets.scores)
>>> plotting.show([photo, model.detect(photo), model.depth(photo)], image=photo, titles=["in", "boxes", "depth"])
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from uio.data.toyworld_scene import COCO_SKELETON
from uio.processing import to_float_image, to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = ["to_pil", "draw_boxes", "draw_keypoints", "draw_masks", "colorize_depth", "colorize_normals", "render",
           "image_grid", "show", "PALETTE"]

# distinct, readable colours for successive boxes / instances (tab10)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def to_pil(image: Any) -> "Image.Image":
    """A PIL RGB image from a PIL image, numpy array (uint8 or float in [0, 1]) or tensor (3, H, W)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(to_uint8(to_float_image(image)))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _scale(img: "Image.Image", min_side: int) -> tuple["Image.Image", float]:
    """Upscale small images (nearest) so that lines and labels stay readable."""
    from PIL import Image

    s = max(1.0, min_side / max(1, min(img.size)))
    if s > 1.0:
        img = img.resize((round(img.width * s), round(img.height * s)), Image.NEAREST)
    return img, s


def draw_boxes(image: Any, boxes: Any, labels: Sequence[str] | None = None, scores: Any = None,
               width: int = 2, min_side: int = 256) -> "Image.Image":
    """``boxes`` ``(N, 4)`` xyxy in the image's pixels, with their labels (and scores) written on top."""
    from PIL import ImageDraw

    img, s = _scale(to_pil(image), min_side)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if labels is not None and len(labels) != len(b):
        raise ValueError(f"got {len(b)} boxes but {len(labels)} labels")
    sc = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if sc is not None and len(sc) != len(b):
        raise ValueError(f"got {len(b)} boxes but {len(sc)} scores")
    draw = ImageDraw.Draw(img)
    font = _font(max(10, img.height // 28))
    for i, box in enumerate(b):
        color = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) * s for v in box)
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=width)
        text = labels[i] if labels is not None else ""
        if sc is not None:
            text = f"{text} {sc[i]:.2f}".strip()
        if text:
            tb = draw.textbbox((x1, y1), text, font=font)
            y = max(0.0, y1 - (tb[3] - tb[1]) - 2)
            tb = draw.textbbox((x1, y), text, font=font)
            draw.rectangle(tb, fill=color)
            draw.text((x1, y), text, fill=(255, 255, 255), font=font)
    return img


def draw_keypoints(image: Any, keypoints: Any, skeleton: Sequence[tuple[int, int]] = COCO_SKELETON,
                   radius: int = 3, min_side: int = 256, boxes: Any = None) -> "Image.Image":
    """COCO joints ``(17, 3)`` or ``(K, 17, 3)`` ``[x, y, v]``: limbs in yellow, visible joints
    (v = 2) green, occluded ones (v = 1) red, unlabelled ones (v = 0) grey; optional person boxes."""
    from PIL import ImageDraw

    img = draw_boxes(image, boxes, min_side=min_side) if boxes is not None and len(boxes) else \
        _scale(to_pil(image), min_side)[0]
    s = img.width / to_pil(image).width
    kps = np.asarray(keypoints, dtype=np.float64)
    if kps.ndim == 2:
        kps = kps[None]
    if kps.size and (kps.ndim != 3 or kps.shape[-1] != 3):
        raise ValueError(f"keypoints must be (17, 3) or (K, 17, 3) [x, y, v], got shape {kps.shape}")
    draw = ImageDraw.Draw(img)
    for person in kps.reshape(-1, *kps.shape[-2:]) if kps.size else []:
        xy = person[:, :2] * s
        for a, b in skeleton:
            if a < len(person) and b < len(person) and np.isfinite(xy[[a, b]]).all():
                draw.line([tuple(xy[a]), tuple(xy[b])], fill=(255, 220, 0), width=2)
        for (x, y), v in zip(xy, person[:, 2]):
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            color = (40, 220, 40) if v >= 2 else (230, 40, 40) if v >= 1 else (150, 150, 150)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(0, 0, 0))
    return img


def _mask_stack(masks: Any, hw: tuple[int, int]) -> np.ndarray:
    if masks is None:
        return np.zeros((0, *hw), bool)
    if isinstance(masks, (list, tuple)):
        masks = np.stack([np.asarray(m) for m in masks]) if len(masks) else np.zeros((0, *hw), bool)
    m = np.asarray(masks)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or (m.shape[0] and m.shape[1:] != tuple(hw)):
        raise ValueError(f"masks must be (H, W) or (N, H, W) at the image size {tuple(hw)}, got shape {m.shape}")
    return m.astype(bool)


def draw_masks(image: Any, masks: Any, colors: Sequence[tuple[int, int, int]] | None = None, alpha: float = 0.55,
               outline: bool = True, min_side: int = 256) -> "Image.Image":
    """Instance masks (bool ``(H, W)``, ``(N, H, W)`` or a list) blended over the image in distinct colours."""
    from PIL import Image

    base = to_pil(image)
    arr = np.asarray(base, dtype=np.float32)
    m = _mask_stack(masks, arr.shape[:2])
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for i, mk in enumerate(m):
        c = np.array((colors or PALETTE)[i % len(colors or PALETTE)], dtype=np.float32)
        arr[mk] = (1 - alpha) * arr[mk] + alpha * c
        if outline:
            edge = mk & ~(np.roll(mk, 1, 0) & np.roll(mk, -1, 0) & np.roll(mk, 1, 1) & np.roll(mk, -1, 1))
            arr[edge] = c
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return _scale(out, min_side)[0]


def colorize_depth(depth: Any, max_depth: float | None = None, cmap: str = "magma_r") -> "Image.Image":
    """A depth map ``(H, W)`` as a colour image (near = bright with ``magma_r``); 0 / non-finite = black."""
    import matplotlib

    d = np.asarray(getattr(depth, "depth", depth), dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {d.shape}")
    if max_depth is None:
        max_depth = getattr(depth, "max_depth", None)
    valid = np.isfinite(d) & (d > 0)
    hi = float(max_depth) if max_depth else (float(d[valid].max()) if valid.any() else 1.0)
    rgb = matplotlib.colormaps[cmap](np.clip(np.where(valid, d, 0) / max(hi, 1e-9), 0, 1))[..., :3]
    rgb[~valid] = 0
    return to_pil(rgb.astype(np.float32))


def colorize_normals(normals: Any) -> "Image.Image":
    """Unit normals ``(H, W, 3)`` as RGB ``(n + 1) / 2`` (zero vectors stay black)."""
    n = np.asarray(getattr(normals, "normals", normals), dtype=np.float32)
    if n.ndim != 3 or n.shape[-1] != 3:
        raise ValueError(f"normals must be (H, W, 3), got shape {n.shape}")
    zero = np.linalg.norm(n, axis=-1) < 1e-6
    rgb = np.clip((n + 1) / 2, 0, 1)
    rgb[zero] = 0
    return to_pil(rgb)


def render(result: Any, image: Any = None) -> "Image.Image":
    """A picture of any task result: a PIL image or array as it is; :class:`~uio.inference.Detections`
    / :class:`~uio.inference.Poses` / :class:`~uio.inference.Segmentation` drawn on ``image``; depth
    and normal maps colourised; a :class:`~uio.inference.GroundedAnswer`'s mask on ``image``."""
    from PIL import Image

    from uio import inference as inf

    def need(what: str):
        if image is None:
            raise ValueError(f"rendering {what} needs the input image: render(result, image=...)")
        return image

    if isinstance(result, Image.Image):
        return result.convert("RGB")
    if isinstance(result, inf.Detections):
        return draw_boxes(need("boxes"), result.boxes, result.labels, result.scores)
    if isinstance(result, inf.Poses):
        return draw_keypoints(need("keypoints"), result.keypoints, boxes=result.boxes)
    if isinstance(result, inf.Segmentation):
        return draw_masks(need("masks"), result.masks)
    if isinstance(result, inf.GroundedAnswer):
        return draw_masks(need("a grounding mask"), result.mask)
    if isinstance(result, inf.DepthMap):
        return colorize_depth(result.depth, result.max_depth)
    if isinstance(result, inf.NormalMap):
        return colorize_normals(result.normals)
    if isinstance(result, (np.ndarray,)) or hasattr(result, "shape"):
        return to_pil(result)
    raise TypeError(f"cannot render a {type(result).__name__}; expected a task result, a PIL image or an array")


def image_grid(images: Sequence[Any], ncols: int = 4, size: int = 192, pad: int = 4,
               background: tuple[int, int, int] = (255, 255, 255)) -> "Image.Image":
    """Pictures side by side in rows of ``ncols``, each fitted into a ``size`` square."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    tiles = []
    for im in images:
        t = to_pil(im)
        if max(t.size) > size:
            t.thumbnail((size, size))
        elif max(t.size) < size:
            s = size / max(t.size)
            t = t.resize((max(1, round(t.width * s)), max(1, round(t.height * s))), Image.NEAREST)
        tiles.append(t)
    rows = (len(tiles) + ncols - 1) // ncols
    cols = min(ncols, len(tiles))
    grid = Image.new("RGB", (cols * (size + pad) + pad, rows * (size + pad) + pad), background)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        grid.paste(t, (pad + c * (size + pad) + (size - t.width) // 2, pad + r * (size + pad) + (size - t.height) // 2))
    return grid


def show(items: Sequence[Any], image: Any = None, titles: Sequence[str] | None = None, ncols: int = 4,
         size: float = 3.2):
    """Show pictures (images, arrays or task results, rendered with :func:`render` on ``image``) in a
    matplotlib grid; returns the figure."""
    import matplotlib.pyplot as plt

    items = list(items)
    if not items:
        raise ValueError("show needs at least one item")
    if titles is not None and len(titles) != len(items):
        raise ValueError(f"got {len(items)} items but {len(titles)} titles")
    ncols = max(1, min(ncols, len(items)))
    nrows = (len(items) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.reshape(-1):
        ax.axis("off")
    for i, it in enumerate(items):
        ax = axes.reshape(-1)[i]
        ax.imshow(render(it, image))
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return fig
