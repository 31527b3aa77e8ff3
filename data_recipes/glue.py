"""GLUE TSV (MNLI and the other classification tasks) -> ``text_classification`` shards.

Input: one GLUE task folder as distributed (``glue_data/MNLI``, ``RTE``, ``QNLI``, ``SST-2``, ...),
tab-separated, read with quoting disabled (fields contain quotes)::

    MNLI   train.tsv, dev_matched.tsv, dev_mismatched.tsv   columns by header: sentence1, sentence2, gold_label
    RTE / WNLI   index sentence1 sentence2 label
    QNLI   index question sentence label
    QQP    id qid1 qid2 question1 question2 is_duplicate
    MRPC   Quality #1 ID #2 ID #1 String #2 String
    SST-2  sentence label
    CoLA   no header: source label marker sentence

Each row becomes ``{text, text_pair?, label, candidates, dataset}`` with the labels as words
(numeric labels are named: SST-2 negative/positive, CoLA unacceptable/acceptable, MRPC/QQP
not_equivalent/equivalent and not_duplicate/duplicate). Test files (no labels) are skipped. Splits:
``train``, ``val`` (``dev.tsv`` / ``dev_matched.tsv``), ``val_mismatched``. STS-B (regression) is not
a classification task and is refused.

    python data_recipes/glue.py --root /data/glue_data/MNLI --out shards/
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import RecipeWriter, parser, progress, require, setup_logging  # noqa: E402

csv.field_size_limit(1 << 24)

# task: (header?, text column, pair column or None, label column, label names for numeric labels or None, candidates)
TASKS = {
    "mnli": (True, "sentence1", "sentence2", "gold_label", None, ["entailment", "neutral", "contradiction"]),
    "rte": (True, "sentence1", "sentence2", "label", None, ["entailment", "not_entailment"]),
    "wnli": (True, "sentence1", "sentence2", "label", {"0": "not_entailment", "1": "entailment"},
             ["not_entailment", "entailment"]),
    "qnli": (True, "question", "sentence", "label", None, ["entailment", "not_entailment"]),
    "qqp": (True, "question1", "question2", "is_duplicate", {"0": "not_duplicate", "1": "duplicate"},
            ["not_duplicate", "duplicate"]),
    "mrpc": (True, "#1 String", "#2 String", "Quality", {"0": "not_equivalent", "1": "equivalent"},
             ["not_equivalent", "equivalent"]),
    "sst2": (True, "sentence", None, "label", {"0": "negative", "1": "positive"}, ["negative", "positive"]),
    "cola": (False, 3, None, 1, {"0": "unacceptable", "1": "acceptable"}, ["unacceptable", "acceptable"]),
}
SPLITS = {"train.tsv": "train", "dev.tsv": "val", "dev_matched.tsv": "val", "dev_mismatched.tsv": "val_mismatched"}


def task_of(root: Path, task: str | None) -> str:
    key = (task or root.name).lower().replace("-", "").replace("_", "")
    if key == "stsb":
        raise ValueError("STS-B is a regression task; text_classification needs discrete labels")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {task or root.name!r}; pass --task one of {sorted(TASKS)}")
    return key


def read_rows(path: Path, header: bool) -> list:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
    if not header:
        return rows
    if not rows:
        return []
    head = rows[0]
    out = []
    for ln, r in enumerate(rows[1:], 2):
        if len(r) != len(head):
            raise ValueError(f"{path}:{ln}: {len(r)} fields, the header has {len(head)}")
        out.append(dict(zip(head, r)))
    return out


def build(root: str | Path, out: str | Path, task: str | None = None, maxcount: int = 5000,
          max_examples: int | None = None) -> dict[str, int]:
    key = task_of(Path(root), task)
    root = require(root, "GLUE task folder")
    header, tcol, pcol, lcol, names, cands = TASKS[key]
    w = RecipeWriter(out, key, f"GLUE {key} ({root})", maxcount, max_examples)
    found = 0
    for fname, split in SPLITS.items():
        path = root / fname
        if not path.exists():
            continue
        found += 1
        rows = read_rows(path, header)
        if header and rows and lcol not in rows[0]:
            raise ValueError(f"{path}: no {lcol!r} column; columns are {list(rows[0])}")
        for i, r in enumerate(progress(rows, f"{key} {split}")):
            label = str(r[lcol]).strip()
            label = names.get(label, label) if names else label
            if label not in cands:
                w.skip(f"row with label {label!r} outside {cands}")
                continue
            ex = {"id": f"{key}:{split}:{r.get('pairID', r.get('index', i)) if header else i}",
                  "text": str(r[tcol]).strip(), "label": label, "candidates": cands}
            if pcol is not None:
                ex["text_pair"] = str(r[pcol]).strip()
            if header and "genre" in r:
                ex["genre"] = r["genre"]
            w.write("text_classification", split, ex)
    if not found:
        raise FileNotFoundError(f"none of {list(SPLITS)} in {root}")
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(maxcount=5000)
    p.add_argument("--root", required=True, help="a GLUE task folder (e.g. glue_data/MNLI)")
    p.add_argument("--task", default=None, help=f"task name (default: the folder name); one of {sorted(TASKS)}")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.root, a.out, a.task, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
