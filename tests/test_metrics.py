"""Task metrics: every metric against hand-computed values, COCO mAP against pycocotools' COCOeval
run directly on COCO-format files, VQA v2 accuracy on a VQA-format fixture, DDP gathering."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from uio.metrics import METRICS, MetricInputError, build_metric, caption_tokenize, corpus_bleu, vqa_normalize
from uio.metrics.grit import GRIT_TASKS, GritEvaluator, grit_scores

COCO_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def compute(name: str, preds: list[dict], targets: list[dict], **kwargs) -> dict[str, float]:
    m = build_metric(name, **kwargs)
    m.update(preds, targets)
    return m.compute()


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
def test_registry_has_every_metric_and_rejects_unknown_names():
    expected = {
        "detection_map", "box_accuracy", "keypoint_oks_ap", "mask_iou", "depth", "surface_normals",
        "vqa_accuracy", "captioning", "accuracy", "squad", "rouge", "image_similarity", "grounded_vqa",
        "relationship_accuracy",
    }  # fmt: skip
    assert set(METRICS) == expected
    for name in expected:
        m = build_metric(name)
        assert isinstance(m, torch.nn.Module) and m.name == name
    with pytest.raises(KeyError, match="known metrics: accuracy, box_accuracy"):
        build_metric("bleu")


def test_update_reset_and_accumulation_across_batches():
    m = build_metric("accuracy")
    m.update([{"label": "Cat"}], [{"label": "cat "}])
    m.update([{"label": "dog"}, {"label": "cat"}], [{"label": "cow"}, {"label": "cat"}])
    assert m.compute() == {"acc": pytest.approx(2 / 3)}
    m.reset()
    m.update([{"label": "dog"}], [{"label": "cow"}])
    assert m.compute() == {"acc": 0.0}


@pytest.mark.parametrize(
    "name, pred, target, message",
    [
        ("detection_map", {"boxes": [1, 2, 3], "labels": ["a"]}, {"boxes": [], "labels": []}, r"pred\['boxes'\] must have shape \(N, 4\)"),
        ("detection_map", {"boxes": [[0, 0, 1, 1]], "labels": []}, {"boxes": [], "labels": []}, "1 boxes"),
        ("vqa_accuracy", {"answer": "yes"}, {"answers": []}, "at least one"),
        ("vqa_accuracy", {"text": 3}, {"answers": ["a"]}, "must be a string"),
        ("depth", {"depth": np.ones((4, 4))}, {"depth": np.ones((4, 5))}, r"resized to the ground truth"),
        ("depth", {"depth": np.ones((4, 4))}, {"image": 1}, "no 'depth' key"),
        ("mask_iou", {"masks": [np.ones((3, 3), bool)]}, {"masks": [np.ones((3, 4), bool)]}, "same \\(H, W\\)"),
        ("surface_normals", {"normals": np.ones((2, 2))}, {"normals": np.ones((2, 2, 3))}, r"\(N, N, 3\)"),
        ("image_similarity", {"image": np.zeros((2, 2, 3))}, {"image": np.zeros((2, 2, 3), np.uint8)}, "uint8"),
        ("keypoint_oks_ap", {"keypoints": np.zeros((16, 3))}, {"keypoints": np.zeros((17, 3)), "box": [0, 0, 1, 1]}, r"\(17, 3\)"),
    ],
)  # fmt: skip
def test_bad_input_names_the_field_and_the_expected_format(name, pred, target, message):
    with pytest.raises(MetricInputError, match=message) as e:
        build_metric(name).update([pred], [target])
    assert name in str(e.value) and "example 0" in str(e.value)


def test_length_mismatch_and_non_list_input():
    with pytest.raises(MetricInputError, match="2 predictions but 1 targets"):
        build_metric("accuracy").update([{"label": "a"}, {"label": "b"}], [{"label": "a"}])
    with pytest.raises(MetricInputError, match="lists of dicts"):
        build_metric("accuracy").update({"label": "a"}, {"label": "a"})


# ----------------------------------------------------------------------------------------------
# detection mAP
# ----------------------------------------------------------------------------------------------
def test_detection_map_hand_computed():
    gt = {"boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "labels": ["cat", "dog"]}
    perfect = {"boxes": gt["boxes"], "labels": ["Cat", " dog"], "scores": [0.9, 0.8]}
    assert compute("detection_map", [perfect], [gt])["map"] == pytest.approx(1.0)
    # two cats, one found: precision 1 up to recall 0.5 -> 51 of COCO's 101 recall points
    two_cats = {"boxes": [[0, 0, 10, 10], [50, 50, 70, 70]], "labels": ["cat", "cat"]}
    one = {"boxes": [[0, 0, 10, 10]], "labels": ["cat"], "scores": [0.9]}
    r = compute("detection_map", [one], [two_cats])
    assert r["map"] == pytest.approx(51 / 101) and r["map_50"] == pytest.approx(51 / 101)
    assert r["mar_100"] == pytest.approx(0.5)
    # the right box with the wrong class finds nothing
    assert compute("detection_map", [{**one, "labels": ["dog"]}], [two_cats])["map"] == 0.0
    # no ground truth and no detections anywhere: undefined
    assert math.isnan(compute("detection_map", [{"boxes": [], "labels": []}], [{"boxes": [], "labels": []}])["map"])


def test_malformed_predictions_score_but_never_raise():
    gt = {"boxes": [[0, 0, 10, 10]], "labels": ["cat"]}
    bad = {"boxes": [[np.nan, 0, 5, 5], [9, 9, 1, 1], [0, 0, 10, 10]], "labels": ["cat", "cat", "cat"],
           "scores": [0.99, 0.98, 0.5]}
    # the NaN box is dropped; the flipped box is an empty false positive ranked first -> precision 1/2
    assert compute("detection_map", [bad], [gt])["map"] == pytest.approx(0.5)
    assert compute("box_accuracy", [{"boxes": [[9, 9, 1, 1]]}], [gt])["acc"] == 0.0
    # the torchmetrics forward() (batch value + accumulation) works with record states
    m = build_metric("detection_map")
    assert m([bad], [gt])["map"] == pytest.approx(0.5)
    assert m([{"boxes": [], "labels": []}], [gt])["map"] == 0.0
    assert m.compute()["map"] == pytest.approx(51 / 101 * 0.5)  # recall 1/2 at precision 1/2


def _coco_fixture() -> tuple[dict, list[dict]]:
    """A tiny COCO instances file (real format) and detections in the COCO results format."""
    images = [
        {"id": 397133, "file_name": "000000397133.jpg", "width": 640, "height": 427},
        {"id": 37777, "file_name": "000000037777.jpg", "width": 352, "height": 230},
        {"id": 252219, "file_name": "000000252219.jpg", "width": 640, "height": 428},
    ]
    categories = [
        {"supercategory": "person", "id": 1, "name": "person"},
        {"supercategory": "animal", "id": 18, "name": "dog"},
        {"supercategory": "animal", "id": 17, "name": "cat"},
        {"supercategory": "vehicle", "id": 3, "name": "car"},
    ]
    ann = [  # (image, category, bbox xywh, area, iscrowd)
        (397133, 1, [10, 10, 50, 100], 3500.0, 0),
        (397133, 1, [200, 50, 30, 60], 1500.0, 0),
        (397133, 18, [100, 150, 80, 60], 4000.0, 0),
        (37777, 17, [20, 30, 40, 40], 1200.0, 0),
        (37777, 17, [300, 200, 10, 10], 90.0, 0),
        (37777, 1, [0, 0, 350, 220], 60000.0, 1),
        (252219, 18, [50, 50, 200, 150], 25000.0, 0),
        (252219, 1, [5, 5, 20, 30], 500.0, 0),
    ]
    annotations = [
        {"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": a, "iscrowd": cr,
         "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3], b[0], b[1] + b[3]]]}
        for i, (im, c, b, a, cr) in enumerate(ann)
    ]
    results = [  # (image, category, bbox, score)
        (397133, 1, [12, 8, 50, 100], 0.95),
        (397133, 1, [205, 55, 30, 60], 0.60),
        (397133, 1, [400, 300, 40, 40], 0.70),
        (397133, 18, [100, 150, 80, 60], 0.90),
        (397133, 3, [0, 0, 100, 100], 0.50),
        (37777, 17, [22, 32, 38, 36], 0.85),
        (37777, 17, [22, 30, 40, 40], 0.40),
        (37777, 1, [30, 30, 100, 100], 0.80),
        (252219, 18, [60, 40, 190, 170], 0.75),
        (252219, 1, [5, 5, 20, 30], 0.30),
        (252219, 17, [60, 40, 190, 170], 0.65),
    ]
    dets = [{"image_id": im, "category_id": c, "bbox": b, "score": s} for im, c, b, s in results]
    return {"info": {"description": "uio test fixture"}, "images": images, "annotations": annotations,
            "categories": categories}, dets


def test_detection_map_matches_cocoeval_on_coco_files(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = _coco_fixture()
    (tmp_path / "instances.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(dets))
    coco = COCO(str(tmp_path / "instances.json"))
    ev = COCOeval(coco, coco.loadRes(str(tmp_path / "results.json")), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    ref = ev.stats

    names = {c["id"]: c["name"] for c in gt["categories"]}
    xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
    preds, targets = [], []
    for img in gt["images"]:
        a = [x for x in gt["annotations"] if x["image_id"] == img["id"]]
        d = [x for x in dets if x["image_id"] == img["id"]]
        targets.append({"boxes": [xyxy(x["bbox"]) for x in a], "labels": [names[x["category_id"]] for x in a],
                        "areas": [x["area"] for x in a], "iscrowd": [x["iscrowd"] for x in a]})
        preds.append({"boxes": np.array([xyxy(x["bbox"]) for x in d], float),
                      "labels": [names[x["category_id"]].upper() for x in d],
                      "scores": torch.tensor([x["score"] for x in d])})
    m = build_metric("detection_map")
    m.update(preds[:2], targets[:2])
    m.update(preds[2:], targets[2:])
    out = m.compute()
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100"]
    assert 0.2 < ref[0] < 0.9  # the fixture is neither trivial nor hopeless
    for i, k in enumerate(keys):
        assert out[k] == pytest.approx(ref[i], abs=1e-12) if ref[i] >= 0 else math.isnan(out[k]), k


# ----------------------------------------------------------------------------------------------
# box accuracy (localisation, referring expressions)
# ----------------------------------------------------------------------------------------------
def test_box_accuracy_hand_computed():
    b = lambda *bs: {"boxes": [list(x) for x in bs]}  # noqa: E731
    preds = [
        b((0, 0, 10, 10)),  # vs (5,0,15,10): IoU 50/150 = 1/3 -> miss
        b((0, 0, 10, 10)),  # vs (0,0,10,12): IoU 100/120 -> hit
        b((50, 50, 60, 60), (0, 0, 10, 10)),  # only the first box counts -> miss
        b(),  # absent class, nothing predicted -> hit
        b(),  # present class, nothing predicted -> miss
        b((0, 0, 10, 10)),  # absent class, a box predicted -> miss
    ]
    targets = [b((5, 0, 15, 10)), b((0, 0, 10, 12)), b((0, 0, 10, 10)), b(), b((0, 0, 5, 5)), b()]
    r = compute("box_accuracy", preds, targets)
    assert r["acc"] == pytest.approx(2 / 6)
    # GRIT localisation per image: sum(IoU of matched pairs) / (#pred + #gt - #pairs)
    per_image = [1 / 3, 100 / 120, 1 / 2, 1.0, 0.0, 0.0]  # image 3: (0 + 1) / (2 + 1 - 1)
    assert r["grit_loc"] == pytest.approx(np.mean(per_image))
    # pairs at IoU >= 0.5 over max(#pred, #gt)
    assert r["match50"] == pytest.approx(np.mean([0, 1, 1 / 2, 1, 0, 0]))
    # several boxes: (1 + 0.5) / (2 + 3 - 2); the box matching nothing adds to the denominator
    r = compute("box_accuracy", [b((0, 0, 10, 10), (20, 0, 30, 10))],
                [b((0, 0, 10, 10), (20, 0, 40, 10), (100, 100, 110, 110))])
    assert r["grit_loc"] == pytest.approx(1.5 / 3) and r["acc"] == 1.0 and r["match50"] == pytest.approx(2 / 3)
    # a single "box" target and the threshold argument
    assert compute("box_accuracy", [b((0, 0, 10, 10))], [{"box": [0, 0, 10, 12]}], iou_threshold=0.9)["acc"] == 0.0


# ----------------------------------------------------------------------------------------------
# keypoints
# ----------------------------------------------------------------------------------------------
SIGMAS = np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]) / 10


def _person(x0=100.0, y0=100.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    k = np.zeros((17, 3))
    k[:, 0] = x0 + rng.uniform(10, 90, 17)
    k[:, 1] = y0 + rng.uniform(10, 190, 17)
    k[:, 2] = 2
    return k


def test_keypoint_ap_perfect_and_perturbed():
    gt = _person()
    box = [100, 100, 200, 300]  # area 20000 = the OKS scale s^2
    perfect = compute("keypoint_oks_ap", [{"keypoints": gt, "score": 0.9}], [{"keypoints": gt, "box": box}])
    assert perfect["ap"] == pytest.approx(1.0) and perfect["ap50"] == pytest.approx(1.0)
    assert perfect["grit_kp"] == pytest.approx(1.0)

    # shift every joint by 7 px: OKS = mean_i exp(-d^2 / (2 s^2 (2 sigma_i)^2))
    dx = 7.0
    oks = np.mean(np.exp(-(dx**2) / (2 * 20000 * (2 * SIGMAS) ** 2)))
    assert np.abs(COCO_THRESHOLDS - oks).min() > 0.01  # not on a threshold
    pred = gt.copy()
    pred[:, 0] += dx
    pred[:, 2] = 0  # predicted visibility is ignored
    r = compute("keypoint_oks_ap", [{"keypoints": pred, "score": torch.tensor([0.5])}], [{"keypoints": gt, "box": box}])
    # one person, one guess: AP at threshold t is 1 if OKS >= t else 0
    assert r["ap"] == pytest.approx(np.mean(COCO_THRESHOLDS <= oks)) and 0 < r["ap"] < 1
    assert r["ap50"] == pytest.approx(1.0)
    # GRIT: the same OKS but with the area of the labelled joints' extent
    ext = np.ptp(gt[:, 0]) * np.ptp(gt[:, 1])
    assert r["grit_kp"] == pytest.approx(np.mean(np.exp(-(dx**2) / (2 * ext * (2 * SIGMAS) ** 2))))


def test_keypoint_ap_unlabelled_joints_and_people():
    gt = _person()
    gt[:8, 2] = 0  # unlabelled joints: a wild guess there costs nothing
    pred = gt.copy()
    pred[:8, :2] = 0.0
    box = [100, 100, 200, 300]
    assert compute("keypoint_oks_ap", [{"keypoints": pred}], [{"keypoints": gt, "box": box}])["ap"] == pytest.approx(1.0)
    # two people in the image, one found: recall 1/2 (COCO ignores the one with no labelled joint)
    other, nobody = _person(300, 100), np.zeros((17, 3))
    target = {"keypoints": np.stack([gt, other, nobody]), "boxes": [box, [300, 100, 400, 300], [0, 0, 50, 50]],
              "areas": [20000, 20000, 2500]}
    r = compute("keypoint_oks_ap", [{"keypoints": pred[None], "scores": [0.8]}], [target])
    assert r["ap"] == pytest.approx(51 / 101)
    assert r["grit_kp"] == pytest.approx(1 / 2)  # (1.0) / (1 pred + 2 people - 1 pair)


# ----------------------------------------------------------------------------------------------
# masks, depth, normals, images
# ----------------------------------------------------------------------------------------------
def _rect(h, w, r0, r1, c0, c1):
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


def test_mask_iou_hand_computed():
    a, b = _rect(10, 10, 0, 4, 0, 4), _rect(10, 10, 0, 4, 2, 6)  # 16 px each, 8 shared: IoU 8/24
    c = _rect(10, 10, 6, 10, 6, 10)
    r = compute("mask_iou", [{"masks": [a, c]}], [{"masks": [b, c]}])
    # union: (8 + 16) / (32 + 24 - 24 ... ) -> |A u C| = 32, |B u C| = 32, shared 24 -> 24 / 40
    assert r["iou"] == pytest.approx(24 / 40)
    # instances: pairs (a, b) 1/3 and (c, c) 1 -> (1/3 + 1) / (2 + 2 - 2)
    assert r["instance_iou"] == pytest.approx((1 / 3 + 1) / 2) and r["grit_seg"] == r["instance_iou"]
    # stuff: GRIT merges instances -> the union IoU
    assert compute("mask_iou", [{"masks": [a, c]}], [{"masks": [b, c], "stuff": True}])["grit_seg"] == pytest.approx(0.6)
    # an extra empty prediction counts against instances but not the union
    r = compute("mask_iou", [{"masks": np.stack([a, np.zeros_like(a)])}], [{"mask": a}])
    assert r["iou"] == 1.0 and r["instance_iou"] == pytest.approx(0.5)
    # an absent class predicted as absent is right; anything predicted is wrong
    r = compute("mask_iou", [{"masks": []}, {"masks": [a]}], [{"masks": []}, {"masks": []}])
    assert r["iou"] == pytest.approx(0.5) and r["instance_iou"] == pytest.approx(0.5)


def test_depth_nyu_protocol_hand_computed():
    gt = np.array([[1.0, 2.0], [0.0, 4.0]])  # 0 = no measurement
    pred = np.array([[1.5, 2.0], [7.0, 20.0]])  # 20 is clipped to max_depth 10
    r = compute("depth", [{"depth": pred}], [{"depth": gt, "max_depth": 10.0}])
    p, g = np.array([1.5, 2.0, 10.0]), np.array([1.0, 2.0, 4.0])
    assert r["rmse"] == pytest.approx(math.sqrt((0.25 + 0 + 36) / 3))
    assert r["abs_rel"] == pytest.approx((0.5 + 0 + 1.5) / 3)
    # ratios 1.5, 1, 2.5 against 1.25, 1.5625, 1.953
    assert (r["delta1"], r["delta2"], r["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))
    assert r["log10"] == pytest.approx(np.mean(np.abs(np.log10(p / g))))
    # the metric's max_depth overrides the target's and excludes far ground truth
    r = compute("depth", [{"depth": pred}], [{"depth": gt, "max_depth": 10.0}], max_depth=3.0)
    assert r["rmse"] == pytest.approx(math.sqrt(0.25 / 2))
    # errors are per image, then averaged over images
    r = compute("depth", [{"depth": np.full((2, 2), 2.0)}, {"depth": np.full((2, 2), 1.0)}],
                [{"depth": np.full((2, 2), 1.0)}, {"depth": np.full((2, 2), 1.0)}])
    assert r["rmse"] == pytest.approx(0.5) and r["delta1"] == pytest.approx(0.5)
    with pytest.raises(MetricInputError, match="480 x 640"):
        build_metric("depth", crop="eigen").update([{"depth": pred}], [{"depth": gt}])


def _tilt(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.sin(a), 0.0, math.cos(a)]


def test_surface_normals_hand_computed():
    gt = np.zeros((2, 3, 3))
    gt[..., 2] = 1.0
    pred = np.array([[_tilt(0), _tilt(10), _tilt(20)], [_tilt(45), _tilt(90), _tilt(5)]]) * 3.0  # any length
    valid = np.array([[1, 1, 1], [1, 0, 1]], bool)
    r = compute("surface_normals", [{"normals": pred}], [{"normals": gt, "valid": valid}])
    errs = np.array([0, 10, 20, 45, 5])
    assert r["mean"] == pytest.approx(errs.mean())
    assert r["median"] == pytest.approx(10.0, abs=0.01)
    assert r["rmse"] == pytest.approx(math.sqrt(np.mean(errs**2)))
    assert (r["pct_11.25"], r["pct_22.5"], r["pct_30"]) == pytest.approx((60.0, 80.0, 80.0))


def test_surface_normals_pooled_median_and_grit_rotation():
    rng = np.random.default_rng(1)
    gts, preds, errs = [], [], []
    for _ in range(3):
        g = rng.normal(size=(8, 9, 3))
        g /= np.linalg.norm(g, axis=-1, keepdims=True)
        p = g + rng.normal(scale=0.3, size=g.shape)
        cos = (p * g).sum(-1) / np.linalg.norm(p, axis=-1)
        errs.append(np.degrees(np.arccos(np.clip(cos, -1, 1))).ravel())
        gts.append({"normals": g})
        preds.append({"normals": torch.from_numpy(p)})
    r = compute("surface_normals", preds, gts)
    errs = np.concatenate(errs)
    assert r["median"] == pytest.approx(np.median(errs), abs=0.01)
    assert r["pct_11.25"] == pytest.approx(100 * np.mean(errs < 11.25))
    # GRIT removes a global rotation before scoring: a rotated perfect prediction scores 1
    from scipy.spatial.transform import Rotation

    g = gts[0]["normals"]
    rot = Rotation.from_euler("y", 40, degrees=True).apply(g.reshape(-1, 3)).reshape(g.shape)
    r = compute("surface_normals", [{"normals": rot}], [{"normals": g}])
    assert r["pct_11.25"] < 10.0 and r["grit_sn"] == pytest.approx(1.0)


def test_image_similarity_hand_computed():
    a = np.full((4, 4, 3), 100, np.uint8)
    b = np.full((4, 4, 3), 110, np.uint8)
    r = compute("image_similarity", [{"image": a}, {"image": a}], [{"image": b}, {"image": a}])
    assert r["psnr"] == pytest.approx((10 * math.log10(255**2 / 100) + 100.0) / 2)
    assert r["l1"] == pytest.approx((10 / 255) / 2)


# ----------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),  # number word, final period
        ("the Cat", "cat"),  # lower-case, article
        ("dont know", "don't know"),  # contraction table
        ("1,000", "1000"),  # digit,digit: punctuation deleted, not spaced
        ("yes!", "yes"),
        ("t-shirt", "t shirt"),  # a mark not touching a space becomes a space
        ("black - white", "black white"),  # ... and is deleted when it does
        ("3.5 feet", "3.5 feet"),  # a period before a digit stays
        ("mr. smith", "mr smith"),
        ("none", "0"),
    ],
)
def test_vqa_answer_normalization(raw, normalized):
    assert vqa_normalize(raw) == normalized


# (question, 10 human answers, prediction, expected accuracy worked out by hand):
# accuracy = mean over the 10 leave-one-out subsets of min(1, #matching among the other 9 / 3)
VQA_CASES = [
    ("What is this photo taken looking through?",
     ["net", "net", "net", "netting", "net", "net", "mesh", "net", "pitcher", "orange"], "net", 1.0),  # 6 match
    ("What is this photo taken looking through?",
     ["net", "net", "net", "netting", "net", "net", "mesh", "net", "pitcher", "orange"], "netting", 0.3),  # 9 x 1/3
    ("What position is this man playing?", ["pitcher"] * 9 + ["catcher"], "Pitcher", 1.0),  # normalised
    ("What position is this man playing?", ["pitcher"] * 9 + ["catcher"], "catcher", 0.3),
    ("Is it sunny?", ["yes"] * 10, "Yes", 0.0),  # unanimous humans: no normalisation at all (official)
    ("Is it sunny?", ["yes"] * 10, "yes ", 1.0),  # ... but stripped
    ("How many?", ["two"] * 4 + ["2"] * 3 + ["3"] * 3, "2", 1.0),  # 7 match after two -> 2
    ("What animal?", ["a dog", "a dog", "dog"] + ["cat"] * 7, "the dog", 0.9),  # 3 x 2/3 + 7 x 1
    ("What is he wearing?", ["t-shirt"] * 3 + ["shirt"] * 7, "t shirt", 0.9),
    ("Do you know?", ["dont know"] * 5 + ["no"] * 5, "don't know", 1.0),
    ("How many?", ["1"] * 2 + ["2"] * 8, "1", 0.2 * 1 / 3 + 0.8 * 2 / 3),  # 2 x 1/3 + 8 x 2/3
]  # fmt: skip


def _write_vqa_fixture(root: Path) -> None:
    """VQA v2 files as released: questions, annotations (full records) and an OpenEnded result file."""
    header = {
        "info": {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org", "version": "2.0",
                 "year": 2017, "contributor": "VQA Team", "date_created": "2017-04-26 17:07:13"},
        "license": {"url": "http://creativecommons.org/licenses/by/4.0/",
                    "name": "Creative Commons Attribution 4.0 International License"},
        "data_subtype": "val2014", "data_type": "mscoco",
    }
    questions, annotations, results = [], [], []
    for i, (q, answers, pred, _) in enumerate(VQA_CASES):
        image_id = 458752 + i
        qid = image_id * 1000
        questions.append({"image_id": image_id, "question": q, "question_id": qid})
        annotations.append({
            "question_type": "what", "multiple_choice_answer": max(set(answers), key=answers.count),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)],
            "image_id": image_id, "answer_type": "other", "question_id": qid,
        })
        results.append({"question_id": qid, "answer": pred})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({**header, "task_type": "Open-Ended", "questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({**header, "annotations": annotations}))
    (root / "vqa_OpenEnded_mscoco_val2014_uio_results.json").write_text(json.dumps(results))


def test_vqa_accuracy_on_vqa_v2_files(tmp_path):
    _write_vqa_fixture(tmp_path)
    anns = json.loads((tmp_path / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    res = {r["question_id"]: r["answer"] for r in json.loads((tmp_path / "vqa_OpenEnded_mscoco_val2014_uio_results.json").read_text())}
    preds = [{"answer": res[a["question_id"]]} for a in anns]
    targets = [{"answers": [x["answer"] for x in a["answers"]]} for a in anns]
    for p, t, case in zip(preds, targets, VQA_CASES):
        assert compute("vqa_accuracy", [p], [t])["acc"] == pytest.approx(case[3]), case
    m = build_metric("vqa_accuracy")
    m.update(preds[:5], targets[:5])
    m.update(preds[5:], targets[5:])
    assert m.compute()["acc"] == pytest.approx(np.mean([c[3] for c in VQA_CASES]))


def test_vqa_grit_variant_and_grounded_vqa():
    # GRIT always normalises and counts all 10 answers: min(1, #match / 3)
    assert compute("vqa_accuracy", [{"answer": "Yes"}], [{"answers": ["yes"] * 10}])["grit_acc"] == 1.0
    assert compute("vqa_accuracy", [{"answer": "catcher"}], [{"answers": ["pitcher"] * 9 + ["catcher"]}])["grit_acc"] == pytest.approx(1 / 3)
    m = _rect(6, 6, 0, 3, 0, 3)
    r = compute("grounded_vqa", [{"answer": "red", "masks": [_rect(6, 6, 0, 3, 0, 2), _rect(6, 6, 0, 1, 2, 3)]}],
                [{"answers": ["red"] * 10, "mask": m}])
    assert r == {"acc": 1.0, "mask_iou": pytest.approx(7 / 9)}


# ----------------------------------------------------------------------------------------------
# captions, text
# ----------------------------------------------------------------------------------------------
def test_caption_tokenizer_approximates_ptb():
    assert caption_tokenize("A man's T-shirt, isn't it?  3.5 m.") == ["a", "man", "'s", "t-shirt", "is", "n't", "it", "3.5", "m"]


def test_cider_d_hand_computed():
    """CIDEr-D on two images, one reference each.

    idf(g) = log(2) - log(max(1, df(g))): "a" occurs in the references of both images -> idf 0;
    every other n-gram occurs in one image's references (or none) -> idf log 2 =: L.
    Image 1, hypothesis == reference "a cat sits": for n = 1, 2, 3 the vectors are equal -> cosine 1;
    no 4-grams -> 0. Score = 10 * (1 + 1 + 1 + 0) / 4 = 7.5.
    Image 2, "a dog" vs "a dog runs": n=1: h = {a: 0, dog: L}, r = {a: 0, dog: L, runs: L}
    -> L^2 / (L * sqrt(2) L) = 1/sqrt(2); n=2: {"a dog": L} vs {"a dog": L, "dog runs": L} -> 1/sqrt(2);
    n=3, 4: 0. Lengths (bigram counts) 1 vs 2 -> penalty exp(-1/72).
    Score = 10 * (2/sqrt(2)) / 4 * exp(-1/72). CIDEr = mean of the two.
    """
    preds = [{"text": "A cat sits."}, {"text": "a dog"}]
    targets = [{"captions": ["a cat sits"]}, {"captions": ["A dog runs"]}]
    r = compute("captioning", preds, targets)
    img2 = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert r["cider"] == pytest.approx((7.5 + img2) / 2)
    # a single image has idf 0 everywhere (log 1): CIDEr 0, as in coco-caption
    assert compute("captioning", preds[:1], targets[:1])["cider"] == 0.0


def test_bleu4_hand_computed_and_against_torchmetrics():
    assert corpus_bleu([["a", "b", "c", "d"]], [[["a", "b", "c", "d"]]]) == pytest.approx(1.0)
    # clipped precisions p1 = 5/5, p2 = 3/4 ("on mat" missing), p3 = 2/3, p4 = 1/2 ("the cat sat on");
    # closest reference length 6 (vs 7) for 5 words -> BP = exp(1 - 6/5)
    hyp = "the cat sat on mat".split()
    refs = ["the cat sat on a mat".split(), "a cat is on the mat today".split()]
    assert corpus_bleu([hyp], [refs]) == pytest.approx(math.exp(-0.2) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # no 4-gram in common: BLEU-4 is (numerically) zero
    assert corpus_bleu([["a", "cat", "on", "mat"]], [[["a", "cat", "sat", "on", "mat"]]]) < 1e-3
    from torchmetrics.text import BLEUScore

    preds = ["a black cat sits on the red mat", "two dogs play in the park near a tree"]
    targets = [["a black cat is sitting on the red mat", "the cat sits on a mat"],
               ["two dogs play in a park near the big tree", "dogs playing outside"]]
    r = compute("captioning", [{"text": p} for p in preds], [{"captions": t} for t in targets])
    ref = float(BLEUScore(n_gram=4)(preds, targets))
    assert 0.1 < ref < 0.9 and r["bleu4"] == pytest.approx(ref, rel=1e-6)


def test_squad_em_f1_known_cases():
    cases = [
        ("the Eiffel Tower!", ["Eiffel tower"], 1.0, 1.0),
        ("in Paris France", ["Paris", "Paris, France"], 0.0, 2 * (2 / 3) * 1 / (2 / 3 + 1)),  # best gold: 2 of 3 / 2 of 2
        ("Denver Broncos", ["Carolina Panthers"], 0.0, 0.0),
        ("", [], 1.0, 1.0),  # unanswerable, abstained
        ("somewhere", [], 0.0, 0.0),
        ("a", ["the"], 1.0, 1.0),  # both normalise to the empty answer
    ]
    r = compute("squad", [{"answer": c[0]} for c in cases], [{"answers": c[1]} for c in cases])
    assert r["em"] == pytest.approx(np.mean([c[2] for c in cases]))
    assert r["f1"] == pytest.approx(np.mean([c[3] for c in cases]))


def test_rouge_hand_computed():
    # unigrams: 5 of 6 shared; bigrams: "the cat", "on the", "the mat" of 5; LCS "the cat on the mat" = 5
    r = compute("rouge", [{"text": "The cat sat on the mat."}], [{"summary": "the cat was on the mat"}])
    assert r == {"rouge1": pytest.approx(5 / 6), "rouge2": pytest.approx(3 / 5), "rougeL": pytest.approx(5 / 6)}
    r = compute("rouge", [{"text": "the cat sat"}], [{"summaries": ["a dog", "the cat sat"]}])
    assert r["rouge1"] == pytest.approx(1.0)  # the best reference counts


def test_label_and_relationship_accuracy():
    assert compute("accuracy", [{"label": " Golden  Retriever"}], [{"label": "golden retriever"}]) == {"acc": 1.0}
    r = compute("relationship_accuracy", [{"predicate": "on"}, {"predicate": "holding"}],
                [{"predicate": "ON"}, {"predicate": "wearing"}])
    assert r == {"acc": 0.5}


# ----------------------------------------------------------------------------------------------
# GRIT aggregate
# ----------------------------------------------------------------------------------------------
def test_grit_scores_average_seven_tasks_missing_as_zero():
    res = {"vqa": {"acc": 0.1, "grit_acc": 0.6}, "referring_expression": {"acc": 0.5, "grit_loc": 0.2},
           "categorization": 0.9}
    s = grit_scores(res)
    assert s["vqa"] == pytest.approx(60) and s["refexp"] == pytest.approx(50) and s["categorization"] == pytest.approx(90)
    assert s["overall"] == pytest.approx((60 + 50 + 90) / 7)
    assert grit_scores(res, missing_as_zero=False)["overall"] == pytest.approx(200 / 3)
    with pytest.raises(KeyError, match="not a GRIT task"):
        grit_scores({"depth": 0.3})
    with pytest.raises(KeyError, match="grit_seg"):
        grit_scores({"segmentation": {"iou": 0.3}})


def test_grit_evaluator_end_to_end():
    ev = GritEvaluator()
    assert set(ev.metrics) == set(GRIT_TASKS)
    ev.update("region_classification", [{"label": "dog"}, {"label": "cat"}], [{"label": "dog"}, {"label": "dog"}])
    ev.update("object_localization", [{"boxes": [[0, 0, 10, 10]]}], [{"boxes": [[0, 0, 10, 10]]}])
    s = ev.compute()
    assert s == {"categorization": pytest.approx(50), "localization": pytest.approx(100), "overall": pytest.approx(150 / 7)}
    ev.reset()
    assert ev.compute() == {"overall": 0.0}


# ----------------------------------------------------------------------------------------------
# distributed: states gather across ranks
# ----------------------------------------------------------------------------------------------
def _ddp_batches():
    gt, dets = _coco_fixture()
    names = {c["id"]: c["name"] for c in gt["categories"]}
    xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
    det_p, det_t = [], []
    for img in gt["images"]:
        a = [x for x in gt["annotations"] if x["image_id"] == img["id"]]
        d = [x for x in dets if x["image_id"] == img["id"]]
        det_t.append({"boxes": [xyxy(x["bbox"]) for x in a], "labels": [names[x["category_id"]] for x in a]})
        det_p.append({"boxes": [xyxy(x["bbox"]) for x in d], "labels": [names[x["category_id"]] for x in d],
                      "scores": [x["score"] for x in d]})
    cap_p = [{"text": t} for t in ["a cat sits", "a dog", "two birds fly", "a red car"]]
    cap_t = [{"captions": [t]} for t in ["a cat sits", "a dog runs", "birds in the sky", "a red car parked"]]
    vqa_p = [{"answer": c[2]} for c in VQA_CASES]
    vqa_t = [{"answers": c[1]} for c in VQA_CASES]
    rng = np.random.default_rng(0)
    nrm_t = [{"normals": rng.normal(size=(4, 5, 3))} for _ in range(4)]
    nrm_p = [{"normals": t["normals"] + rng.normal(scale=0.5, size=(4, 5, 3))} for t in nrm_t]
    gt = _person()
    kp_p, kp_t = [{"keypoints": gt + [3.0, 0.0, 0.0], "score": 0.7}], [{"keypoints": gt, "box": [100, 100, 200, 300]}]
    sq_p, sq_t = [{"answer": "in Paris"}], [{"answers": ["Paris"]}]
    # the last two have one example: with two ranks, rank 1 contributes nothing
    return {"detection_map": (det_p, det_t), "captioning": (cap_p, cap_t), "vqa_accuracy": (vqa_p, vqa_t),
            "surface_normals": (nrm_p, nrm_t), "keypoint_oks_ap": (kp_p, kp_t), "squad": (sq_p, sq_t)}


def test_sync_in_a_one_process_group(tmp_path):
    """The distributed code path (tensor cat + object gathering) with world size 1."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for name, (p, t) in _ddp_batches().items():
            local = compute(name, p, t)
            m = build_metric(name)
            m.update(p, t)
            with torch.no_grad():
                synced = m.compute()
            assert synced == pytest.approx(local, nan_ok=True), name
            m.update(p[:1], t[:1])  # states were restored after the sync
    finally:
        dist.destroy_process_group()


_DDP_SCRIPT = """
import gc, json, os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, {tests!r})

def run(rank, out):
    from test_metrics import _ddp_batches
    from uio.metrics import build_metric
    dist.init_process_group("gloo", init_method="file://" + out + ".pg", rank=rank, world_size=2)
    res = {{}}
    for name, (p, t) in _ddp_batches().items():
        m = build_metric(name)
        m.update(p[rank::2], t[rank::2])
        res[name] = m.compute()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    os._exit(0)

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
"""


@pytest.mark.slow
def test_two_rank_ddp_equals_single_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(tests=str(Path(__file__).parent))))
    out = tmp_path / "res.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(out)], check=True, timeout=300, env=env)
    got = json.loads(out.read_text())
    for name, (p, t) in _ddp_batches().items():
        assert got[name] == pytest.approx(compute(name, p, t), nan_ok=True), name
