"""Every data recipe on a tiny fixture written here in the source's real on-disk format.

Each test writes annotation files with the real field names and layout (and a few images made on
the fly), runs the recipe, reads the shards back, checks the raw examples and encodes them with
their real task (proof that they meet contract 1).
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # data_recipes/ is a folder of scripts at the repository root

from data_recipes import (  # noqa: E402
    coco, conceptual_captions, gigaword, glue, imagenet, nyu_depth, refcoco, squad, text_corpus, visual_genome, vqa_v2,
)
from uio.data.shards import load_manifest, manifest_splits, manifest_urls, read_examples  # noqa: E402

_PROC: dict[str, object] = {}


@pytest.fixture(autouse=True)
def _processor(text_tokenizer):
    """A small Processor: every example a recipe writes is also encoded by its real task."""
    from uio.processing import Processor

    if "p" not in _PROC:
        _PROC["p"] = Processor(text_tokenizer, image_input_size=(32, 32), patch_size=16, image_target_size=(16, 16),
                               image_target_grid=(4, 4), max_input_len=64, max_target_len=64)


def _jpg(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def _read(out: Path, task: str, dataset: str, split: str) -> list[dict]:
    """Read a recipe's shards back, and check that the examples meet contract 1: their task encodes them."""
    from uio.tasks import get_task

    exs = read_examples(manifest_urls(out / task / dataset, split))
    rng = np.random.default_rng(0)
    for ex in exs[:3]:
        for train in (True, False):
            s = get_task(task).encode(ex, _PROC["p"], rng, train=train)
            assert s["task"] == task and s["text_inputs"][-1] == 1 and s["text_targets"][-1] == 1
    return exs


# ================================================================================================ COCO
def _coco_fixture(root: Path) -> None:
    ann = root / "annotations"
    ann.mkdir(parents=True)
    images = [{"license": 6, "file_name": "000000000139.jpg", "height": 48, "width": 64, "id": 139},
              {"license": 2, "file_name": "000000255917.jpg", "height": 40, "width": 60, "id": 255917}]
    for im in images:
        _jpg(root / "val2017" / im["file_name"], im["width"], im["height"], im["id"])
    cats = [{"supercategory": "person", "id": 1, "name": "person"}, {"supercategory": "vehicle", "id": 3, "name": "car"},
            {"supercategory": "animal", "id": 18, "name": "dog"}]
    anns = [
        {"segmentation": [[10.0, 10.0, 50.0, 10.0, 50.0, 44.0, 10.0, 44.0]], "area": 1360.0, "iscrowd": 0,
         "image_id": 139, "bbox": [10.0, 10.0, 40.0, 34.0], "category_id": 18, "id": 1},
        {"segmentation": [[1.0, 1.0, 8.0, 1.0, 8.0, 8.0], [20.0, 2.0, 30.0, 2.0, 30.0, 6.0]], "area": 64.5,
         "iscrowd": 0, "image_id": 139, "bbox": [1.0, 1.0, 29.0, 7.0], "category_id": 3, "id": 2},
        {"segmentation": [[40.0, 5.0, 60.0, 5.0, 60.0, 20.0]], "area": 150.0, "iscrowd": 0, "image_id": 139,
         "bbox": [40.0, 5.0, 30.0, 15.0], "category_id": 3, "id": 3},  # runs past the right edge: clipped
        {"segmentation": {"counts": [100, 20, 2280], "size": [40, 60]}, "area": 20.0, "iscrowd": 1,
         "image_id": 255917, "bbox": [2.0, 20.0, 1.0, 20.0], "category_id": 1, "id": 900300255917},
    ]
    (ann / "instances_val2017.json").write_text(json.dumps(
        {"info": {"description": "COCO 2017 Dataset"}, "licenses": [], "images": images, "annotations": anns,
         "categories": cats}))
    (ann / "captions_val2017.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images,
         "annotations": [{"image_id": 139, "id": 7, "caption": "A dog next to a car. "},
                         {"image_id": 139, "id": 8, "caption": "a brown dog"},
                         {"image_id": 255917, "id": 9, "caption": "an empty street"}]}))
    kp = [0.0] * 51
    kp[0:3] = [20.0, 15.0, 2]  # nose visible
    kp[15:18] = [25.0, 30.0, 1]  # left shoulder occluded
    person = {"keypoints": ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                            "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
                            "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"],
              "skeleton": [[16, 14], [14, 12]], "supercategory": "person", "id": 1, "name": "person"}
    (ann / "person_keypoints_val2017.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images, "categories": [person], "annotations": [
            {"segmentation": [[15, 10, 35, 10, 35, 45, 15, 45]], "num_keypoints": 2, "area": 700.0, "iscrowd": 0,
             "keypoints": kp, "image_id": 139, "bbox": [15.0, 10.0, 20.0, 35.0], "category_id": 1, "id": 11},
            {"segmentation": [[1, 1, 5, 1, 5, 5]], "num_keypoints": 0, "area": 16.0, "iscrowd": 0,
             "keypoints": [0] * 51, "image_id": 255917, "bbox": [1.0, 1.0, 4.0, 4.0], "category_id": 1, "id": 12}]}))


def test_coco(tmp_path):
    root, out = tmp_path / "coco", tmp_path / "shards"
    _coco_fixture(root)
    counts = coco.main(["--root", str(root), "--out", str(out), "--gen-captions-per-image", "-1"])
    assert counts == {"detection/val": 2, "image_captioning/val": 2, "image_generation/val": 3,
                      "image_inpainting/val": 1, "keypoints/val": 1, "object_localization/val": 2,
                      "object_segmentation/val": 2, "region_classification/val": 1, "segmentation_to_image/val": 1}
    det = {e["id"]: e for e in _read(out, "detection", "coco", "val")}
    d = det["coco:139"]
    assert d["image"].shape == (48, 64, 3) and d["labels"] == ["dog", "car", "car"]
    assert d["boxes"][0] == [10.0, 10.0, 50.0, 44.0] and d["boxes"][2] == [40.0, 5.0, 64.0, 20.0]
    assert det["coco:255917"]["boxes"] == [] and det["coco:255917"]["labels"] == []  # the crowd region is left out
    # the image bytes are the source file's, unchanged
    tar = tarfile.open(out / "detection/coco/val-000000.tar")
    stored = tar.extractfile([m for m in tar.getmembers() if m.name.endswith("image.jpg")][0]).read()
    assert stored == (root / "val2017/000000000139.jpg").read_bytes()
    seg = {e["label"]: e for e in _read(out, "object_segmentation", "coco", "val")}
    assert len(seg["car"]["masks"]) == 2 and seg["car"]["masks"][0].shape == (48, 64)
    m = seg["car"]["masks"][0]
    assert m.dtype == np.bool_ and m[2, 6] and m[3, 28] and not m[30, 30]  # both polygons of annotation 2
    assert 1200 < seg["dog"]["masks"][0].sum() < 1500
    loc = {e["label"]: e for e in _read(out, "object_localization", "coco", "val")}
    assert len(loc["car"]["boxes"]) == 2
    reg, = _read(out, "region_classification", "coco", "val")
    assert reg["label"] == "dog" and reg["candidates"] == ["person", "car", "dog"] and reg["box"] == [10, 10, 50, 44]
    inp, = _read(out, "image_inpainting", "coco", "val")
    assert inp["label"] == "dog"
    s2i, = _read(out, "segmentation_to_image", "coco", "val")  # not the image without objects
    assert s2i["id"] == "coco:139" and [s["label"] for s in s2i["segments"]] == ["dog", "car", "car"]
    caps = {e["id"]: e for e in _read(out, "image_captioning", "coco", "val")}
    assert caps["coco:139"]["captions"] == ["A dog next to a car.", "a brown dog"]
    gen = _read(out, "image_generation", "coco", "val")
    assert sorted(e["caption"] for e in gen) == ["A dog next to a car.", "a brown dog", "an empty street"]
    kp, = _read(out, "keypoints", "coco", "val")
    assert kp["box"] == [15.0, 10.0, 35.0, 45.0] and len(kp["keypoints"]) == 17
    assert kp["keypoints"][0] == [20.0, 15.0, 2] and kp["keypoints"][5] == [25.0, 30.0, 1] and kp["keypoints"][1][2] == 0
    m = load_manifest(out / "keypoints/coco")
    assert m["source"].startswith("COCO") and manifest_splits(m)["val"]["num_examples"] == 1


def test_coco_karpathy_splits(tmp_path):
    root, out = tmp_path / "coco", tmp_path / "shards"
    _coco_fixture(root)
    (root / "annotations/instances_val2017.json").unlink()
    (root / "annotations/person_keypoints_val2017.json").unlink()
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": "000000000139.jpg", "split": "restval", "sentences": [{"raw": "x", "sentid": 1}]},
        {"filename": "000000255917.jpg", "split": "test", "sentences": [{"raw": "y", "sentid": 2}]}]}))
    counts = coco.main(["--root", str(root), "--out", str(out), "--karpathy", str(karpathy)])
    assert counts == {"image_captioning/test": 1, "image_captioning/train": 1, "image_generation/test": 1,
                      "image_generation/train": 1}


def test_coco_errors(tmp_path):
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match="no captions_/instances_/person_keypoints_"):
        coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "o")])


# ================================================================================================ VQA v2
def test_vqa_v2(tmp_path):
    root, cocod, out = tmp_path / "vqa", tmp_path / "coco", tmp_path / "shards"
    root.mkdir()
    _jpg(cocod / "train2014/COCO_train2014_000000458752.jpg", 40, 30)
    header = {"info": {"description": "This is v2.0 of the VQA dataset."}, "task_type": "Open-Ended",
              "data_type": "mscoco", "license": {"name": "CC BY 4.0"}, "data_subtype": "train2014"}
    qs = [{"image_id": 458752, "question": "What is this photo taken looking through?", "question_id": 458752000},
          {"image_id": 458752, "question": "What position is this man playing?", "question_id": 458752001},
          {"image_id": 262146, "question": "What is he on top of?", "question_id": 262146000}]  # image not on disk
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps({**header, "questions": qs}))
    answers = ["net"] * 8 + ["netting", "mesh"]
    anns = [{"question_type": "what is this", "multiple_choice_answer": "net", "image_id": 458752,
             "answer_type": "other", "question_id": 458752000,
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]},
            {"question_type": "what", "multiple_choice_answer": "pitcher", "image_id": 458752, "answer_type": "other",
             "question_id": 458752001, "answers": [{"answer": "pitcher", "answer_confidence": "yes", "answer_id": i + 1}
                                                   for i in range(10)]},
            {"question_type": "what", "multiple_choice_answer": "skateboard", "image_id": 262146,
             "answer_type": "other", "question_id": 262146000,
             "answers": [{"answer": "skateboard", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]}]
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({**header, "annotations": anns}))
    assert vqa_v2.main(["--root", str(root), "--coco", str(cocod), "--out", str(out)]) == {"vqa/train": 2}
    a, b = _read(out, "vqa", "vqa_v2", "train")
    assert a["question"] == "What is this photo taken looking through?" and a["answers"] == answers
    assert a["image"].shape == (30, 40, 3) and a["answer_type"] == "other" and b["answers"] == ["pitcher"] * 10
    for r in anns:
        del r["question_id"]  # like the cut-down sample files: cannot be joined
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({**header, "annotations": anns}))
    with pytest.raises(ValueError, match="have no 'question_id'"):
        vqa_v2.main(["--root", str(root), "--coco", str(cocod), "--out", str(out)])


# ================================================================================================ RefCOCO
def _ref(ref_id, ann_id, image_id, split, sents, dataset=None, partition=None, ann=None):
    r = {"sent_ids": [s[0] for s in sents], "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
         "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split, "category_id": 51,
         "sentences": [{"tokens": t.split(), "raw": t.capitalize() + ".", "sent_id": i, "sent": t} for i, t in sents]}
    if dataset:
        r.update(dataset=dataset, dataset_partition=partition, ann=ann)
    return r


def test_refcoco_json_and_pickle(tmp_path):
    cocod, out = tmp_path / "coco", tmp_path / "shards"
    info = {"license": 1, "file_name": "COCO_train2014_000000460986.jpg", "height": 42, "width": 64, "id": 460986}
    _jpg(cocod / "train2014" / info["file_name"], 64, 42)
    ann = {"segmentation": [[49.2, 26.6, 63.9, 26.6, 63.9, 40.6]], "area": 120.0, "iscrowd": 0, "image_id": 460986,
           "bbox": [48.97, 26.59, 15.03, 14.04], "category_id": 51, "id": 718034}
    refs = [_ref(10511, 718034, 460986, "train", [(29925, "far right pottery piece"), (29926, "cup on far right")],
                 "refcoco", "unc", ann),
            _ref(10511, 718034, 460986, "test", [(29925, "far right pottery piece")], "refcocog", "google", ann),
            _ref(10512, 718034, 460986, "testA", [(30001, "right cup")], "refcoco", "unc", ann)]
    jpath = tmp_path / "refcoco.json"
    jpath.write_text(json.dumps({"ref": refs, "coco_anns": {"460986": {"info": info, "anns": [ann]}}}))
    counts = refcoco.main(["--json", str(jpath), "--coco", str(cocod), "--out", str(out)])
    assert counts == {"refcoco": {"referring_expression/testA": 1, "referring_expression/train": 2}}
    a, b = _read(out, "referring_expression", "refcoco", "train")
    assert a["expression"] == "Far right pottery piece." and a["id"] == "refcoco:10511:29925"
    np.testing.assert_allclose(a["box"], [48.97, 26.59, 64.0, 40.63])
    # --partition picks refcocog's google split
    counts = refcoco.main(["--json", str(jpath), "--coco", str(cocod), "--out", str(out), "--datasets", "refcocog",
                           "--partition", "refcocog=google"])
    assert counts == {"refcocog": {"referring_expression/test": 1}}
    # the REFER release: refs(unc).p (a protocol-2 pickle of plain dicts) + instances.json
    refer = tmp_path / "refer" / "refcoco+"
    refer.mkdir(parents=True)
    plain = [_ref(7, 718034, 460986, "val", [(1, "left bowl")])]
    (refer / "refs(unc).p").write_bytes(pickle.dumps(plain, protocol=2))
    (refer / "instances.json").write_text(json.dumps({"images": [info], "annotations": [ann],
                                                      "categories": [{"id": 51, "name": "bowl"}]}))
    counts = refcoco.main(["--root", str(tmp_path / "refer"), "--coco", str(cocod), "--out", str(out)])
    assert counts == {"refcoco+": {"referring_expression/val": 1}}
    ex, = _read(out, "referring_expression", "refcoco+", "val")
    assert ex["expression"] == "Left bowl."


def test_refcoco_pickle_with_code_is_refused(tmp_path):
    import os

    refer = tmp_path / "refer" / "refcoco"
    refer.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (refer / "refs(unc).p").write_bytes(pickle.dumps([Evil()], protocol=2))
    (refer / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        refcoco.main(["--root", str(tmp_path / "refer"), "--coco", str(tmp_path), "--out", str(tmp_path / "o")])


# ================================================================================================ Visual Genome
def test_visual_genome(tmp_path):
    root, out = tmp_path / "vg", tmp_path / "shards"
    _jpg(root / "VG_100K_2/1.jpg", 80, 60, 1)
    _jpg(root / "VG_100K/2.jpg", 64, 48, 2)
    (root / "image_data.json").write_text(json.dumps([
        {"width": 80, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "height": 60, "image_id": 1,
         "coco_id": None, "flickr_id": None},
        {"width": 64, "url": "https://cs.stanford.edu/people/rak248/VG_100K/2.jpg", "height": 48, "image_id": 2,
         "coco_id": None, "flickr_id": None}]))
    (root / "region_descriptions.json").write_text(json.dumps([
        {"regions": [{"region_id": 1382, "width": 20, "height": 10, "image_id": 1, "phrase": "the clock is green",
                      "y": 5, "x": 40},
                     {"region_id": 1383, "width": 0, "height": 10, "image_id": 1, "phrase": "empty", "y": 5, "x": 4}],
         "id": 1},
        {"regions": [{"region_id": 99, "width": 30, "height": 20, "image_id": 2, "phrase": "a parked bike ",
                      "y": 10, "x": 50}], "id": 2}]))
    (root / "relationships.json").write_text(json.dumps([
        {"relationships": [{"predicate": "ON", "relationship_id": 15927, "synsets": ["along.r.01"],
                            "subject": {"object_id": 5045, "x": 11, "y": 12, "w": 20, "h": 30, "name": "shade",
                                        "synsets": ["shade.n.01"]},
                            "object": {"object_id": 5046, "x": 5, "y": 30, "w": 70, "h": 25, "names": ["street"],
                                       "synsets": ["street.n.01"]}}], "image_id": 1}]))
    (root / "objects.json").write_text(json.dumps([
        {"image_id": 2, "objects": [{"object_id": 1, "x": 1, "y": 2, "w": 10, "h": 10, "names": ["Bike"]},
                                    {"object_id": 2, "x": 20, "y": 2, "w": 10, "h": 10, "names": ["bike"]},
                                    {"object_id": 3, "x": 5, "y": 20, "w": 10, "h": 10, "names": ["tree"]}]}]))
    # one entry, not wrapped in a list (as in some released samples), trailing whitespace
    (root / "question_answers.json").write_text(json.dumps(
        {"id": 2, "qas": [{"a_objects": [], "question": "What is parked?", "image_id": 2, "qa_id": 987278,
                           "answer": "Bike.", "q_objects": []}]}) + "\n  ")
    counts = visual_genome.main(["--root", str(root), "--out", str(out), "--val-fraction", "0"])
    assert counts == {"object_localization/train": 2, "region_captioning/train": 2, "relationship/train": 1,
                      "vqa/train": 1}
    rc = {e["id"]: e for e in _read(out, "region_captioning", "visual_genome", "train")}
    assert rc["vg:1:1382"]["box"] == [40.0, 5.0, 60.0, 15.0] and rc["vg:1:1382"]["image"].shape == (60, 80, 3)
    assert rc["vg:2:99"]["box"] == [50.0, 10.0, 64.0, 30.0] and rc["vg:2:99"]["caption"] == "a parked bike"
    rel, = _read(out, "relationship", "visual_genome", "train")
    assert (rel["subject"], rel["predicate"], rel["object"]) == ("shade", "on", "street")
    assert rel["subject_box"] == [11.0, 12.0, 31.0, 42.0] and rel["object_box"] == [5.0, 30.0, 75.0, 55.0]
    loc = {e["label"]: e for e in _read(out, "object_localization", "visual_genome", "train")}
    assert len(loc["bike"]["boxes"]) == 2 and len(loc["tree"]["boxes"]) == 1
    qa, = _read(out, "vqa", "visual_genome", "train")
    assert qa["answers"] == ["bike"] and qa["question"] == "What is parked?"
    counts = visual_genome.main(["--root", str(root), "--out", str(tmp_path / "s2"), "--val-fraction", "0",
                                 "--max-per-image", "1"])
    assert counts["object_localization/train"] == 1


# ================================================================================================ NYU Depth v2
def test_nyu_depth(tmp_path):
    root, out = tmp_path / "nyu", tmp_path / "shards"
    data = root / "data"
    _jpg(data / "nyu2_train/bathroom_0013_out/1.jpg", 32, 24)
    d8 = np.full((24, 32), 51, np.uint8)
    d8[0, 0] = 0
    (data / "nyu2_train/bathroom_0013_out").mkdir(parents=True, exist_ok=True)
    Image.fromarray(d8).save(data / "nyu2_train/bathroom_0013_out/1.png")
    _jpg(data / "nyu2_test/00000_colors.png", 32, 24)
    d16 = np.full((24, 32), 2500, np.uint16)
    Image.fromarray(d16).save(data / "nyu2_test/00000_depth.png")
    (data / "nyu2_train.csv").write_text("data/nyu2_train/bathroom_0013_out/1.jpg,data/nyu2_train/bathroom_0013_out/1.png\n"
                                         "data/nyu2_train/basement_0001a_out/1.jpg,data/nyu2_train/basement_0001a_out/1.png\n")
    (data / "nyu2_test.csv").write_text("data/nyu2_test/00000_colors.png,data/nyu2_test/00000_depth.png\n")
    counts = nyu_depth.main(["--root", str(root), "--out", str(out)])
    assert counts == {"depth/test": 1, "depth/train": 1}
    tr, = _read(out, "depth", "nyu_depth_v2", "train")
    assert tr["depth"].shape == (24, 32) and tr["depth"][0, 0] == 0 and tr["max_depth"] == 10.0
    np.testing.assert_allclose(tr["depth"][1, 1], 2.0, atol=0.001)  # 51 / 255 * 10 m
    te, = _read(out, "depth", "nyu_depth_v2", "test")
    np.testing.assert_allclose(te["depth"], 2.5, atol=1e-6) and te["image"].shape == (24, 32, 3)


# ================================================================================================ ImageNet
def test_imagenet_class_folders(tmp_path):
    root, out = tmp_path / "imagenette", tmp_path / "shards"
    for split, n in (("train", 2), ("val", 1)):
        for k, wnid in enumerate(["n01440764", "n02102040"]):
            for i in range(n):
                _jpg(root / split / wnid / f"{wnid}_{i}.JPEG", 20, 16, k * 10 + i)
    (root / "train/n01440764/notes.txt").write_text("not an image")
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n01440764 tench, Tinca tinca\nn02102040 English springer, English springer spaniel\n")
    counts = imagenet.main(["--root", str(root), "--names", str(names), "--out", str(out), "--dataset", "imagenette"])
    assert counts == {"image_classification/train": 4, "image_classification/val": 2}
    tr = _read(out, "image_classification", "imagenette", "train")
    assert [e["label"] for e in tr] == ["tench", "tench", "English springer", "English springer"]
    assert "candidates" not in tr[0] and tr[2]["class_index"] == 1
    va = _read(out, "image_classification", "imagenette", "val")
    assert va[0]["candidates"] == ["tench", "English springer"]
    names.write_text("n01440764 tench\n")
    with pytest.raises(ValueError, match=r"no entry for class folder\(s\) \['n02102040'\]"):
        imagenet.main(["--root", str(root), "--names", str(names), "--out", str(out)])


# ================================================================================================ CC3M / CC12M
def test_conceptual_captions_webdataset(tmp_path):
    src, out = tmp_path / "cc3m", tmp_path / "shards"
    src.mkdir()
    rows = [("a dog runs on the beach", True), ("", True), ("sunset over a lake", False)]
    with tarfile.open(src / "00000.tar", "w") as tar:
        for i, (cap, has_img) in enumerate(rows):
            members = {"txt": cap.encode(),
                       "json": json.dumps({"caption": cap, "url": f"http://example.com/{i}.jpg", "key": f"{i:09d}",
                                           "status": "success", "width": 24, "height": 16}).encode()}
            if has_img:
                buf = io.BytesIO()
                Image.fromarray(np.full((16, 24, 3), 40 * i, np.uint8)).save(buf, format="JPEG")
                members["jpg"] = buf.getvalue()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    counts = conceptual_captions.main(["--input", str(src), "--out", str(out), "--dataset", "cc3m"])
    assert counts == {"image_captioning/train": 1, "image_generation/train": 1}
    cap, = _read(out, "image_captioning", "cc3m", "train")
    assert cap["captions"] == ["a dog runs on the beach"] and cap["url"] == "http://example.com/0.jpg"
    gen, = _read(out, "image_generation", "cc3m", "train")
    assert gen["caption"] == "a dog runs on the beach" and gen["image"].shape == (16, 24, 3)


# ================================================================================================ C4 / Wikipedia
def test_text_corpus_c4_and_wikipedia(tmp_path):
    out = tmp_path / "shards"
    c4 = tmp_path / "c4/en"
    c4.mkdir(parents=True)
    long_par = " ".join(f"word{i}" for i in range(120))
    docs = [{"text": "First paragraph of a page.\nSecond paragraph, a bit longer than the first one.",
             "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.com/a"},
            {"text": long_par, "timestamp": "2019-04-25T12:57:55Z", "url": "https://example.com/b"}]
    with gzip.open(c4 / "c4-validation.00000-of-00008.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(d) for d in docs) + "\n")
    counts = text_corpus.main(["--input", str(c4), "--out", str(out), "--dataset", "c4", "--max-chars", "300"])
    assert counts == {"span_corruption/val": 4}
    exs = _read(out, "span_corruption", "c4", "val")
    assert exs[0]["text"] == docs[0]["text"] and exs[0]["id"] == "c4:https://example.com/a:0"
    assert all(len(e["text"]) <= 300 for e in exs) and " ".join(e["text"] for e in exs[1:]) == long_par
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text(json.dumps({"id": "12", "url": "https://en.wikipedia.org/wiki?curid=12", "title": "Anarchism",
                                "text": "Anarchism is a political philosophy.\n\nIt is sceptical of authority."}) + "\n")
    counts = text_corpus.main(["--input", str(wiki), "--out", str(out), "--dataset", "wikipedia"])
    assert counts == {"span_corruption/train": 1}
    ex, = _read(out, "span_corruption", "wikipedia", "train")
    assert ex["title"] == "Anarchism" and ex["text"] == "Anarchism is a political philosophy.\nIt is sceptical of authority."


# ================================================================================================ SQuAD
def test_squad_v1_and_v2(tmp_path):
    out = tmp_path / "shards"
    ctx = "Architecturally, the school has a Catholic character. It is a replica of the grotto at Lourdes."
    v1 = {"data": [{"title": "University_of_Notre_Dame", "paragraphs": [{"context": ctx, "qas": [
        {"answers": [{"answer_start": 34, "text": "Catholic"}], "question": "What character does the school have?",
         "id": "5733be284776f41900661182"}]}]}], "version": "1.1"}
    (tmp_path / "train-v1.1.json").write_text(json.dumps(v1))
    v2 = {"version": "v2.0", "data": [{"title": "Paris_France", "paragraphs": [{
        "context": "Paris is the largest city in France.", "qas": [
            {"plausible_answers": [], "answers": [{"answer_start": 0, "text": "Paris"},
                                                   {"answer_start": 0, "text": "Paris"}],
             "question": "What is the largest city?", "id": "1", "is_impossible": False},
            {"plausible_answers": [{"answer_start": 29, "text": "France"}], "answers": [],
             "question": "What is the smallest city?", "id": "2", "is_impossible": True}]}]}]}
    (tmp_path / "dev-v2.0.json").write_text(json.dumps(v2).replace('"is_impossible":', '"is_impossible" :'))
    counts = squad.main(["--input", str(tmp_path / "train-v1.1.json"), str(tmp_path / "dev-v2.0.json"), "--out", str(out)])
    assert counts == {"question_answering/train": 1, "question_answering/val": 1}
    tr, = _read(out, "question_answering", "squad", "train")
    assert tr["answers"] == ["Catholic"] and tr["context"] == ctx and tr["answer_starts"] == [34]
    va, = _read(out, "question_answering", "squad", "val")
    assert va["answers"] == ["Paris", "Paris"]


# ================================================================================================ GLUE
MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")


def test_glue_mnli_and_others(tmp_path):
    out = tmp_path / "shards"
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    (mnli / "train.tsv").write_text(
        MNLI_HEAD +
        "0\t31193\t31193n\tgovernment\t( ( x ) )\t( y )\t(ROOT x)\t(ROOT y)\tConceptually cream skimming has two "
        "basic dimensions - product and geography.\tProduct and geography are what make cream skimming work. "
        "\tneutral\tneutral\n"
        "1\t101457\t101457e\ttelephone\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tyou know during the season and i guess "
        "at at your level uh you lose them to the next level\tYou lose the things to the \"following\" level if "
        "the people recall.\tentailment\tentailment\n"
        "2\t1\t1c\tfiction\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tOne 'quote.\tTwo.\tneutral\t-\n")
    dev_head = MNLI_HEAD.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")
    (mnli / "dev_matched.tsv").write_text(
        dev_head + "0\t63735\t63735n\tslate\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tThe new rights are nice enough\t"
        "Everyone really likes the newest benefits \tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n")
    counts = glue.main(["--root", str(mnli), "--out", str(out)])
    assert counts == {"text_classification/train": 2, "text_classification/val": 1}
    a, b = _read(out, "text_classification", "mnli", "train")
    assert a["label"] == "neutral" and a["text_pair"] == "Product and geography are what make cream skimming work."
    assert b["text_pair"] == 'You lose the things to the "following" level if the people recall.'
    assert a["candidates"] == ["entailment", "neutral", "contradiction"] and a["dataset"] == "mnli"
    sst = tmp_path / "SST-2"
    sst.mkdir()
    (sst / "train.tsv").write_text("sentence\tlabel\nhide new secretions from the parental units \t0\n"
                                   "a charming and often affecting journey . \t1\n")
    assert glue.main(["--root", str(sst), "--out", str(out)]) == {"text_classification/train": 2}
    assert [e["label"] for e in _read(out, "text_classification", "sst2", "train")] == ["negative", "positive"]
    cola = tmp_path / "CoLA"
    cola.mkdir()
    (cola / "dev.tsv").write_text("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                                  "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\n")
    assert glue.main(["--root", str(cola), "--out", str(out)]) == {"text_classification/val": 2}
    c = _read(out, "text_classification", "cola", "val")
    assert [e["label"] for e in c] == ["acceptable", "unacceptable"] and "text_pair" not in c[0]
    with pytest.raises(ValueError, match="STS-B is a regression task"):
        glue.main(["--root", str(tmp_path / "STS-B"), "--out", str(out), "--task", "STS-B"])


# ================================================================================================ Gigaword
def test_gigaword(tmp_path):
    root, out = tmp_path / "sumdata", tmp_path / "shards"
    (root / "train").mkdir(parents=True)
    (root / "Giga").mkdir()
    (root / "train/valid.article.filter.txt").write_text(
        "australia 's current account deficit shrunk by a record #.## billion dollars -lrb- #.## billion us -rrb- .\n"
        "at least two people were killed in a suspected bomb attack .\n")
    (root / "train/valid.title.filter.txt").write_text("australian current account deficit narrows sharply\n"
                                                       "at least two dead in southern philippines blast\n")
    (root / "Giga/input.txt").write_text("UNK police arrested five anti-nuclear protesters .\n")
    (root / "Giga/task1_ref0.txt").write_text("police arrest anti-nuclear protesters\n")
    counts = gigaword.main(["--root", str(root), "--out", str(out)])
    assert counts == {"summarization/test": 1, "summarization/val": 2}
    a, _ = _read(out, "summarization", "gigaword", "val")
    assert a["summary"] == "australian current account deficit narrows sharply" and "-lrb-" in a["text"]
    _read(out, "summarization", "gigaword", "test")
    (root / "Giga/task1_ref0.txt").write_text("")
    with pytest.raises(ValueError, match="must be aligned"):
        gigaword.main(["--root", str(root), "--out", str(out)])


def test_recipe_cli_runs_as_a_script(tmp_path):
    root = tmp_path / "sumdata/train"
    root.mkdir(parents=True)
    (root / "valid.article.filter.txt").write_text("an article .\n")
    (root / "valid.title.filter.txt").write_text("a title\n")
    r = subprocess.run([sys.executable, str(REPO / "data_recipes/gigaword.py"), "--root", str(tmp_path / "sumdata"),
                        "--out", str(tmp_path / "shards")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "summarization/gigaword/val: 1 examples" in r.stderr
    assert read_examples(manifest_urls(tmp_path / "shards/summarization/gigaword", "val"))[0]["summary"] == "a title"
