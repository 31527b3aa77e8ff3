"""C4 / Wikipedia JSON lines -> ``span_corruption`` shards (masked language modelling text).

Input: JSON-lines files, plain or gzipped, one document per line with a ``text`` field:

    C4:        c4/en/c4-train.00000-of-01024.json.gz        {"text", "timestamp", "url"}
    Wikipedia: any dump converted to lines                  {"id", "url", "title", "text"}

Documents are cut at paragraph boundaries into chunks of at most ``--max-chars`` characters (a
paragraph longer than that is cut at a word boundary), so every example fits the encoder after
span corruption. The split is ``--split``, or ``val`` for files whose name contains
"validation"/"valid"/"val."/"dev" and ``train`` otherwise.

    python data_recipes/text_corpus.py --input "/data/c4/en/c4-train.0000{0..9}-of-01024.json.gz" --dataset c4 --out shards/
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import RecipeWriter, open_text, parser, progress, setup_logging  # noqa: E402
from uio.data.shards import expand_urls  # noqa: E402

VAL_RE = re.compile(r"(validation|valid|val\.|dev)", re.I)


def chunks(text: str, max_chars: int, min_chars: int = 20) -> list[str]:
    """Paragraph-aligned pieces of at most ``max_chars`` characters (pieces under ``min_chars`` dropped)."""
    out, cur = [], ""
    for para in (p.strip() for p in text.split("\n")):
        if not para:
            continue
        while len(para) > max_chars:  # a very long paragraph: cut at the last space before the limit
            cut = para.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if cur:
                out.append(cur)
                cur = ""
            out.append(para[:cut].strip())
            para = para[cut:].strip()
        if cur and len(cur) + 1 + len(para) > max_chars:
            out.append(cur)
            cur = para
        else:
            cur = f"{cur}\n{para}" if cur else para
    if cur:
        out.append(cur)
    return [c for c in out if len(c) >= min_chars]


def input_files(patterns: list[str]) -> list[Path]:
    files = []
    for pat in patterns:
        for item in expand_urls(pat):
            p = Path(item)
            files += sorted(p.glob("*.json*")) if p.is_dir() else [p]
    missing = [str(f) for f in files if not f.exists()]
    if missing or not files:
        raise FileNotFoundError(f"input file(s) not found: {missing or patterns}")
    return files


def build(inputs: list[str], out: str | Path, dataset: str = "c4", split: str | None = None, max_chars: int = 1500,
          maxcount: int = 5000, max_examples: int | None = None) -> dict[str, int]:
    if max_chars < 100:
        raise ValueError(f"--max-chars must be >= 100, got {max_chars}")
    w = RecipeWriter(out, dataset, f"{dataset} JSON lines", maxcount, max_examples)
    for path in input_files(inputs):
        s = split or ("val" if VAL_RE.search(path.name) else "train")
        with open_text(path) as f:
            for ln, line in enumerate(progress(f, f"{dataset} {path.name}")):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    text = doc["text"]
                except (ValueError, KeyError, TypeError):
                    w.skip("line that is not a JSON object with 'text'")
                    continue
                doc_id = str(doc.get("id") or doc.get("url") or f"{path.name}:{ln}")
                for k, piece in enumerate(chunks(str(text), max_chars)):
                    w.write("span_corruption", s, {"id": f"{dataset}:{doc_id}:{k}", "text": piece,
                                                   **({"title": doc["title"]} if doc.get("title") else {})})
                if w.full("span_corruption", s):
                    break
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(maxcount=5000)
    p.add_argument("--input", nargs="+", required=True, help="JSON-lines files (.json / .json.gz), patterns, folders")
    p.add_argument("--dataset", default="c4", help="c4 or wikipedia (the name in the shard tree)")
    p.add_argument("--split", default=None, help="force the split (default: from the file name)")
    p.add_argument("--max-chars", type=int, default=1500, help="longest text chunk in characters")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.input, a.out, a.dataset, a.split, a.max_chars, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
