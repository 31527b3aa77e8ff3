"""Random raw examples (design.md contract 1) for every task, for the task tests."""
from __future__ import annotations

from typing import Any

import numpy as np

COLORS = ["red", "green", "blue", "yellow", "purple", "gray"]
SHAPES = ["cube", "sphere", "cylinder", "cone"]


def smooth_image(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """A uint8 photo-like image: a random 6x8 colour grid, bilinearly upsampled."""
    import torch
    import torch.nn.functional as F

    small = torch.from_numpy(rng.uniform(0, 1, (1, 3, 6, 8)).astype(np.float32))
    big = F.interpolate(small, size=hw, mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy()
    return np.round(big * 255).astype(np.uint8)


def random_box(rng: np.random.Generator, hw: tuple[int, int], min_size: float = 4.0) -> list[float]:
    h, w = hw
    x1, x2 = np.sort(rng.uniform(0, w, 2))
    y1, y2 = np.sort(rng.uniform(0, h, 2))
    x2, y2 = min(w, max(x2, x1 + min_size)), min(h, max(y2, y1 + min_size))
    return [float(x1), float(y1), float(x2), float(y2)]


def blob_masks(rng: np.random.Generator, hw: tuple[int, int], n: int) -> list[np.ndarray]:
    """``n`` non-overlapping ellipses, one per cell of a 2x3 layout."""
    h, w = hw
    cells = rng.permutation(6)[:n]
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for c in cells:
        r, col = divmod(int(c), 3)
        cy, cx = (r + 0.5) * h / 2, (col + 0.5) * w / 3
        ry, rx = rng.uniform(0.25, 0.45) * h / 2, rng.uniform(0.25, 0.45) * w / 3
        out.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
    return out


def phrase(rng: np.random.Generator) -> str:
    return f"{COLORS[rng.integers(len(COLORS))]} {SHAPES[rng.integers(len(SHAPES))]}"


def sentence(rng: np.random.Generator) -> str:
    return f"a {phrase(rng)} is left of the {phrase(rng)} ."


def smooth_field(rng: np.random.Generator, hw: tuple[int, int], channels: int = 1) -> np.ndarray:
    """A smooth float field in [0, 1] of shape (H, W[, C])."""
    img = smooth_image(rng, hw).astype(np.float32) / 255
    return img[..., 0] if channels == 1 else img[..., :channels]


def make_example(task: str, rng: np.random.Generator, hw: tuple[int, int] = (96, 128), **kw: Any) -> dict[str, Any]:
    """One random, valid raw example of ``task`` with an image of size ``hw``."""
    ex: dict[str, Any] = {"id": f"{task}-{int(rng.integers(10**6))}", "dataset": "test", "image": smooth_image(rng, hw)}
    if task == "image_generation":
        ex["caption"] = sentence(rng)
    elif task == "image_inpainting":
        ex.update(box=random_box(rng, hw, 12), label=SHAPES[rng.integers(4)])
    elif task == "segmentation_to_image":
        masks = blob_masks(rng, hw, int(rng.integers(1, 5)))
        ex["segments"] = [{"label": SHAPES[i % 4], "mask": m} for i, m in enumerate(masks)]
    elif task == "detection":
        n = int(rng.integers(1, 6))
        ex.update(boxes=[random_box(rng, hw) for _ in range(n)], labels=[phrase(rng) for _ in range(n)])
    elif task == "object_localization":
        ex.update(boxes=[random_box(rng, hw) for _ in range(int(rng.integers(0, 4)))], label=SHAPES[rng.integers(4)])
    elif task == "referring_expression":
        ex.update(box=random_box(rng, hw), expression=f"the {phrase(rng)} on the left")
    elif task == "keypoints":
        box = random_box(rng, hw, 20)
        vis = rng.integers(0, 3, 17)
        xs, ys = rng.uniform(box[0], box[2], 17), rng.uniform(box[1], box[3], 17)
        ex.update(box=box, keypoints=[[float(x), float(y), int(v)] if v else [0.0, 0.0, 0] for x, y, v in zip(xs, ys, vis)])
    elif task == "object_segmentation":
        ex.update(label=SHAPES[rng.integers(4)], masks=blob_masks(rng, hw, int(rng.integers(0, 5))))
    elif task == "depth":
        max_depth = float(rng.choice([10.0, 80.0]))
        d = (0.05 + 0.9 * smooth_field(rng, hw)) * max_depth
        d[rng.uniform(size=hw) < 0.05] = 0.0  # holes
        ex.update(depth=d.astype(np.float32), max_depth=max_depth)
    elif task == "surface_normals":
        n = smooth_field(rng, hw, 3) * 2 - 1
        n[..., 2] = np.abs(n[..., 2]) + 0.3  # facing the camera
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        valid = rng.uniform(size=hw) > 0.05
        ex.update(normals=n.astype(np.float32), valid=valid)
    elif task in ("image_classification", "region_classification"):
        cands = list(SHAPES)
        ex.update(label=cands[rng.integers(4)], candidates=cands)
        if task == "region_classification":
            ex["box"] = random_box(rng, hw)
    elif task == "image_captioning":
        ex["captions"] = [sentence(rng) for _ in range(int(rng.integers(1, 5)))]
    elif task == "region_captioning":
        ex.update(box=random_box(rng, hw), caption=f"a {phrase(rng)}")
    elif task in ("vqa", "grounded_vqa"):
        ex.update(question=f"What color is the {SHAPES[rng.integers(4)]}?",
                  answers=[COLORS[i] for i in rng.integers(0, 3, 10)])
        if task == "grounded_vqa":
            ex["mask"] = blob_masks(rng, hw, 1)[0]
    elif task == "relationship":
        ex.update(subject_box=random_box(rng, hw), object_box=random_box(rng, hw), subject=phrase(rng),
                  object=phrase(rng), predicate=["left of", "on top of", "behind"][rng.integers(3)])
    elif task == "masked_image_denoising":
        pass
    else:  # text-only tasks
        del ex["image"]
        if task == "text_classification":
            ex.update(text=sentence(rng), text_pair=sentence(rng), label=["entailment", "neutral"][rng.integers(2)],
                      candidates=["entailment", "neutral", "contradiction"], dataset="mnli")
        elif task == "question_answering":
            facts = [sentence(rng) for _ in range(int(kw.pop("sentences", 4)))]
            ans = phrase(rng)
            k = int(rng.integers(len(facts)))
            facts[k] = f"the answer is the {ans} ."
            ex.update(context=" ".join(facts), question="what is the answer ?", answers=[f"the {ans}"])
        elif task == "summarization":
            ex.update(text=" ".join(sentence(rng) for _ in range(3)), summary=f"a {phrase(rng)}")
        elif task == "span_corruption":
            ex["text"] = " ".join(sentence(rng) for _ in range(int(kw.pop("sentences", 6))))
        else:
            raise ValueError(f"no example factory for {task!r}")
    ex.update(kw)
    return ex
