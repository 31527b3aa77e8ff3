"""Sparse labelling: detection, object localization, referring expressions, keypoints (paper A.1.2).

Boxes are 4 location ids (y1 x1 y2 x2, normalised by the longest image side), points are 2
(y x). A labelled box is the box followed by its class text; a keypoint is the point followed by
its visibility label text ("1" not visible, "2" partly, "3" fully visible = COCO v + 1).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from uio.processing import Processor
from uio.tasks.base import (
    GenerationConfig, Task, check_box, check_boxes, check_text, image_hw, loc_structure_mask, meta_hw,
    parse_located, tokens_to_box,
)
from uio.vocab import Vocab

REFEXP_PROMPT = 'Which region does the text " {} " describe ?'
POSE_ESTIMATION = 'Find the human joints in the region " {} " .'
DETECTION_PROMPT = "What are the objects in the image ?"  # no detection prompt in the release (OFA's wording)

NUM_KEYPOINTS = 17
COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)


def no_coordinates_id(vocab: Vocab) -> int:
    """The special "no valid coordinates" id that precedes (twice) an invisible keypoint's label.

    It is the first unused text-side id after the 100 sentinels (33100 for T5's vocabulary), so it
    collides with no text, location or sentinel id. If the padding leaves no free id (text size
    already a multiple of 128) the last sentinel ``<extra_id_99>`` is used instead.
    """
    if vocab.sentinel_end < vocab.image_bos_id:
        return vocab.sentinel_end
    return vocab.sentinel_id(vocab.num_sentinels - 1)


def _labelled_boxes_target(processor: Processor, boxes: np.ndarray, labels: list[str], hw, with_labels: bool
                           ) -> tuple[list[int], int]:
    """Boxes (+ labels) -> target ids ending with EOS; whole objects only, within the decoder length."""
    v = processor.vocab
    ids: list[int] = []
    n = 0
    for box, label in zip(boxes, labels):
        item = v.box_to_tokens(box, hw) + (processor.tokens(label) if with_labels else [])
        if len(ids) + len(item) + 1 > processor.max_target_len:
            break
        ids += item
        n += 1
    return ids + [v.eos_id], n


def _decode_boxes(ids, meta, processor: Processor, max_boxes: int | None = None) -> dict[str, Any]:
    v = processor.vocab
    hw = meta_hw(meta) or (1, 1)
    items = parse_located(ids, v, 4)
    if max_boxes is not None:
        items = items[:max_boxes]
    boxes = np.array([tokens_to_box(locs, v, hw) for locs, _ in items], dtype=np.float64).reshape(-1, 4)
    labels = [processor.decode_text(lab) for _, lab in items]
    n = len(items)
    scores = 1.0 - np.arange(n, dtype=np.float64) / max(n, 1) if n else np.zeros(0)  # generation order
    return {"boxes": boxes, "labels": labels, "scores": scores}


class DetectionTask(Task):
    name = "detection"
    group = "sparse_labelling"
    prompts = (DETECTION_PROMPT, "Find all objects and their locations in the image .",
               "List the objects in the image and their regions .")
    output = "boxes"
    output_format = "`[y1 x1 y2 x2 label]*` location tokens + class text, all objects (random order in training)"
    metrics = ("detection_map",)
    generation_config = GenerationConfig(max_text_len=128)
    required_keys = ("image", "boxes", "labels")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        boxes = check_boxes(example["boxes"], self.name)
        labels = list(example["labels"])
        if len(labels) != len(boxes):
            raise ValueError(f"{self.name}: {len(boxes)} boxes but {len(labels)} labels; they must pair up")
        labels = [check_text(l, self.name, f"labels[{i}]") for i, l in enumerate(labels)]
        order = rng.permutation(len(boxes)) if train else np.arange(len(boxes))
        target, n = _labelled_boxes_target(processor, boxes[order], [labels[i] for i in order], hw, True)
        prompt = self.prompt(rng, train)
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           target, None, prompt=prompt, num_objects=n,
                           gt={"boxes": boxes, "labels": labels})

    def _decode(self, ids, image, meta, processor):
        return _decode_boxes(ids, meta, processor)

    def allowed_tokens(self, processor):
        return loc_structure_mask(processor.vocab, 4, "text")


class ObjectLocalizationTask(Task):
    name = "object_localization"
    group = "sparse_labelling"
    prompts = (REFEXP_PROMPT, 'Find all instances of " {} " in the image .', 'Where are the " {} " in the image ?')
    output = "boxes"
    output_format = "`[y1 x1 y2 x2 label]*` every box of the class; empty (EOS only) when the class is absent"
    metrics = ("box_accuracy",)
    generation_config = GenerationConfig(max_text_len=128)
    required_keys = ("image", "boxes", "label")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        boxes = check_boxes(example["boxes"], self.name)
        label = check_text(example["label"], self.name, "label")
        order = rng.permutation(len(boxes)) if train else np.arange(len(boxes))
        target, n = _labelled_boxes_target(processor, boxes[order], [label] * len(boxes), hw, True)
        prompt = self.prompt(rng, train).replace("{}", label)
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           target, None, prompt=prompt, label=label, gt={"boxes": boxes})

    def _decode(self, ids, image, meta, processor):
        return _decode_boxes(ids, meta, processor)

    def allowed_tokens(self, processor):
        return loc_structure_mask(processor.vocab, 4, "text")


class ReferringExpressionTask(Task):
    name = "referring_expression"
    group = "sparse_labelling"
    prompts = (REFEXP_PROMPT, 'Find the region described by " {} " .', 'Where is " {} " in the image ?')
    output = "boxes"
    output_format = "`y1 x1 y2 x2` one box (4 location tokens)"
    metrics = ("box_accuracy",)
    generation_config = GenerationConfig(max_text_len=32)
    required_keys = ("image", "box", "expression")

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        box = check_box(example["box"], self.name)
        expr = check_text(example["expression"], self.name, "expression")
        prompt = self.prompt(rng, train).replace("{}", expr)
        target = processor.vocab.box_to_tokens(box, hw) + [processor.vocab.eos_id]
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           target, None, prompt=prompt, gt={"boxes": box[None]})

    def _decode(self, ids, image, meta, processor):
        out = _decode_boxes(ids, meta, processor, max_boxes=1)
        out.pop("labels")
        return out

    def allowed_tokens(self, processor):
        return loc_structure_mask(processor.vocab, 4, "eos")


class KeypointsTask(Task):
    """One person's 17 COCO joints in a given region (paper A.1.2).

    Each joint is ``y x label`` (location tokens + visibility text "1"/"2"/"3"); a joint without
    coordinates (COCO v = 0) uses two copies of :func:`no_coordinates_id` instead of ``y x``. That
    token is masked at inference so the model always guesses coordinates.
    """

    name = "keypoints"
    group = "sparse_labelling"
    prompts = (POSE_ESTIMATION, 'Locate the human joints in the region " {} " .',
               'Where are the body keypoints of the person in " {} " ?')
    output = "keypoints"
    output_format = "17 × `y x v` (location tokens + visibility 1/2/3); invisible joints: 2 × no-coordinates token"
    metrics = ("keypoint_oks_ap",)
    generation_config = GenerationConfig(max_text_len=128, method="sample", top_p=0.9)
    required_keys = ("image", "box", "keypoints")

    def _check_keypoints(self, kps) -> np.ndarray:
        try:
            arr = np.asarray(kps, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}: keypoints must be 17 [x, y, v] triples, got {kps!r:.80}") from None
        if arr.shape != (NUM_KEYPOINTS, 3):
            raise ValueError(f"{self.name}: keypoints must have shape (17, 3) [x, y, v] in COCO order, got {arr.shape}")
        if not np.all(np.isfinite(arr)) or not np.isin(arr[:, 2], (0, 1, 2)).all():
            raise ValueError(f"{self.name}: keypoint visibilities must be 0, 1 or 2 (COCO), got {arr[:, 2].tolist()}")
        return arr

    def _encode(self, example, processor, rng, train):
        hw = image_hw(example, self.name)
        box = check_box(example["box"], self.name)
        kps = self._check_keypoints(example["keypoints"])
        v = processor.vocab
        nc = no_coordinates_id(v)
        target: list[int] = []
        for x, y, vis in kps:
            target += v.point_to_tokens((x, y), hw) if vis > 0 else [nc, nc]
            target += processor.tokens(str(int(vis) + 1))
        target = target[: processor.max_target_len - 1] + [v.eos_id]
        prompt = self.prompt(rng, train).replace("{}", processor.region_text(box, hw))
        return self.sample(processor, example, processor.encode_text(prompt), processor.image_input(example["image"]),
                           target, None, prompt=prompt, box=box.tolist(), gt={"keypoints": kps, "box": box})

    def _decode(self, ids, image, meta, processor):
        v = processor.vocab
        nc = no_coordinates_id(v)
        hw = meta_hw(meta) or (1, 1)
        items = parse_located(ids, v, 2, is_coord=lambda a: v.is_loc(a) | (a == nc))
        points = np.full((NUM_KEYPOINTS, 2), np.nan)
        vis = np.zeros(NUM_KEYPOINTS, np.int64)
        valid = len(items) == NUM_KEYPOINTS
        for j, (coords, label) in enumerate(items[:NUM_KEYPOINTS]):
            if all(v.is_loc(np.int64(c)) for c in coords):
                points[j] = np.clip(v.tokens_to_point(coords, hw), 0, [hw[1], hw[0]])
            try:
                lab = int(processor.decode_text(label)) - 1
            except ValueError:
                lab, valid = 0, False
            if not 0 <= lab <= 2:
                lab, valid = 0, False
            vis[j] = lab if not np.isnan(points[j]).any() else 0
        # joints without coordinates: the mean of the predicted points (as the original), else the box centre
        have = ~np.isnan(points).any(1)
        if have.any():
            fill = points[have].mean(0)
        else:  # nothing predicted: the centre of the person box (or of the image)
            try:
                box = np.asarray(meta.get("box"), dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                box = np.zeros(0)
            if box.size != 4 or not np.isfinite(box).all():
                box = np.array([0.0, 0.0, hw[1], hw[0]])
            fill = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        points[~have] = fill
        kps = np.concatenate([points, vis[:, None].astype(np.float64)], 1)
        return {"keypoints": kps, "score": float(have.mean()) if items else 0.0, "valid": bool(valid)}

    def allowed_tokens(self, processor):
        nc = no_coordinates_id(processor.vocab)
        return loc_structure_mask(processor.vocab, 2, "text", extra_coord=[nc], banned=[nc])
