"""SQuAD v1.1 / v2.0 JSON -> ``question_answering`` shards.

Input: the official files ``train-v1.1.json``, ``dev-v1.1.json``, ``train-v2.0.json``,
``dev-v2.0.json``: ``{"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}], "is_impossible" (v2), "plausible_answers" (v2)}]}]}]}``.

Each question becomes ``{context, question, answers}`` (all given answer texts, duplicates kept in
order, as the SQuAD metric expects). v2.0's unanswerable questions have no answer text and are
skipped (counted). The split is ``--split`` or ``train``/``val`` from a ``train``/``dev`` file name.

    python data_recipes/squad.py --input train-v2.0.json dev-v2.0.json --out shards/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import RecipeWriter, parser, progress, require, setup_logging  # noqa: E402


def _split(path: Path, split: str | None) -> str:
    if split:
        return split
    name = path.name.lower()
    if name.startswith("train"):
        return "train"
    if name.startswith("dev") or "val" in name:
        return "val"
    raise ValueError(f"cannot tell the split of {path.name} (expected train-*/dev-*); pass --split")


def build(inputs: list[str | Path], out: str | Path, dataset: str = "squad", split: str | None = None,
          maxcount: int = 5000, max_examples: int | None = None) -> dict[str, int]:
    w = RecipeWriter(out, dataset, f"{dataset} json", maxcount, max_examples)
    for item in inputs:
        path = require(item, "SQuAD json")
        data = json.loads(path.read_text(encoding="utf-8"))
        if "data" not in data:
            raise ValueError(f"{path}: expected {{'data': [...]}} (SQuAD json), got keys {sorted(data)}")
        s = _split(path, split)
        for article in progress(data["data"], f"{dataset} {path.name}"):
            for para in article["paragraphs"]:
                context = para["context"]
                for qa in para["qas"]:
                    answers = [str(a["text"]) for a in qa.get("answers", []) if str(a.get("text", "")).strip()]
                    if qa.get("is_impossible") or not answers:
                        w.skip("unanswerable question (SQuAD v2)")
                        continue
                    w.write("question_answering", s, {"id": f"{dataset}:{qa['id']}", "title": article.get("title", ""),
                                                      "context": context, "question": str(qa["question"]).strip(),
                                                      "answers": answers,
                                                      "answer_starts": [int(a["answer_start"]) for a in qa["answers"]
                                                                        if str(a.get("text", "")).strip()]})
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(maxcount=5000)
    p.add_argument("--input", nargs="+", required=True, help="SQuAD json files")
    p.add_argument("--dataset", default="squad", help="name in the shard tree (squad, squad_v2)")
    p.add_argument("--split", default=None, help="force the split (default: from the file name)")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.input, a.out, a.dataset, a.split, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
