"""VQA v2 -> ``vqa`` shards (question + the 10 human answers).

Expected files (the official download; images are COCO 2014)::

    <root>/v2_OpenEnded_mscoco_<subtype>_questions.json     {"data_subtype", "questions": [{image_id, question, question_id}]}
    <root>/v2_mscoco_<subtype>_annotations.json             {"annotations": [{question_id, answers: [10 x {answer, ...}], ...}]}
    <coco>/<subtype>/COCO_<subtype>_<image_id:012d>.jpg

``<subtype>`` ``train2014``/``val2014`` become splits ``train``/``val``. Questions without
annotations (``test2015``) are skipped.

    python data_recipes/vqa_v2.py --root /data/vqa --coco /data/coco --out shards/
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import RecipeWriter, image_bytes, parser, progress, require, setup_logging  # noqa: E402

Q_RE = re.compile(r"^v2_OpenEnded_mscoco_(\w+?)_questions\.json$")
SPLITS = {"train2014": "train", "val2014": "val"}


def build_pair(w: RecipeWriter, questions: Path, annotations: Path, coco: Path) -> None:
    q = json.loads(questions.read_text(encoding="utf-8"))
    subtype = q.get("data_subtype")
    if subtype not in SPLITS:
        raise ValueError(f"{questions}: data_subtype {subtype!r}; expected one of {sorted(SPLITS)}")
    anns = json.loads(annotations.read_text(encoding="utf-8"))["annotations"]
    if anns and "question_id" not in anns[0]:
        raise ValueError(f"{annotations}: annotation records have no 'question_id' (fields: {sorted(anns[0])}); "
                         "expected the official v2_mscoco_<subtype>_annotations.json")
    by_qid = {int(a["question_id"]): a for a in anns}
    split = SPLITS[subtype]
    for rec in progress(q["questions"], f"vqa {subtype}"):
        a = by_qid.get(int(rec["question_id"]))
        if a is None:
            w.skip("question without annotation")
            continue
        img = coco / subtype / f"COCO_{subtype}_{int(rec['image_id']):012d}.jpg"
        if not img.exists():
            w.skip("missing image file")
            continue
        ex = {"id": f"vqa_v2:{rec['question_id']}", "image_id": int(rec["image_id"]), "image": image_bytes(img),
              "question": str(rec["question"]), "answers": [str(x["answer"]) for x in a["answers"]]}
        for k in ("answer_type", "question_type", "multiple_choice_answer"):
            if k in a:
                ex[k] = a[k]
        w.write("vqa", split, ex)


def build(root: str | Path, coco: str | Path, out: str | Path, maxcount: int = 1000,
          max_examples: int | None = None) -> dict[str, int]:
    root, coco = require(root, "VQA v2 folder"), require(coco, "COCO image root")
    w = RecipeWriter(out, "vqa_v2", f"VQA v2 ({root})", maxcount, max_examples)
    found = 0
    for qpath in sorted(root.glob("v2_OpenEnded_mscoco_*_questions.json")):
        subtype = Q_RE.match(qpath.name)[1]
        apath = root / f"v2_mscoco_{subtype}_annotations.json"
        if subtype not in SPLITS or not apath.exists():
            continue
        build_pair(w, qpath, apath, coco)
        found += 1
    if not found:
        raise FileNotFoundError(f"no v2_OpenEnded_mscoco_<train2014|val2014>_questions.json with its "
                                f"v2_mscoco_<subtype>_annotations.json in {root}")
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder with the question and annotation json files")
    p.add_argument("--coco", required=True, help="COCO folder holding train2014/ and val2014/ images")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.root, a.coco, a.out, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
