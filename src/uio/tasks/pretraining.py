"""Pre-training objectives (paper §3.3, A.1.8): T5 span corruption and masked image denoising.

Both use the other modality when the example has it, and drop it 10% of the time in training.
"""
from __future__ import annotations

import numpy as np

from uio.processing import Processor
from uio.tasks.base import GenerationConfig, Task, check_text
from uio.tasks.image_synthesis import IMAGE_GENERATION, ImageOutputTask
from uio.vocab import Vocab

MASKED_IMAGE_PROMPT = "What is the complete image ?"


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's ``random_spans_noise_mask``: bool ``(length,)``, about ``noise_density`` noise in spans of
    mean length ``mean_noise_span_length``; the sequence starts with non-noise and ends with noise."""
    if length < 2:
        return np.zeros(length, bool)
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)
    num_nonnoise = length - num_noise

    def segmentation(num_items: int, num_segments: int) -> np.ndarray:
        first = np.zeros(num_items, bool)
        first[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
        return np.bincount(np.cumsum(first), minlength=num_segments)

    noise_lengths = segmentation(num_noise, num_spans)
    nonnoise_lengths = segmentation(num_nonnoise, num_spans)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], 1).reshape(-1)
    starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, np.int64)
    indicator[starts] = 1
    return np.cumsum(indicator) % 2 == 1


def corrupt_spans(ids: list[int], noise: np.ndarray, vocab: Vocab) -> tuple[list[int], list[int]]:
    """Replace each noise span by a sentinel: (inputs, targets) without EOS, as T5."""
    inputs, targets = [], []
    k = -1
    for i, (t, is_noise) in enumerate(zip(ids, noise)):
        if is_noise:
            if i == 0 or not noise[i - 1]:
                k += 1
                s = vocab.sentinel_id(min(k, vocab.num_sentinels - 1))
                inputs.append(s)
                targets.append(s)
            targets.append(t)
        else:
            inputs.append(t)
    return inputs, targets


def split_spans(ids, vocab: Vocab) -> dict[int, list[int]]:
    """Target ids ``<s0> a b <s1> c`` -> ``{0: [a, b], 1: [c]}`` (ids before the first sentinel dropped)."""
    out: dict[int, list[int]] = {}
    cur = None
    for t in ids:
        t = int(t)
        if vocab.sentinel_start <= t < vocab.sentinel_end:
            cur = vocab.sentinel_end - 1 - t
            out.setdefault(cur, [])
        elif cur is not None and 2 < t < vocab.text_vocab:
            out[cur].append(t)
    return out


def fill_spans(input_ids, spans: dict[int, list[int]], vocab: Vocab) -> list[int]:
    """Put decoded spans back into the corrupted input (the inverse of :func:`corrupt_spans`)."""
    out = []
    for t in input_ids:
        t = int(t)
        if t == vocab.eos_id:
            break
        if vocab.sentinel_start <= t < vocab.sentinel_end:
            out += spans.get(vocab.sentinel_end - 1 - t, [])
        else:
            out.append(t)
    return out


class SpanCorruptionTask(Task):
    """T5 span corruption: 15% of the text ids in spans of mean length 3, each span replaced by a
    sentinel in the input; the target lists the sentinels and their spans. The example's image, if
    any, is given too, except 10% of the time in training."""

    name = "span_corruption"
    group = "language_modelling"
    prompts = ("{text with <extra_id_k> sentinels}",)
    output = "text"
    output_format = "`<extra_id_0> span <extra_id_1> span ...` (T5 sentinels)"
    metrics = ()
    generation_config = GenerationConfig(max_text_len=128)
    required_keys = ("text",)
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    drop_other_modality: float = 0.1

    def _encode(self, example, processor, rng, train):
        text = check_text(example["text"], self.name, "text")
        v = processor.vocab
        ids = processor.tokens(text)
        max_len = processor.max_input_len - 1
        if len(ids) > max_len:  # a random crop in training, the start otherwise
            start = int(rng.integers(len(ids) - max_len + 1)) if train else 0
            ids = ids[start : start + max_len]
        noise = random_spans_noise_mask(len(ids), self.noise_density, self.mean_noise_span_length, rng)
        inputs, targets = corrupt_spans(ids, noise, v)
        targets = targets[: processor.max_target_len - 1]
        image_input = None
        if example.get("image") is not None and not (train and rng.random() < self.drop_other_modality):
            image_input = processor.image_input(example["image"])
        return self.sample(processor, example, inputs + [v.eos_id], image_input, targets + [v.eos_id], None,
                           prompt=processor.decode_text(inputs), gt={"text": text})

    def _decode(self, ids, image, meta, processor):
        spans = split_spans(ids, processor.vocab)
        return {"text": processor.text_tokenizer.decode([int(i) for i in ids]).strip(),
                "spans": [processor.decode_text(spans[k]) for k in sorted(spans)], "span_ids": spans}


class MaskedImageDenoisingTask(ImageOutputTask):
    """75% of the image's (real) patches hidden from the encoder; the target is the whole image. A
    ``caption`` (or ``label``) in the example goes into the prompt, except 10% of the time in training."""

    name = "masked_image_denoising"
    group = "pretraining"
    prompts = (MASKED_IMAGE_PROMPT, IMAGE_GENERATION)
    output_format = "the whole image (VQ-GAN codes)"
    required_keys = ("image",)
    mask_ratio: float = 0.75
    drop_other_modality: float = 0.1

    def prompt(self, rng, train):  # the prompt depends on whether text is available, see _encode
        return self.prompts[0]

    def _encode(self, example, processor: Processor, rng, train):
        inp = processor.image_input(example["image"])
        visible = np.flatnonzero(inp.mask)
        n_mask = int(round(len(visible) * self.mask_ratio))
        hidden = rng.choice(visible, size=n_mask, replace=False) if n_mask else np.zeros(0, np.int64)
        inp.mask[hidden] = False
        text = example.get("caption") or example.get("label")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"{self.name}: caption/label must be a str, got {type(text).__name__}")
        use_text = bool(text) and not (train and rng.random() < self.drop_other_modality)
        prompt = self.prompts[1].replace("{}", text) if use_text else self.prompts[0]
        tgt, extra = self._target(example, processor, train)
        return self.sample(processor, example, processor.encode_text(prompt), inp, None, tgt, prompt=prompt,
                           **extra)
