"""Vision & language: VQA, relationship detection, grounded VQA (paper A.1.6)."""
from __future__ import annotations

from collections import Counter

import numpy as np

from uio.processing import to_uint8
from uio.tasks.base import GenerationConfig, Task, check_box, check_mask, check_text, check_texts, image_hw, meta_hw
from uio.tasks.colors import mask_from_gray

RELATIONSHIP_PROMPT = 'What is the relationship between " {subject} " and " {object} " ?'
GROUNDED_VQA_PROMPT = 'What is the answer to " {} " and where is it in the image ?'


def pick_answer(answers: list[str], rng: np.random.Generator, train: bool) -> str:
    """Training: an answer drawn with its annotator frequency; evaluation: the most frequent one."""
    counts = Counter(answers)
    if train:
        return answers[int(rng.integers(len(answers)))]
    return max(counts.items(), key=lambda kv: (kv[1], -answers.index(kv[0])))[0]


class VQATask(Task):
    """The prompt is the question itself, lower-cased ("We trained on lowercase question")."""

    name = "vqa"
    group = "vision_language"
    prompts = ("{}",)
    output = "text"
    output_format = "short answer text"
    metrics = ("vqa_accuracy",)
    generation_config = GenerationConfig(max_text_len=32)
    required_keys = ("image", "question", "answers")

    def _encode(self, example, processor, rng, train):
        q = check_text(example["question"], self.name, "question").strip().lower()
        answers = check_texts(example["answers"], self.name, "answers")
        prompt = self.prompt(rng, train).replace("{}", q)
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           processor.encode_target(pick_answer(answers, rng, train)), None, prompt=prompt,
                           gt={"answers": answers})

    def _decode(self, ids, image, meta, processor):
        return {"answer": processor.decode_text(ids)}


class RelationshipTask(Task):
    """The predicate between two boxed objects (Visual Genome relationships)."""

    name = "relationship"
    group = "vision_language"
    prompts = (RELATIONSHIP_PROMPT, 'How is " {subject} " related to " {object} " ?')
    output = "text"
    output_format = "predicate text"
    metrics = ("relationship_accuracy",)
    generation_config = GenerationConfig(max_text_len=32)
    required_keys = ("image", "subject_box", "object_box", "subject", "object", "predicate")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        sb = check_box(example["subject_box"], self.name, "subject_box")
        ob = check_box(example["object_box"], self.name, "object_box")
        s = check_text(example["subject"], self.name, "subject")
        o = check_text(example["object"], self.name, "object")
        pred = check_text(example["predicate"], self.name, "predicate")
        prompt = (self.prompt(rng, train).replace("{subject}", f"{processor.region_text(sb, hw)} {s}")
                  .replace("{object}", f"{processor.region_text(ob, hw)} {o}"))
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           processor.encode_target(pred), None, prompt=prompt,
                           gt={"predicate": pred, "label": pred})

    def _decode(self, ids, image, meta, processor):
        text = processor.decode_text(ids)
        return {"predicate": text, "label": text}


class GroundedVQATask(Task):
    """Answer text plus the grounding mask as a white-on-black image (VizWiz-grounding)."""

    name = "grounded_vqa"
    group = "vision_language"
    prompts = (GROUNDED_VQA_PROMPT, 'Answer " {} " and segment the region with the answer .')
    output = "text+image"
    output_format = "answer text + grounding mask image (white on black)"
    metrics = ("grounded_vqa",)
    generation_config = GenerationConfig(max_text_len=32, image_output=True, method="greedy")
    required_keys = ("image", "question", "answers", "mask")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        q = check_text(example["question"], self.name, "question").strip().lower()
        answers = check_texts(example["answers"], self.name, "answers")
        mask = check_mask(example["mask"], hw, self.name, "mask")
        prompt = self.prompt(rng, train).replace("{}", q)
        tgt = processor.image_target(np.repeat(mask[:, :, None], 3, axis=2).astype(np.float32), mode="nearest")
        gt = {"answers": answers, "mask": mask} if not train else {"answers": answers}
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           processor.encode_target(pick_answer(answers, rng, train)), tgt, prompt=prompt,
                           target_hw=hw, gt=gt)

    def _decode(self, ids, image, meta, processor):
        hw = meta_hw(meta, "target_hw") or meta_hw(meta)
        img = processor.output_image(image, hw, mode="nearest")
        mask = mask_from_gray(to_uint8(img)) if img is not None else None
        return {"answer": processor.decode_text(ids), "masks": [mask] if mask is not None and mask.any() else []}
