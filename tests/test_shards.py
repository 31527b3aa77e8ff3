"""Shard writer/reader: round trips, url forms, rank x worker splitting, corrupt samples."""
from __future__ import annotations

import io
import json
import logging
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from uio.data import shards as S


def _example(i: int, rng: np.random.Generator, h: int = 20, w: int = 30) -> dict:
    return {
        "id": f"ex{i}", "dataset": "unit",
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "boxes": [[1.0, 2.5, 10.0, 12.0], [0.0, 0.0, 5.0, 5.0]], "labels": ["cat", "dog"],
        "box": (1, 2, 3, 4),
        "masks": [rng.random((h, w)) > 0.5 for _ in range(3)],
        "segments": [{"label": "sky", "mask": rng.random((h, w)) > 0.3}],
        "depth": (rng.random((h, w)) * 9.0).astype(np.float32),
        "normals": (lambda n: n / np.linalg.norm(n, axis=-1, keepdims=True))(rng.standard_normal((h, w, 3))
                                                                           ).astype(np.float32),
        "codes": rng.integers(0, 16384, (16,)).astype(np.int64),
        "gray": rng.integers(0, 256, (h, w), dtype=np.uint8),
        "score": np.float32(0.5), "n": np.int64(3), "nested": {"a": [1, {"b": "c"}]}, "empty": [],
    }


def test_round_trip_lossless(tmp_path):
    rng = np.random.default_rng(0)
    exs = [_example(i, rng) for i in range(7)]
    m = S.write_examples(exs, tmp_path, "detection", "unit", "train", maxcount=3, lossless=True, source="unit test")
    assert m["train"]["num_examples"] == 7 and m["train"]["shard_sizes"] == [3, 3, 1]
    assert m["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert m["schema_version"] == 1 and m["source"] == "unit test" and m["task"] == "detection"
    back = S.read_examples(tmp_path / "detection/unit/train-{000000..000002}.tar")
    assert len(back) == 7
    for a, b in zip(exs, back):
        assert set(a) == set(b)
        np.testing.assert_array_equal(a["image"], b["image"])
        assert b["image"].dtype == np.uint8 and b["image"].shape == (20, 30, 3)
        for x, y in zip(a["masks"], b["masks"]):
            assert y.dtype == np.bool_
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(a["segments"][0]["mask"], b["segments"][0]["mask"])
        assert b["segments"][0]["label"] == "sky"
        assert b["depth"].dtype == np.float32
        np.testing.assert_allclose(b["depth"], a["depth"], atol=0.0005 + 1e-6)  # 1 mm quantisation
        np.testing.assert_allclose(b["normals"], a["normals"], atol=1.6e-5)
        np.testing.assert_array_equal(a["codes"], b["codes"])
        assert b["codes"].dtype == np.int64
        np.testing.assert_array_equal(a["gray"], b["gray"])
        assert b["box"] == [1, 2, 3, 4] and b["boxes"] == a["boxes"] and b["labels"] == a["labels"]
        assert b["score"] == 0.5 and b["n"] == 3 and b["nested"] == {"a": [1, {"b": "c"}]} and b["empty"] == []


def test_jpeg_default_and_bytes_passthrough(tmp_path):
    rng = np.random.default_rng(1)
    img = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (24, 1, 3))  # smooth: JPEG-friendly
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (9, 11), dtype=np.uint8), mode="L").save(buf, format="JPEG")
    gray_jpeg = buf.getvalue()
    S.write_examples([{"id": "a", "image": img}, {"id": "b", "image": gray_jpeg}], tmp_path, "t", "d", "val")
    names = tarfile.open(tmp_path / "t/d/val-000000.tar").getnames()
    assert names == ["000000000.image.jpg", "000000000.json", "000000001.image.jpg", "000000001.json"]
    # the encoded bytes are stored unchanged
    stored = tarfile.open(tmp_path / "t/d/val-000000.tar").extractfile("000000001.image.jpg").read()
    assert stored == gray_jpeg
    a, b = S.read_examples(tmp_path / "t/d/manifest.json#val")
    assert np.abs(a["image"].astype(int) - img).max() <= 8
    assert b["image"].shape == (9, 11, 3) and b["image"].dtype == np.uint8  # grey JPEG comes back RGB


def test_depth_scale_for_far_ranges(tmp_path):
    depth = np.array([[0.0, 1.0], [100.0, 300.0]], np.float32)  # beyond 65.535 m: the scale grows
    S.write_examples([{"depth": depth}], tmp_path, "depth", "far", "train")
    ex, = S.read_examples(str(tmp_path / "depth/far/train-000000.tar"))
    scale = 300.0 / 65535
    np.testing.assert_allclose(ex["depth"], depth, atol=scale / 2 + 1e-6)
    assert ex["depth"][0, 0] == 0.0  # invalid stays invalid
    members = S.encode_example({"depth": depth}, exact_floats=True)  # exact storage on request
    assert "depth.npy" in members and "depth.png" not in members


def test_text_only_and_url_forms(tmp_path):
    exs = [{"id": str(i), "text": f"sentence {i}"} for i in range(5)]
    S.write_examples(exs, tmp_path, "span_corruption", "c4", "train", maxcount=2)
    d = tmp_path / "span_corruption/c4"
    assert [e["text"] for e in S.read_examples(str(d / "train-{000000..000002}.tar"))] == [e["text"] for e in exs]
    assert [e["id"] for e in S.read_examples(f"pipe:cat {d}/train-000001.tar")] == ["2", "3"]
    joined = f"{d}/train-000002.tar::{d}/train-000000.tar"
    assert [e["id"] for e in S.read_examples(joined)] == ["4", "0", "1"]
    assert S.manifest_urls(d, "train") == [str(d / f"train-00000{i}.tar") for i in range(3)]
    with pytest.raises(KeyError, match="split 'val' not in"):
        S.manifest_urls(d, "val")


def test_rewrite_replaces_split_and_keeps_others(tmp_path):
    S.write_examples([{"x": i} for i in range(5)], tmp_path, "t", "d", "train", maxcount=1)
    S.write_examples([{"x": 9}], tmp_path, "t", "d", "val")
    S.write_examples([{"x": 7}, {"x": 8}], tmp_path, "t", "d", "train", maxcount=1)
    m = S.load_manifest(tmp_path / "t/d")
    assert S.manifest_splits(m) == {
        "train": {"num_examples": 2, "shards": ["train-000000.tar", "train-000001.tar"], "shard_sizes": [1, 1]},
        "val": {"num_examples": 1, "shards": ["val-000000.tar"], "shard_sizes": [1]}}
    assert sorted(p.name for p in (tmp_path / "t/d").glob("*.tar")) == ["train-000000.tar", "train-000001.tar",
                                                                        "val-000000.tar"]
    found = S.discover(tmp_path, split="val")
    assert [(f["task"], f["dataset"]) for f in found] == [("t", "d")]
    assert S.discover(tmp_path, tasks=["other"]) == []


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'image' must be a uint8 \(H, W, 3\)"):
        S.encode_example({"image": np.zeros((4, 4), np.float32)})
    with pytest.raises(TypeError, match="cannot serialise 'meta.obj' of type object"):
        S.encode_example({"meta": {"obj": object()}})
    with pytest.raises(ValueError, match="negative depths"):
        S.encode_example({"depth": -np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match="split must be a plain name"):
        S.ShardWriter(tmp_path, "t", "d", "train-a")
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        S.load_manifest(tmp_path)


def _parts_ids(urls, rank, world, workers):
    src = S.ShardSource(urls, rank=rank, world_size=world)
    loader = torch.utils.data.DataLoader(src, batch_size=None, num_workers=workers,
                                         collate_fn=lambda x: x)
    return [ex["id"] for ex in loader]


def test_write_encoded_stores_the_same_bytes_as_write(tmp_path):
    """Examples serialised elsewhere (the toy world's worker processes) land byte for byte as
    ``write`` would store them; anything but encode_example's output is refused."""
    rng = np.random.default_rng(1)
    exs = [_example(i, rng) for i in range(5)]
    S.write_examples(exs, tmp_path / "a", "detection", "unit", "train", maxcount=2)
    with S.ShardWriter(tmp_path / "b", "detection", "unit", "train", maxcount=2) as w:
        for ex in exs:
            w.write_encoded(S.encode_example(ex))
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert (tmp_path / "a/detection/unit" / name).read_bytes() == (tmp_path / "b/detection/unit" / name).read_bytes()
    w = S.ShardWriter(tmp_path / "c", "detection", "unit", "train")
    for bad in ({}, {"image.png": b"x"}, {"json": "{}"}, exs[0]):
        with pytest.raises(ValueError, match="encode_example"):
            w.write_encoded(bad)
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.write_encoded(S.encode_example(exs[0]))


@pytest.mark.parametrize("num_shards", [6, 3])  # >= and < ranks * workers
def test_exactly_once_across_ranks_and_workers(tmp_path, num_shards):
    n = num_shards * 4 - 1  # the last shard is one short
    S.write_examples([{"id": i} for i in range(n)], tmp_path, "t", "d", "train", maxcount=4)
    urls = S.manifest_urls(tmp_path / "t/d", "train")
    assert len(urls) == num_shards
    per_rank = [_parts_ids(urls, r, 2, 2) for r in range(2)]
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == list(range(n))  # every sample exactly once
    assert all(len(p) > 0 for p in per_rank)


def _tar_with(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_skipped_counted_logged(tmp_path, caplog):
    good = S.encode_example({"id": "good", "image": np.zeros((4, 4, 3), np.uint8)}, lossless=True)
    members = [(f"k0.{k}", v) for k, v in good.items()]
    members += [("k1.json", json.dumps({"id": "badimg", "image": {"__array__": "image.jpg", "codec": "jpg",
                                                                  "rgb": True}}).encode()),
                ("k1.image.jpg", b"\xff\xd8\xff not really a jpeg")]
    members += [("k2.json", b"{not json")]
    members += [("k3.image.png", good["image.png"])]  # no json at all
    members += [(f"k4.{k}", v) for k, v in S.encode_example({"id": "good2"}).items()]
    _tar_with(tmp_path / "bad-000000.tar", members)
    src = S.ShardSource(str(tmp_path / "bad-000000.tar"), rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="uio.data.shards"):
        ids = [e["id"] for e in src]
    assert ids == ["good", "good2"]
    assert src.stats.samples == 2 and src.stats.corrupt == 3 and src.stats.corrupt_shards == 0
    assert sum(src.stats.reasons.values()) == 3
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3 and "3 corrupt samples" in msgs[-1] and "k2" in msgs[1]


def test_truncated_shard_counted(tmp_path):
    S.write_examples([{"id": i, "image": np.full((8, 8, 3), i, np.uint8)} for i in range(4)], tmp_path, "t", "d",
                     "train", lossless=True)
    path = tmp_path / "t/d/train-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    src = S.ShardSource([str(path), str(tmp_path / "missing-000000.tar")], rank=0, world_size=1)
    got = [e["id"] for e in src]
    assert 0 < len(got) < 4 and got == list(range(len(got)))
    assert src.stats.corrupt_shards == 2


def _png16(arr: np.ndarray, ftype: int) -> bytes:
    """Reference 16-bit RGB PNG encoder using one filter type on every row (for decoder tests)."""
    h, w, _ = arr.shape
    rows = np.ascontiguousarray(arr.astype(">u2")).view(np.uint8).reshape(h, w * 6).astype(int)
    out = bytearray()
    for y in range(h):
        prev = rows[y - 1] if y else np.zeros(w * 6, int)
        line = []
        for x in range(w * 6):
            a = rows[y, x - 6] if x >= 6 else 0
            b, c = prev[x], (prev[x - 6] if x >= 6 else 0)
            p = a + b - c
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c) else c)
            pred = [0, a, b, (a + b) // 2, paeth][ftype]
            line.append((rows[y, x] - pred) & 255)
        out += bytes([ftype] + line)
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + S._png_chunk(b"IHDR", ihdr) + S._png_chunk(b"IDAT", zlib.compress(bytes(out))) \
        + S._png_chunk(b"IEND", b"")


@pytest.mark.parametrize("ftype", [0, 1, 2, 3, 4])
def test_png16_decoder_all_filters(ftype):
    arr = np.random.default_rng(ftype).integers(0, 65536, (5, 4, 3)).astype(np.uint16)
    np.testing.assert_array_equal(S.decode_png16_rgb(_png16(arr, ftype)), arr)
    np.testing.assert_array_equal(S.decode_png16_rgb(S.encode_png16_rgb(arr)), arr)


def test_brace_patterns_expand_inside_pipe_commands(tmp_path):
    S.write_examples([{"id": i} for i in range(4)], tmp_path, "t", "d", "train", maxcount=2)
    url = f"pipe:cat {tmp_path}/t/d/train-{{000000..000001}}.tar"
    assert S.expand_urls(url) == [f"pipe:cat {tmp_path}/t/d/train-00000{i}.tar" for i in range(2)]
    assert [e["id"] for e in S.read_examples(url)] == [0, 1, 2, 3]
