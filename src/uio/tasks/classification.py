"""Image classification and object (region) categorization (paper A.1.4).

Evaluation scores every candidate label of the dataset with ``Model.score_options`` and returns the
most likely one, so the model cannot answer with a synonym from another dataset.
"""
from __future__ import annotations

from collections.abc import Sequence

from uio.tasks.base import GenerationConfig, Task, check_box, check_text, check_texts, image_hw

IMAGE_TAGGING = "What is this in the image ?"
REGION_CLASSIFICATION = 'What is the category of region " {} " ?'


class _ScoringTask(Task):
    output = "label"
    metrics = ("accuracy",)
    generation_config = GenerationConfig(max_text_len=32)
    scoring = True

    def candidates(self, example) -> list[str] | None:
        c = example.get("candidates")
        if c is None:
            return None
        if isinstance(c, str) or not isinstance(c, Sequence):
            raise ValueError(f"{self.name}: candidates must be a list of label strings, got {c!r:.80}")
        return check_texts(list(c), self.name, "candidates")

    def _finish(self, example, processor, prompt, image_input, train):
        label = check_text(example["label"], self.name, "label")
        cands = self.candidates(example)
        if cands is not None and not train and label not in cands:
            raise ValueError(f"{self.name}: label {label!r} is not among the {len(cands)} candidates")
        return self.sample(processor, example, processor.encode_text(prompt), image_input,
                           processor.encode_target(label), None, prompt=prompt, candidates=cands,
                           gt={"label": label})

    def _decode(self, ids, image, meta, processor):
        return {"label": processor.decode_text(ids)}


class ImageClassificationTask(_ScoringTask):
    name = "image_classification"
    group = "image_classification"
    prompts = (IMAGE_TAGGING, "What is the category of the image ?", "What object does the image show ?")
    output_format = "class name (text); evaluated by scoring the dataset's candidate labels"
    required_keys = ("image", "label")

    def _encode(self, example, processor, rng, train):
        prompt = self.prompt(rng, train)
        return self._finish(example, processor, prompt, processor.image_input(example["image"]), train)


class RegionClassificationTask(_ScoringTask):
    name = "region_classification"
    group = "image_classification"
    prompts = (REGION_CLASSIFICATION, 'What is the object in region " {} " ?', 'Which category is the region " {} " ?')
    output_format = "class name (text) of the boxed object; evaluated by scoring candidate labels"
    required_keys = ("image", "box", "label")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        box = check_box(example["box"], self.name)
        prompt = self.prompt(rng, train).replace("{}", processor.region_text(box, hw))
        return self._finish(example, processor, prompt, processor.image_input(example["image"]), train)
