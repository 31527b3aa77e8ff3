"""Image captioning and region captioning (paper A.1.5)."""
from __future__ import annotations

from uio.tasks.base import GenerationConfig, Task, check_box, check_text, check_texts, image_hw

CAPTIONING_PROMPT = "What does the image describe ?"
REGION_CAPTION = 'What does the region " {} " describe ?'


class ImageCaptioningTask(Task):
    name = "image_captioning"
    group = "image_captioning"
    prompts = (CAPTIONING_PROMPT, "Write a caption for the image .", "What is happening in the image ?")
    output = "text"
    output_format = "caption text (a random reference in training)"
    metrics = ("captioning",)
    generation_config = GenerationConfig(max_text_len=32)
    required_keys = ("image", "captions")

    def _encode(self, example, processor, rng, train):
        caps = check_texts(example["captions"], self.name, "captions")
        target = caps[int(rng.integers(len(caps)))] if train else caps[0]
        prompt = self.prompt(rng, train)
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           processor.encode_target(target), None, prompt=prompt, gt={"captions": caps})

    def _decode(self, ids, image, meta, processor):
        return {"text": processor.decode_text(ids)}


class RegionCaptioningTask(Task):
    name = "region_captioning"
    group = "image_captioning"
    prompts = (REGION_CAPTION, 'Describe the region " {} " .', 'What is in the region " {} " ?')
    output = "text"
    output_format = "caption text of the boxed region"
    metrics = ("captioning",)
    generation_config = GenerationConfig(max_text_len=32)
    required_keys = ("image", "box", "caption")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        box = check_box(example["box"], self.name)
        cap = check_text(example["caption"], self.name, "caption")
        prompt = self.prompt(rng, train).replace("{}", processor.region_text(box, hw))
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           processor.encode_target(cap), None, prompt=prompt, gt={"captions": [cap]})

    def _decode(self, ids, image, meta, processor):
        return {"text": processor.decode_text(ids)}
