"""COCO -> shards for captioning, detection, localization, segmentation, region classification,
keypoints, image generation, segmentation-to-image and inpainting.

Expected layout (the official download, 2014 or 2017)::

    <root>/annotations/captions_<split><year>.json         image_captioning, image_generation
    <root>/annotations/instances_<split><year>.json        detection, object_localization,
                                                           object_segmentation, region_classification,
                                                           segmentation_to_image, image_inpainting
    <root>/annotations/person_keypoints_<split><year>.json keypoints
    <root>/<split><year>/<file_name>                       images (file_name from the json)

Optionally ``--karpathy dataset_coco.json`` re-splits the captions into the Karpathy train
(+restval) / val / test splits. ``<split>`` ``train``/``val`` become shard splits ``train``/``val``.

    python data_recipes/coco.py --root /data/coco --out shards/ [--years 2017] [--max-examples 100]
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python data_recipes/coco.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import (  # noqa: E402
    RecipeWriter, clip_box, image_bytes, parser, progress, require, segmentation_mask, setup_logging, xywh_to_xyxy,
)

ANN_RE = re.compile(r"^(captions|instances|person_keypoints)_(train|val|test)(\d{4})\.json$")
MIN_REGION_AREA = 32 * 32  # region tasks (classification / inpainting) skip tiny objects


def _load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _images(data: dict[str, Any], image_dir: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for im in data.get("images", []):
        out[int(im["id"])] = {"path": image_dir / im["file_name"], "hw": (int(im["height"]), int(im["width"])),
                              "file_name": im["file_name"]}
    return out


def _image_dir(root: Path, split: str, year: str) -> Path:
    return root / f"{split}{year}"


def _guess_image(root: Path, split: str, year: str, image_id: int) -> Path:
    d = _image_dir(root, split, year)
    for name in (f"COCO_{split}{year}_{image_id:012d}.jpg", f"{image_id:012d}.jpg"):
        if (d / name).exists():
            return d / name
    return d / (f"COCO_{split}{year}_{image_id:012d}.jpg" if year == "2014" else f"{image_id:012d}.jpg")


def captions(w: RecipeWriter, path: Path, root: Path, split: str, year: str, gen_per_image: int,
             karpathy: dict[str, str] | None) -> None:
    data = _load(path)
    images = _images(data, _image_dir(root, split, year))
    caps: dict[int, list[str]] = defaultdict(list)
    for a in data["annotations"]:
        caps[int(a["image_id"])].append(str(a["caption"]).strip())
    for image_id, texts in progress(sorted(caps.items()), f"captions {split}{year}"):
        im = images.get(image_id)
        img_path = im["path"] if im else _guess_image(root, split, year, image_id)
        out_split = split
        if karpathy is not None:
            out_split = karpathy.get(img_path.name)
            if out_split is None:
                w.skip("caption image not in the Karpathy split file")
                continue
        if not img_path.exists():
            w.skip("missing image file")
            continue
        data_bytes = image_bytes(img_path)
        base = {"id": f"coco:{image_id}", "image_id": image_id}
        w.write("image_captioning", out_split, {**base, "image": data_bytes, "captions": texts})
        for k, text in enumerate(texts if gen_per_image < 0 else texts[:gen_per_image]):
            w.write("image_generation", out_split, {**base, "id": f"coco:{image_id}:{k}", "image": data_bytes,
                                                    "caption": text})


def instances(w: RecipeWriter, path: Path, root: Path, split: str, year: str) -> None:
    data = _load(path)
    images = _images(data, _image_dir(root, split, year))
    cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    names = [cats[k] for k in sorted(cats)]
    anns: dict[int, list[dict]] = defaultdict(list)
    for a in data["annotations"]:
        anns[int(a["image_id"])].append(a)
    for image_id in progress(sorted(images), f"instances {split}{year}"):
        im = images[image_id]
        if not im["path"].exists():
            w.skip("missing image file")
            continue
        hw = im["hw"]
        img = image_bytes(im["path"])
        base = {"id": f"coco:{image_id}", "image_id": image_id}
        objs = []  # (label, box, mask, ann)
        for a in anns.get(image_id, []):
            if a.get("iscrowd", 0):
                continue
            box = clip_box(xywh_to_xyxy(a["bbox"]), hw)
            if box is None:
                continue
            objs.append((cats[int(a["category_id"])], box, segmentation_mask(a["segmentation"], hw), a))
        w.write("detection", split, {**base, "image": img, "boxes": [o[1] for o in objs], "labels": [o[0] for o in objs]})
        if objs:  # an image without labelled objects has no segmentation to draw from
            w.write("segmentation_to_image", split, {**base, "image": img,
                                                     "segments": [{"label": o[0], "mask": o[2]} for o in objs]})
        by_label: dict[str, list] = defaultdict(list)
        for o in objs:
            by_label[o[0]].append(o)
        for label, group in sorted(by_label.items()):
            lid = f"coco:{image_id}:{label}"
            w.write("object_localization", split, {**base, "id": lid, "image": img, "label": label,
                                                   "boxes": [o[1] for o in group]})
            w.write("object_segmentation", split, {**base, "id": lid, "image": img, "label": label,
                                                   "masks": [o[2] for o in group]})
        for label, box, _, a in objs:
            if float(a.get("area", 0)) < MIN_REGION_AREA:
                continue
            rid = f"coco:{image_id}:{a['id']}"
            w.write("region_classification", split, {**base, "id": rid, "image": img, "box": box, "label": label,
                                                     "candidates": names})
            w.write("image_inpainting", split, {**base, "id": rid, "image": img, "box": box, "label": label})


def keypoints(w: RecipeWriter, path: Path, root: Path, split: str, year: str) -> None:
    data = _load(path)
    images = _images(data, _image_dir(root, split, year))
    for a in progress(data["annotations"], f"keypoints {split}{year}"):
        if a.get("iscrowd", 0) or int(a.get("num_keypoints", 0)) == 0:
            continue
        im = images.get(int(a["image_id"]))
        if im is None or not im["path"].exists():
            w.skip("missing image file")
            continue
        box = clip_box(xywh_to_xyxy(a["bbox"]), im["hw"])
        kp = [float(v) for v in a["keypoints"]]
        if box is None or len(kp) != 51:
            w.skip("bad person box or keypoints")
            continue
        w.write("keypoints", split, {"id": f"coco:{a['image_id']}:{a['id']}", "image_id": int(a["image_id"]),
                                     "image": image_bytes(im["path"]), "box": box,
                                     "keypoints": [[kp[3 * j], kp[3 * j + 1], int(kp[3 * j + 2])] for j in range(17)]})


def karpathy_splits(path: Path) -> dict[str, str]:
    """file name -> train/val/test from Karpathy's ``dataset_coco.json`` (restval joins train)."""
    out = {}
    for im in _load(path)["images"]:
        split = {"restval": "train"}.get(im["split"], im["split"])
        out[im["filename"]] = split
    return out


def build(root: str | Path, out: str | Path, years: list[str] | None = None, karpathy: str | None = None,
          gen_captions_per_image: int = 1, maxcount: int = 1000, max_examples: int | None = None) -> dict[str, int]:
    root = require(root, "COCO root")
    ann_dir = require(root / "annotations", "COCO annotations folder")
    files = sorted(p for p in ann_dir.glob("*.json") if ANN_RE.match(p.name))
    if years:
        files = [p for p in files if ANN_RE.match(p.name)[3] in years]
    if not files:
        raise FileNotFoundError(f"no captions_/instances_/person_keypoints_<split><year>.json in {ann_dir}")
    w = RecipeWriter(out, "coco", f"COCO ({root})", maxcount, max_examples)
    ksplit = karpathy_splits(require(karpathy, "Karpathy split file")) if karpathy else None
    for path in files:
        kind, split, year = ANN_RE.match(path.name).groups()
        if kind == "captions":
            captions(w, path, root, split, year, gen_captions_per_image, ksplit)
        elif kind == "instances":
            instances(w, path, root, split, year)
        else:
            keypoints(w, path, root, split, year)
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="COCO folder with annotations/ and <split><year>/ images")
    p.add_argument("--years", nargs="*", default=None, help="only these years (2014, 2017)")
    p.add_argument("--karpathy", default=None, help="dataset_coco.json: Karpathy caption splits")
    p.add_argument("--gen-captions-per-image", type=int, default=1,
                   help="image_generation examples per image (one per caption; -1 = all captions)")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.root, a.out, a.years, a.karpathy, a.gen_captions_per_image, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
