"""NYU Depth v2 (CSV + PNG layout) -> ``depth`` shards.

Expected layout (the widely mirrored ``nyu_data.zip`` of DenseDepth / tensorflow-datasets)::

    <root>/data/nyu2_train.csv     lines "data/nyu2_train/<scene>_out/<n>.jpg,data/nyu2_train/<scene>_out/<n>.png"
    <root>/data/nyu2_test.csv      lines "data/nyu2_test/<nnnnn>_colors.png,data/nyu2_test/<nnnnn>_depth.png"
    <root>/data/nyu2_train/..., <root>/data/nyu2_test/...   (paths in the CSVs are relative to <root>)

Depth PNGs: 16-bit files are millimetres; 8-bit files (the training frames of that archive) are
``value / 255 * 10`` metres. ``--depth-scale`` (metres per unit) overrides both. 0 = no reading.
Splits: ``train`` and ``test`` (the 654 standard evaluation frames). ``max_depth`` is 10 m.

    python data_recipes/nyu_depth.py --root /data/nyu_depth_v2 --out shards/
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import RecipeWriter, image_bytes, parser, progress, require, setup_logging  # noqa: E402

MAX_DEPTH = 10.0
CSVS = {"nyu2_train.csv": "train", "nyu2_test.csv": "test"}


def read_depth(path: Path, scale: float | None = None) -> np.ndarray:
    """A depth PNG -> float32 (H, W) metres (0 = invalid)."""
    with Image.open(path) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:  # some mirrors store the 8-bit depth as RGB with equal channels
        arr = arr[..., 0]
    if scale is None:
        if arr.dtype == np.uint16 or arr.dtype == np.int32:
            scale = 0.001
        elif arr.dtype == np.uint8:
            scale = MAX_DEPTH / 255.0
        else:
            raise ValueError(f"{path}: unexpected depth PNG dtype {arr.dtype}; pass --depth-scale")
    return (arr.astype(np.float64) * scale).astype(np.float32)


def build(root: str | Path, out: str | Path, depth_scale: float | None = None, maxcount: int = 1000,
          max_examples: int | None = None) -> dict[str, int]:
    root = require(root, "NYU Depth v2 root")
    w = RecipeWriter(out, "nyu_depth_v2", f"NYU Depth v2 ({root})", maxcount, max_examples)
    found = 0
    for name, split in CSVS.items():
        csv_path = next((p for p in (root / "data" / name, root / name) if p.exists()), None)
        if csv_path is None:
            continue
        found += 1
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
        for row in progress(rows, f"nyu {split}"):
            if len(row) != 2:
                raise ValueError(f"{csv_path}: expected '<rgb path>,<depth path>' per line, got {row}")
            rgb, depth = root / row[0].strip(), root / row[1].strip()
            if not rgb.exists() or not depth.exists():
                w.skip("missing rgb or depth file")
                continue
            d = read_depth(depth, depth_scale)
            w.write("depth", split, {"id": f"nyu:{row[0].strip()}", "image": image_bytes(rgb), "depth": d,
                                     "max_depth": MAX_DEPTH})
    if not found:
        raise FileNotFoundError(f"no {' / '.join(CSVS)} in {root} or {root / 'data'}")
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder holding data/nyu2_{train,test}.csv and the frames")
    p.add_argument("--depth-scale", type=float, default=None, help="metres per depth-PNG unit (default: by dtype)")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.root, a.out, a.depth_scale, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
