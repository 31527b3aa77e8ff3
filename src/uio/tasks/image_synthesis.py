"""Image synthesis: from text, inpainting, from a segmentation map (paper A.1.1)."""
from __future__ import annotations

from typing import Any

import numpy as np

from uio.processing import Processor, to_float_image, to_uint8
from uio.tasks.base import GenerationConfig, Task, check_box, check_mask, check_text, image_hw, meta_hw
from uio.tasks.colors import MAX_COLORS, paint, pick_colors

IMAGE_GENERATION = 'What is the complete image? Text: " {} " .'
IMAGE_INPAINTING = 'Filling the blank region " {} " ?'
SEGMENTATION_BASED_GENERATION = 'What is the complete image? Segmentation color: " {} "'

IMAGE_GEN = GenerationConfig(max_text_len=1, image_output=True, method="sample", top_p=0.9)


class ImageOutputTask(Task):
    """Shared decoding for tasks whose output is a natural image."""

    output = "image"
    output_format = "image (VQ-GAN codes), resized back to the target size"
    metrics = ("image_similarity",)
    generation_config = IMAGE_GEN

    def _decode(self, ids, image, meta, processor: Processor) -> dict[str, Any]:
        hw = meta_hw(meta, "target_hw")
        out = processor.output_image(image, hw, mode="bilinear")
        if out is None:
            h, w = hw or processor.image_target_size
            return {"image": np.zeros((h, w, 3), np.uint8), "valid": False}
        return {"image": to_uint8(out), "valid": True}

    def _target(self, example, processor: Processor, train: bool):
        img = to_float_image(example["image"])
        tgt = processor.image_target(img)
        extra = {"target_hw": tuple(int(v) for v in img.shape[:2])}
        if not train:
            extra["gt"] = {"image": to_uint8(img)}
        return tgt, extra


class ImageGenerationTask(ImageOutputTask):
    name = "image_generation"
    group = "image_synthesis"
    prompts = (IMAGE_GENERATION, 'Generate an image that matches the text: " {} " .',
               'What does the text " {} " look like as an image ?')
    required_keys = ("image", "caption")

    def _encode(self, example, processor, rng, train):
        caption = check_text(example["caption"], self.name, "caption")
        prompt = self.prompt(rng, train).replace("{}", caption)
        tgt, extra = self._target(example, processor, train)
        return self.sample(processor, example, processor.encode_text(prompt), None, None, tgt, prompt=prompt, **extra)


class ImageInpaintingTask(ImageOutputTask):
    name = "image_inpainting"
    group = "image_synthesis"
    prompts = (IMAGE_INPAINTING, 'Fill in the blank region " {} " .', 'Paint the missing region " {} " .')
    required_keys = ("image", "box", "label")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        box = check_box(example["box"], self.name)
        label = check_text(example["label"], self.name, "label")
        region = processor.region_text(box, hw) + " " + label
        prompt = self.prompt(rng, train).replace("{}", region)
        inp = processor.image_input(example["image"], mask_region=box)
        tgt, extra = self._target(example, processor, train)
        return self.sample(processor, example, processor.encode_text(prompt), inp, None, tgt, prompt=prompt,
                           box=box.tolist(), **extra)


class SegmentationToImageTask(ImageOutputTask):
    name = "segmentation_to_image"
    group = "image_synthesis"
    prompts = (SEGMENTATION_BASED_GENERATION, 'Generate the image of the segmentation " {} " .')
    required_keys = ("image", "segments")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        segs = example["segments"]
        if not isinstance(segs, (list, tuple)) or not segs:
            raise ValueError(f"{self.name}: segments must be a non-empty list of {{'label': str, 'mask': bool(H, W)}}")
        labels, masks = [], []
        for i, s in enumerate(segs):
            if not isinstance(s, dict) or "label" not in s or "mask" not in s:
                raise ValueError(f"{self.name}: segments[{i}] must be a dict with 'label' and 'mask', got {s!r:.80}")
            labels.append(check_text(s["label"], self.name, f"segments[{i}]['label']"))
            masks.append(check_mask(s["mask"], hw, self.name, f"segments[{i}]['mask']"))
        if len(masks) > MAX_COLORS:  # keep the largest segments: there are only MAX_COLORS colours
            keep = sorted(np.argsort([-m.sum() for m in masks], kind="stable")[:MAX_COLORS])
            labels, masks = [labels[i] for i in keep], [masks[i] for i in keep]
        colors = pick_colors(len(masks), rng, train)
        seg_image = paint(masks, colors, hw)
        text = " , ".join(f"{a} : {b}" for a, b in zip(labels, colors)).lower()
        prompt = self.prompt(rng, train).replace("{}", text)
        inp = processor.image_input(seg_image)
        tgt, extra = self._target(example, processor, train)
        return self.sample(processor, example, processor.encode_text(prompt), inp, None, tgt, prompt=prompt,
                           colors=[list(p) for p in zip(labels, colors)], **extra)
