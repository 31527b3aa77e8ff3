"""Converting the released Unified-IO checkpoints (Flax msgpack) into uio.Model.

The released files cannot be downloaded here, so every test writes its own checkpoint in the
original layout: the real parameter names and shapes (at reduced widths), arrays in Flax's msgpack
encoding. The encoding is checked byte for byte against an independent encoder built on
``msgpack.packb`` exactly as ``flax.serialization.msgpack_serialize`` calls it (and against Flax itself
when it is installed).
"""
from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import pytest
import torch

from uio.convert.flax_msgpack import (
    FlaxFormatError,
    is_flax_msgpack,
    load_flax_msgpack,
    read_flax_msgpack,
    write_flax_msgpack,
)


# ================================================================================================
# An independent Flax-style encoder (what flax.serialization.msgpack_serialize does)
# ================================================================================================
def _flax_ext(x):
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
    if isinstance(x, np.generic):
        a = np.asarray(x)
        return msgpack.ExtType(3, msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True))
    if isinstance(x, complex):
        return msgpack.ExtType(2, msgpack.packb((x.real, x.imag)))
    return x


def _flax_chunk(tree, max_chunk):
    """flax.serialization._chunk_array_leaves_in_place on a copy."""
    if isinstance(tree, dict):
        return {k: _flax_chunk(v, max_chunk) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and tree.nbytes > max_chunk:
        step = max(1, int(max_chunk / tree.dtype.itemsize))
        flat = tree.reshape(-1)
        return {"__msgpack_chunked_array__": True,
                "shape": {str(i): d for i, d in enumerate(tree.shape)},
                "chunks": {str(i): flat[s:s + step] for i, s in enumerate(range(0, flat.size, step))}}
    return tree


def flax_bytes(tree, max_chunk=2**30) -> bytes:
    return msgpack.packb(_flax_chunk(tree, max_chunk), default=_flax_ext, strict_types=True)


def _sample_tree(rng):
    return {
        "token_embedder": {"embedding": rng.standard_normal((37, 8)).astype(np.float32)},
        "encoder": {
            "layers_0": {"attention": {"query": {"kernel": rng.standard_normal((8, 12)).astype(np.float32)}}},
            "empty": np.zeros((0, 3), np.float32),
            "ints": np.arange(-5, 300, dtype=np.int64),
            "f64": rng.standard_normal((2, 3, 4)),
            "u8": np.arange(7, dtype=np.uint8),
        },
        "step": np.int32(1000),  # numpy scalar -> ext 3
        "lr": np.float32(0.5),
        "n": 7, "neg": -3, "big": 2**40, "x": 1.25, "flag": True, "none": None, "name": "uio",
        "c": 1.5 - 2j,
        "large": rng.standard_normal(70000).astype(np.float32),  # > 65535 bytes: ext32 / bin32 headers
    }


# ================================================================================================
# Reader / writer
# ================================================================================================
def test_writer_matches_flax_encoding_byte_for_byte(tmp_path):
    tree = _sample_tree(np.random.default_rng(0))
    path = write_flax_msgpack(tree, tmp_path / "a.bin")
    assert path.read_bytes() == flax_bytes(tree)


def test_writer_chunks_large_arrays_like_flax(tmp_path):
    rng = np.random.default_rng(1)
    tree = {"w": rng.standard_normal((10, 30)).astype(np.float32), "small": np.ones(3, np.float32)}
    path = write_flax_msgpack(tree, tmp_path / "c.bin", max_chunk_size=256)
    assert path.read_bytes() == flax_bytes(tree, max_chunk=256)
    with read_flax_msgpack(path) as f:
        ref = f.tree["w"]
        assert ref.shape == (10, 30) and len(ref.segments) == math.ceil(300 / 64)
        np.testing.assert_array_equal(ref.numpy(), tree["w"])
        np.testing.assert_array_equal(f.tree["small"].numpy(), tree["small"])


def test_reader_round_trip_values_and_types(tmp_path):
    tree = _sample_tree(np.random.default_rng(2))
    path = tmp_path / "r.bin"
    path.write_bytes(flax_bytes(tree))  # written by the independent encoder
    got = load_flax_msgpack(path)
    for k in ("n", "neg", "big", "x", "flag", "none", "name", "c"):
        assert got[k] == tree[k] and type(got[k]) is type(tree[k]), k
    assert got["step"] == 1000 and got["step"].dtype == np.int32
    assert got["lr"] == np.float32(0.5)
    np.testing.assert_array_equal(got["token_embedder"]["embedding"], tree["token_embedder"]["embedding"])
    for k, v in tree["encoder"].items():
        if isinstance(v, np.ndarray):
            assert got["encoder"][k].dtype == v.dtype and got["encoder"][k].shape == v.shape, k
            np.testing.assert_array_equal(got["encoder"][k], v)
    np.testing.assert_array_equal(got["large"], tree["large"])


def test_reader_is_lazy_and_zero_copy(tmp_path):
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = write_flax_msgpack({"a": {"kernel": w}}, tmp_path / "z.bin")
    raw = path.read_bytes()
    with read_flax_msgpack(path) as f:
        ref = f.flat()["a/kernel"]
        (offset, nbytes), = ref.segments
        assert nbytes == w.nbytes and raw[offset:offset + nbytes] == w.tobytes()  # points at the raw data
        t = ref.torch()
        t2 = ref.torch()
        assert t.data_ptr() == t2.data_ptr()  # both are views of the same mapped bytes, not copies
        np.testing.assert_array_equal(t.numpy(), w)
        ref.release()  # pages dropped; reading again re-faults them from the file
        np.testing.assert_array_equal(ref.torch().numpy(), w)
        del t, t2


def test_reader_bfloat16(tmp_path):
    x = torch.randn(5, 3).to(torch.bfloat16)
    payload = msgpack.packb(((5, 3), "bfloat16", x.view(torch.int16).numpy().tobytes()), use_bin_type=True)
    path = tmp_path / "bf.bin"
    path.write_bytes(msgpack.packb({"w": msgpack.ExtType(1, payload)}))
    with read_flax_msgpack(path) as f:
        t = f.tree["w"].torch()
        assert t.dtype == torch.bfloat16 and torch.equal(t, x)
        np.testing.assert_array_equal(f.tree["w"].numpy(), x.float().numpy())


@pytest.mark.parametrize("case, message", [
    ("truncated", "file ends inside"),
    ("trailing", "trailing bytes"),
    ("not_map", "expected a map"),
    ("ext_code", "unknown msgpack ext type 9"),
    ("size_mismatch", "needs 24 bytes, found 20"),
    ("empty", "is empty"),
    ("bad_tag", "is not a msgpack type tag"),
])
def test_reader_rejects_malformed_files(tmp_path, case, message):
    good = flax_bytes({"a": np.ones((2, 3), np.float32)})
    data = {
        "truncated": good[:-5],
        "trailing": good + b"\x00\x00",
        "not_map": msgpack.packb([1, 2, 3]),
        "ext_code": msgpack.packb({"a": msgpack.ExtType(9, b"xyz")}),
        "size_mismatch": msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((2, 3), "float32", b"\0" * 20)))}),
        "empty": b"",
        "bad_tag": b"\x81\xa1a\xc1",
    }[case]
    path = tmp_path / f"{case}.bin"
    path.write_bytes(data)
    with pytest.raises(FlaxFormatError, match=message):
        read_flax_msgpack(path)


def test_sniff_and_missing_file(tmp_path):
    path = write_flax_msgpack({"a": np.zeros(2, np.float32)}, tmp_path / "s.bin")
    assert is_flax_msgpack(path)
    assert not is_flax_msgpack(tmp_path)  # a directory (save_pretrained format) is not
    (tmp_path / "t.txt").write_text("hello")
    assert not is_flax_msgpack(tmp_path / "t.txt")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_flax_msgpack(tmp_path / "nope.bin")


def test_real_flax_reads_our_files_and_we_read_its_files(tmp_path):
    serialization = pytest.importorskip("flax.serialization")
    tree = _sample_tree(np.random.default_rng(3))
    ours = write_flax_msgpack(tree, tmp_path / "ours.bin").read_bytes()
    assert serialization.to_bytes(tree) == ours
    back = serialization.msgpack_restore(ours)
    np.testing.assert_array_equal(back["large"], tree["large"])
    (tmp_path / "theirs.bin").write_bytes(serialization.to_bytes(tree))
    np.testing.assert_array_equal(load_flax_msgpack(tmp_path / "theirs.bin")["encoder"]["f64"], tree["encoder"]["f64"])
