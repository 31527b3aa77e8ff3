"""An ImageNet-style class-folder set -> ``image_classification`` shards.

Expected layout (ILSVRC-2012 after the usual val re-sorting, Imagenette, or any class-folder set)::

    <root>/train/<class>/<image>.JPEG
    <root>/val/<class>/<image>.JPEG          (splits are the sub-folders present: train, val, test, ...)

Class names: ``--names`` maps folder names (WordNet ids) to words, one ``<wnid> <name>[, alias...]``
per line (``LOC_synset_mapping.txt`` / ``synset_words.txt``) or a JSON object; the label is the
first name. Without it the folder name is the label. ``candidates`` (every class name, for scoring)
are stored in the splits named by ``--candidates-in`` (default: every split except train).

    python data_recipes/imagenet.py --root /data/imagenet --names LOC_synset_mapping.txt --out shards/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import RecipeWriter, image_bytes, parser, progress, require, setup_logging  # noqa: E402

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def read_names(path: str | Path) -> dict[str, str]:
    """``<wnid> <name>, <alias>`` lines or a JSON object -> {folder: label}."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        return {str(k): str(v[0] if isinstance(v, list) else v) for k, v in json.loads(text).items()}
    out = {}
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{ln}: expected '<wnid> <name>[, alias...]', got {line!r}")
        out[parts[0]] = parts[1].split(",")[0].strip()
    return out


def build(root: str | Path, out: str | Path, names: str | Path | None = None, dataset: str = "imagenet",
          candidates_in: list[str] | None = None, maxcount: int = 1000, max_examples: int | None = None
          ) -> dict[str, int]:
    root = require(root, "class-folder root")
    splits = sorted(d.name for d in root.iterdir() if d.is_dir() and any(c.is_dir() for c in d.iterdir()))
    if not splits:
        raise FileNotFoundError(f"no <split>/<class>/ folders in {root}")
    classes = sorted({c.name for s in splits for c in (root / s).iterdir() if c.is_dir()})
    mapping = read_names(names) if names else {c: c for c in classes}
    missing = [c for c in classes if c not in mapping]
    if missing:
        raise ValueError(f"--names has no entry for class folder(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
    labels = [mapping[c] for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    cand_splits = set(candidates_in) if candidates_in is not None else {s for s in splits if s != "train"}
    w = RecipeWriter(out, dataset, f"{dataset} class folders ({root})", maxcount, max_examples)
    for split in splits:
        files = sorted(p for c in classes if (root / split / c).is_dir() for p in (root / split / c).iterdir()
                       if p.suffix.lower() in IMAGE_EXTS)
        for p in progress(files, f"{dataset} {split}"):
            ex = {"id": f"{dataset}:{split}/{p.parent.name}/{p.stem}", "image": image_bytes(p),
                  "label": mapping[p.parent.name], "class_index": index[p.parent.name]}
            if split in cand_splits:
                ex["candidates"] = labels
            w.write("image_classification", split, ex)
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder with <split>/<class>/<image> files")
    p.add_argument("--names", default=None, help="class-name file (LOC_synset_mapping.txt style or JSON)")
    p.add_argument("--dataset", default="imagenet", help="dataset name in the shard tree")
    p.add_argument("--candidates-in", nargs="*", default=None, help="splits that store the candidate list")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.root, a.out, a.names, a.dataset, a.candidates_in, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
