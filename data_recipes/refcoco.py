"""RefCOCO / RefCOCO+ / RefCOCOg -> ``referring_expression`` shards (one example per sentence).

Accepted inputs:

* the REFER release: ``<root>/<name>/refs(<split_by>).p`` (a Python-2 pickle of ref dicts, read with an
  unpickler that allows plain data only) and ``<root>/<name>/instances.json`` (COCO format), for
  ``<name>`` in refcoco (unc), refcoco+ (unc), refcocog (umd);
* the JSON form ``{"ref": [...], "coco_anns": {"<image_id>": {"info", "anns"}}}`` written by
  tensorflow-datasets' ``ref_coco`` preparation (``--json refcoco.json``), whose refs carry ``ann``,
  ``dataset`` and ``dataset_partition``.

Images are COCO ``train2014`` files (``<coco>/train2014/COCO_train2014_<id:012d>.jpg``). Splits are
the refs' own: train, val, test, testA, testB.

    python data_recipes/refcoco.py --root /data/refer --coco /data/coco --out shards/
    python data_recipes/refcoco.py --json refcoco.json --coco /data/coco --out shards/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import (  # noqa: E402
    RecipeWriter, clip_box, image_bytes, load_plain_pickle, parser, progress, require, setup_logging, xywh_to_xyxy,
)

DEFAULT_PARTITIONS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


def _write_refs(writers: dict[str, RecipeWriter], out: Path, refs: list[dict], anns: dict[int, dict],
                images: dict[int, dict], coco: Path, maxcount: int, max_examples: int | None) -> None:
    for ref in progress(refs, "refs"):
        name = ref["_dataset"]
        if name not in writers:
            writers[name] = RecipeWriter(out, name, f"{name} ({ref['_partition']})", maxcount, max_examples)
        w = writers[name]
        ann = ref.get("ann") or anns.get(int(ref["ann_id"]))
        info = images.get(int(ref["image_id"]))
        if ann is None or info is None:
            w.skip("ref whose annotation or image record is missing")
            continue
        path = coco / "train2014" / info["file_name"]
        if not path.exists():
            w.skip("missing image file")
            continue
        box = clip_box(xywh_to_xyxy(ann["bbox"]), (int(info["height"]), int(info["width"])))
        if box is None:
            w.skip("empty box")
            continue
        img = image_bytes(path)
        for s in ref["sentences"]:
            w.write("referring_expression", str(ref["split"]), {
                "id": f"{name}:{ref['ref_id']}:{s['sent_id']}", "image_id": int(ref["image_id"]), "image": img,
                "box": box, "expression": str(s.get("raw") or s["sent"]).strip(), "ref_id": int(ref["ref_id"]),
                "category_id": int(ref["category_id"])})


def from_refer(root: Path, names: list[str], partitions: dict[str, str]) -> tuple[list, dict, dict]:
    refs, anns, images = [], {}, {}
    for name in names:
        split_by = partitions.get(name, DEFAULT_PARTITIONS.get(name))
        pkl = root / name / f"refs({split_by}).p"
        if not pkl.exists():
            continue
        inst = json.loads(require(root / name / "instances.json", f"{name} instances.json").read_text())
        anns.update({int(a["id"]): a for a in inst["annotations"]})
        images.update({int(i["id"]): i for i in inst["images"]})
        data = load_plain_pickle(pkl)
        if not isinstance(data, list):
            raise ValueError(f"{pkl}: expected a list of ref dicts, got {type(data).__name__}")
        for r in data:
            refs.append({**r, "_dataset": name, "_partition": split_by})
    return refs, anns, images


def from_json(path: Path, names: list[str], partitions: dict[str, str]) -> tuple[list, dict, dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if "ref" not in data or "coco_anns" not in data:
        raise ValueError(f"{path}: expected {{'ref': [...], 'coco_anns': {{...}}}}, got keys {sorted(data)}")
    images = {int(k): v["info"] for k, v in data["coco_anns"].items()}
    anns = {int(a["id"]): a for v in data["coco_anns"].values() for a in v["anns"]}
    refs = []
    for r in data["ref"]:
        name = r["dataset"]
        if name in names and r.get("dataset_partition") == partitions.get(name, DEFAULT_PARTITIONS.get(name)):
            refs.append({**r, "_dataset": name, "_partition": r["dataset_partition"]})
    return refs, anns, images


def build(coco: str | Path, out: str | Path, root: str | Path | None = None, json_file: str | Path | None = None,
          names: list[str] | None = None, partitions: dict[str, str] | None = None, maxcount: int = 1000,
          max_examples: int | None = None) -> dict[str, dict[str, int]]:
    if (root is None) == (json_file is None):
        raise ValueError("give exactly one of --root (REFER pickles) or --json (tfds refcoco.json)")
    coco = require(coco, "COCO image root")
    names = names or list(DEFAULT_PARTITIONS)
    partitions = partitions or {}
    if root is not None:
        refs, anns, images = from_refer(require(root, "REFER root"), names, partitions)
    else:
        refs, anns, images = from_json(require(json_file, "RefCOCO json"), names, partitions)
    if not refs:
        raise FileNotFoundError(f"no refs found for {names} (partitions {partitions or DEFAULT_PARTITIONS})")
    writers: dict[str, RecipeWriter] = {}
    _write_refs(writers, Path(out), refs, anns, images, coco, maxcount, max_examples)
    return {name: w.close() for name, w in writers.items()}


def main(argv: list[str] | None = None) -> Any:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="REFER folder with refcoco/, refcoco+/, refcocog/")
    p.add_argument("--json", default=None, help="tensorflow-datasets style refcoco.json instead of --root")
    p.add_argument("--coco", required=True, help="COCO folder holding train2014/")
    p.add_argument("--datasets", nargs="*", default=None, help=f"subset of {list(DEFAULT_PARTITIONS)}")
    p.add_argument("--partition", action="append", default=[], metavar="NAME=SPLIT_BY",
                   help="override a dataset's partition, e.g. refcocog=google")
    a = p.parse_args(argv)
    parts = dict(s.split("=", 1) for s in a.partition)
    setup_logging()
    return build(a.coco, a.out, a.root, a.json, a.datasets, parts, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
