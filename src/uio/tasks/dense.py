"""Dense labelling: object segmentation, depth, surface normals (paper §3.1, A.1.3).

Every dense label becomes an RGB target image: instances in distinct colours on black, depth as a
grey level ``depth / max_depth``, normals x/y/z as r/g/b ``(n + 1) / 2``. Generated images are
cropped and resized back to the input size with nearest neighbours, then mapped back.
"""
from __future__ import annotations

import numpy as np

from uio.processing import Processor, to_uint8
from uio.tasks.base import GenerationConfig, Task, check_mask, check_text, image_hw, meta_hw
from uio.tasks.colors import MAX_COLORS, colors_in_text, masks_from_colors, paint, pick_colors

OBJECT_SEGMENTATION = 'What is the segmentation of " {} " ?'
DEPTH_PROMPT = "What is the depth map of the image ?"
SURFACE_NORMAL_PROMPT = "What is the surface normal of the image ?"


class ObjectSegmentationTask(Task):
    """Instances of one class as randomly coloured blobs on black; the text target names the colours
    (``"red , blue"``; just EOS when the class is absent). Decoding clusters colours and drops
    components under 8 pixels."""

    name = "object_segmentation"
    group = "dense_labelling"
    prompts = (OBJECT_SEGMENTATION, 'Segment every " {} " in the image .', 'What are the masks of " {} " ?')
    output = "text+image"
    output_format = "colour names (text) + image with each instance in its colour on black"
    metrics = ("mask_iou",)
    generation_config = GenerationConfig(max_text_len=32, image_output=True, method="sample", top_p=0.9)
    required_keys = ("image", "label", "masks")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        label = check_text(example["label"], self.name, "label")
        raw = example["masks"]
        if raw is None or isinstance(raw, (str, bytes)):
            raise ValueError(f"{self.name}: masks must be a list of bool (H, W) masks (may be empty), got {raw!r:.60}")
        masks = [check_mask(m, hw, self.name, f"masks[{i}]") for i, m in enumerate(raw)]
        drawn = masks
        if len(drawn) > MAX_COLORS:
            keep = sorted(np.argsort([-m.sum() for m in drawn], kind="stable")[:MAX_COLORS])
            drawn = [drawn[i] for i in keep]
        colors = pick_colors(len(drawn), rng, train)
        seg = paint(drawn, colors, hw)
        prompt = self.prompt(rng, train).replace("{}", label)
        target = processor.encode_target(" , ".join(colors)) if colors else [processor.vocab.eos_id]
        tgt = processor.image_target(seg, mode="nearest")
        extra = {"gt": {"masks": masks}} if not train else {}
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           target, tgt, prompt=prompt, label=label, colors=colors, target_hw=hw, **extra)

    def _decode(self, ids, image, meta, processor: Processor):
        hw = meta_hw(meta, "target_hw") or meta_hw(meta)
        img = processor.output_image(image, hw, mode="nearest")
        text = processor.decode_text(ids)  # the colours the model named (kept in saved predictions)
        if img is None:
            return {"masks": [], "colors": [], "text": text}
        named = colors_in_text(text)
        found = masks_from_colors(to_uint8(img), named or None)
        return {"masks": [m for _, m in found], "colors": [c for c, _ in found], "text": text}


class DepthTask(Task):
    """Depth as a grey image normalised by ``max_depth`` (per example, default :attr:`max_depth`)."""

    name = "depth"
    group = "dense_labelling"
    prompts = (DEPTH_PROMPT, "What is the depth of each pixel in the image ?", "Estimate the depth map of the image .")
    output = "image"
    output_format = "grey image, depth / max_depth (0 = invalid), rescaled back to metres"
    metrics = ("depth",)
    generation_config = GenerationConfig(max_text_len=1, image_output=True, method="sample", top_p=0.9)
    required_keys = ("image", "depth")
    max_depth: float = 10.0  # NYU Depth v2 range

    def _max_depth(self, example) -> float:
        md = example.get("max_depth", None)
        md = self.max_depth if md is None else md
        try:
            md = float(md)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}: max_depth must be a positive number, got {md!r}") from None
        if not np.isfinite(md) or md <= 0:
            raise ValueError(f"{self.name}: max_depth must be a positive number, got {md}")
        return md

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        depth = np.asarray(example["depth"], dtype=np.float32)
        if depth.shape != hw:
            raise ValueError(f"{self.name}: depth must be float (H, W) = {hw} like the image, got shape {depth.shape}")
        valid = np.isfinite(depth) & (depth > 0)
        depth = np.where(valid, depth, 0.0).astype(np.float32)
        md = self._max_depth(example)
        gray = np.clip(depth / md, 0.0, 1.0)
        tgt = processor.image_target(np.repeat(gray[:, :, None], 3, axis=2), valid=valid)
        prompt = self.prompt(rng, train)
        extra = {"gt": {"depth": depth, "max_depth": md}} if not train else {}
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           None, tgt, prompt=prompt, max_depth=md, target_hw=hw, **extra)

    def _decode(self, ids, image, meta, processor: Processor):
        hw = meta_hw(meta, "target_hw") or meta_hw(meta)
        try:
            md = float(meta.get("max_depth", self.max_depth))
        except (TypeError, ValueError):
            md = self.max_depth
        img = processor.output_image(image, hw, mode="nearest")
        if img is None:
            h, w = hw or processor.image_target_size
            return {"depth": np.zeros((h, w), np.float32), "valid": False}
        return {"depth": (img.mean(-1) * md).astype(np.float32), "valid": True}


class SurfaceNormalsTask(Task):
    """Unit normals (x right, y up, z towards the camera) as r/g/b = (n + 1) / 2; invalid pixels black."""

    name = "surface_normals"
    group = "dense_labelling"
    prompts = (SURFACE_NORMAL_PROMPT, "What is the surface orientation of each pixel ?",
               "Estimate the surface normals of the image .")
    output = "image"
    output_format = "RGB image, r/g/b = (x/y/z + 1) / 2, back to unit vectors"
    metrics = ("surface_normals",)
    generation_config = GenerationConfig(max_text_len=1, image_output=True, method="sample", top_p=0.9)
    required_keys = ("image", "normals")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        n = np.asarray(example["normals"], dtype=np.float32)
        if n.shape != (*hw, 3):
            raise ValueError(f"{self.name}: normals must be float (H, W, 3) = {(*hw, 3)}, got shape {n.shape}")
        norm = np.linalg.norm(n, axis=-1)
        valid = np.isfinite(norm) & (norm > 1e-6)
        if example.get("valid") is not None:
            valid &= check_mask(example["valid"], hw, self.name, "valid")
        unit = np.where(valid[..., None], n / np.where(valid, norm, 1.0)[..., None], 0.0)
        rgb = np.where(valid[..., None], (unit + 1.0) / 2.0, 0.0)
        tgt = processor.image_target(np.clip(rgb, 0.0, 1.0), valid=valid)
        prompt = self.prompt(rng, train)
        extra = {"gt": {"normals": unit.astype(np.float32), "valid": valid}} if not train else {}
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           None, tgt, prompt=prompt, target_hw=hw, **extra)

    def _decode(self, ids, image, meta, processor: Processor):
        hw = meta_hw(meta, "target_hw") or meta_hw(meta)
        img = processor.output_image(image, hw, mode="nearest")
        if img is None:
            h, w = hw or processor.image_target_size
            return {"normals": np.zeros((h, w, 3), np.float32), "valid": False}
        n = img * 2.0 - 1.0
        norm = np.linalg.norm(n, axis=-1, keepdims=True)
        unit = np.where(norm > 1e-6, n / np.maximum(norm, 1e-6), 0.0)
        return {"normals": unit.astype(np.float32), "valid": True}
