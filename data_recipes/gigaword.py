"""Gigaword (Rush et al. 2015 ``sumdata``) -> ``summarization`` shards.

Input: the ``sumdata`` folder, line-aligned article/title text files::

    <root>/train/train.article.txt, train.title.txt                 -> train
    <root>/train/valid.article.filter.txt, valid.title.filter.txt   -> val
    <root>/Giga/input.txt, task1_ref0.txt                           -> test

(``.gz`` variants are read too.) The text is already lower-cased and tokenised (digits as ``#``,
``-lrb-``/``-rrb-``, ``UNK``); it is kept as is. Mismatched line counts are an error.

    python data_recipes/gigaword.py --root /data/sumdata --out shards/
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import RecipeWriter, open_text, parser, progress, require, setup_logging  # noqa: E402

PAIRS = [("train", "train/train.article.txt", "train/train.title.txt"),
         ("val", "train/valid.article.filter.txt", "train/valid.title.filter.txt"),
         ("test", "Giga/input.txt", "Giga/task1_ref0.txt")]


def _find(root: Path, rel: str) -> Path | None:
    for cand in (root / rel, root / Path(rel).name, root / (rel + ".gz"), root / (Path(rel).name + ".gz")):
        if cand.exists():
            return cand
    return None


def build(root: str | Path, out: str | Path, maxcount: int = 5000, max_examples: int | None = None) -> dict[str, int]:
    root = require(root, "Gigaword sumdata folder")
    w = RecipeWriter(out, "gigaword", f"Gigaword sumdata ({root})", maxcount, max_examples)
    found = 0
    for split, art, tit in PAIRS:
        a, t = _find(root, art), _find(root, tit)
        if a is None or t is None:
            continue
        found += 1
        with open_text(a) as fa, open_text(t) as ft:
            articles, titles = fa.read().splitlines(), ft.read().splitlines()
        if len(articles) != len(titles):
            raise ValueError(f"{a} has {len(articles)} lines but {t} has {len(titles)}; they must be aligned")
        for i, (text, summary) in enumerate(progress(list(zip(articles, titles)), f"gigaword {split}")):
            if not text.strip() or not summary.strip():
                w.skip("empty article or title")
                continue
            w.write("summarization", split, {"id": f"gigaword:{split}:{i}", "text": text.strip(),
                                             "summary": summary.strip()})
    if not found:
        raise FileNotFoundError(f"no article/title pair ({', '.join(p[1] for p in PAIRS)}) under {root}")
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(maxcount=5000)
    p.add_argument("--root", required=True, help="the sumdata folder")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.root, a.out, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
