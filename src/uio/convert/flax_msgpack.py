"""Flax msgpack checkpoints (``flax.serialization.to_bytes``) without JAX or Flax.

The released Unified-IO weights (``{small,base,large,xl}_1000k.bin``) are one msgpack document: nested
maps with string keys whose leaves are arrays stored as msgpack *extension* records. Flax's encoding
(``flax/serialization.py``):

* ext type 1 (ndarray): payload = ``msgpack.packb((shape, dtype.name, arr.tobytes("C")))``, an
  array of three items: the shape (array of ints), the dtype name (str) and the raw C-order bytes (bin);
* ext type 2 (native complex): payload = ``msgpack.packb((real, imag))``;
* ext type 3 (numpy scalar): same payload as type 1 with shape ``()``;
* arrays over ``2**30`` bytes are split into ``{"__msgpack_chunked_array__": True,
  "shape": {"0": d0, ...}, "chunks": {"0": flat_chunk_0, ...}}``.

Reading. The ``msgpack`` package hands every extension payload to ``ext_hook`` as a fresh ``bytes``
copy and buffers a whole top-level object, so decoding the 10.9 GB xl file with it holds the file in
memory at least once more before any tensor is built. :class:`FlaxMsgpackFile` instead walks the
msgpack *structure* itself (maps, strings, numbers, ext headers; the format's tags are fixed by the
msgpack spec) over a memory-mapped file and returns :class:`ArrayRef` leaves that know their shape,
dtype and byte offset. Tensor data is touched only when a leaf is read, as a zero-copy view of the
mapping, and :meth:`ArrayRef.release` drops those pages from the process again. Converting therefore
needs the target model plus one tensor in flight, never a second copy of the checkpoint.

Writing. :func:`write_flax_msgpack` streams a nested dict of numpy arrays in exactly the bytes that
``flax.serialization.msgpack_serialize`` produces (the container headers come from ``msgpack.Packer``);
the tests use it to build checkpoints in the original layout.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import msgpack
import numpy as np
import torch

EXT_NDARRAY = 1
EXT_NATIVE_COMPLEX = 2
EXT_NPSCALAR = 3
MAX_CHUNK_SIZE = 2**30  # flax.serialization.MAX_CHUNK_SIZE: arrays larger than this are chunked
CHUNKED_KEY = "__msgpack_chunked_array__"
_PAGE = mmap.PAGESIZE


class FlaxFormatError(ValueError):
    """The file is not a well-formed Flax msgpack checkpoint."""


# ---------------------------------------------------------------------------------------------
# Array leaves
# ---------------------------------------------------------------------------------------------
@dataclass
class ArrayRef:
    """One array of a checkpoint, not yet read: shape, dtype name and where its bytes are.

    ``segments`` holds ``(offset, nbytes)`` ranges of the file, in order; there is one range per
    array, several for arrays that Flax stored chunked.
    """

    shape: tuple[int, ...]
    dtype: str  # numpy dtype name as written by Flax ("float32", "bfloat16", ...)
    segments: tuple[tuple[int, int], ...]
    source: "FlaxMsgpackFile"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.segments)

    def torch(self) -> torch.Tensor:
        """The array as a CPU tensor. Zero-copy (a view of the mapped file) when stored in one piece."""
        tdtype = _torch_dtype(self.dtype)
        parts = [self.source._tensor_view(off, n, tdtype) for off, n in self.segments]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return flat.reshape(self.shape)

    def numpy(self) -> np.ndarray:
        """The array as a numpy copy (bfloat16 is widened to float32, which numpy can hold)."""
        t = self.torch()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy().copy()

    def release(self) -> None:
        """Drop the array's pages from this process's memory (they stay in the OS page cache)."""
        for off, n in self.segments:
            self.source._release(off, n)

    def __repr__(self) -> str:
        return f"ArrayRef(shape={self.shape}, dtype={self.dtype})"


def _torch_dtype(name: str) -> torch.dtype:
    if name == "bfloat16":
        return torch.bfloat16
    try:
        np_dtype = np.dtype(name)
    except TypeError as e:
        raise FlaxFormatError(f"unsupported array dtype {name!r} in the checkpoint") from e
    if np_dtype.byteorder == ">":
        raise FlaxFormatError(f"big-endian arrays are not supported (dtype {name!r})")
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------
class FlaxMsgpackFile:
    """A Flax msgpack checkpoint opened lazily over a memory map.

    ``tree`` is the nested dict of the file with :class:`ArrayRef` leaves (scalars and strings as
    Python values). Use as a context manager, or call :meth:`close`; views returned by
    :meth:`ArrayRef.torch` must not be used after closing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file {str(self.path)!r} not found")
        self._fh = open(self.path, "rb")
        size = os.fstat(self._fh.fileno()).st_size
        if size == 0:
            self._fh.close()
            raise FlaxFormatError(f"{self.path} is empty; expected a Flax msgpack checkpoint")
        # Copy-on-write mapping: writable views for torch (no warnings), the file itself never changes.
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self._buf = memoryview(self._mm)
        self.size = size
        try:
            self.tree, end = _Parser(self).parse(0)
        except FlaxFormatError as e:
            self.close()
            raise FlaxFormatError(f"{self.path}: {e}") from None
        if end != size:
            self.close()
            raise FlaxFormatError(f"{self.path}: {size - end} trailing bytes after the msgpack document")
        if not isinstance(self.tree, dict):
            self.close()
            raise FlaxFormatError(f"{self.path}: top level is {type(self.tree).__name__}, expected a map")

    # -- low level ----------------------------------------------------------------------------
    def _tensor_view(self, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        item = torch.empty(0, dtype=dtype).element_size()
        if nbytes % item:
            raise FlaxFormatError(f"array of {nbytes} bytes is not a whole number of {dtype} items")
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=offset)
        return torch.from_numpy(raw).view(dtype)

    def _release(self, offset: int, nbytes: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED") or nbytes == 0:
            return
        start = offset // _PAGE * _PAGE  # madvise needs a page-aligned start; neighbours are re-read if needed
        end = min(self.size, offset + nbytes)
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass  # best effort: memory is still correct, only not returned early

    # -- API -----------------------------------------------------------------------------------
    def flat(self, sep: str = "/") -> dict[str, Any]:
        """``{"encoder/layers_0/mlp/wo/kernel": ArrayRef, ...}`` in file order."""
        return dict(iter_flat(self.tree, sep=sep))

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self._buf.release()
            try:
                self._mm.close()
            except BufferError:
                pass  # a tensor view is still alive; the mapping goes when it does
            self._mm = None
        if getattr(self, "_fh", None) is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "FlaxMsgpackFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_flat(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> Iterator[tuple[str, Any]]:
    """Depth-first ``(path, leaf)`` pairs of a nested dict."""
    for k, v in tree.items():
        path = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from iter_flat(v, path, sep)
        else:
            yield path, v


class _Parser:
    """Walks one msgpack document over a memory map without copying array payloads."""

    def __init__(self, f: FlaxMsgpackFile):
        self.f = f
        self.buf = f._buf
        self.n = f.size

    def _need(self, pos: int, k: int, what: str) -> None:
        if pos + k > self.n:
            raise FlaxFormatError(f"file ends inside {what} at byte {pos} (needs {k} more bytes)")

    def _uint(self, pos: int, k: int, what: str) -> int:
        self._need(pos, k, what)
        return int.from_bytes(self.buf[pos : pos + k], "big")

    def parse(self, pos: int, depth: int = 0) -> tuple[Any, int]:
        """Decode the object at ``pos``; returns ``(value, end offset)``."""
        if depth > 64:
            raise FlaxFormatError("maps nested deeper than 64 levels")
        self._need(pos, 1, "an object header")
        b = self.buf[pos]
        pos += 1
        if b <= 0x7F:
            return b, pos
        if b >= 0xE0:
            return b - 0x100, pos
        if 0x80 <= b <= 0x8F:
            return self._map(pos, b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self._array(pos, b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self._str(pos, b & 0x1F)
        if b == 0xC0:
            return None, pos
        if b == 0xC2:
            return False, pos
        if b == 0xC3:
            return True, pos
        if b in (0xC4, 0xC5, 0xC6):  # bin 8/16/32
            k = 1 << (b - 0xC4)
            n = self._uint(pos, k, "a bin header")
            self._need(pos + k, n, "bin data")
            return bytes(self.buf[pos + k : pos + k + n]), pos + k + n
        if b in (0xC7, 0xC8, 0xC9):  # ext 8/16/32: length, type, data
            k = 1 << (b - 0xC7)
            n = self._uint(pos, k, "an ext header")
            return self._ext(pos + k, n, depth)
        if b == 0xCA:
            self._need(pos, 4, "a float32")
            return struct.unpack(">f", self.buf[pos : pos + 4])[0], pos + 4
        if b == 0xCB:
            self._need(pos, 8, "a float64")
            return struct.unpack(">d", self.buf[pos : pos + 8])[0], pos + 8
        if 0xCC <= b <= 0xCF:  # uint 8/16/32/64
            k = 1 << (b - 0xCC)
            return self._uint(pos, k, "an unsigned int"), pos + k
        if 0xD0 <= b <= 0xD3:  # int 8/16/32/64
            k = 1 << (b - 0xD0)
            self._need(pos, k, "an int")
            return int.from_bytes(self.buf[pos : pos + k], "big", signed=True), pos + k
        if 0xD4 <= b <= 0xD8:  # fixext 1/2/4/8/16: type, data
            return self._ext(pos, 1 << (b - 0xD4), depth)
        if b in (0xD9, 0xDA, 0xDB):  # str 8/16/32
            k = 1 << (b - 0xD9)
            return self._str(pos + k, self._uint(pos, k, "a str header"))
        if b in (0xDC, 0xDD):  # array 16/32
            k = 2 if b == 0xDC else 4
            return self._array(pos + k, self._uint(pos, k, "an array header"), depth)
        if b in (0xDE, 0xDF):  # map 16/32
            k = 2 if b == 0xDE else 4
            return self._map(pos + k, self._uint(pos, k, "a map header"), depth)
        raise FlaxFormatError(f"byte 0x{b:02x} at offset {pos - 1} is not a msgpack type tag")

    def _str(self, pos: int, n: int) -> tuple[str, int]:
        self._need(pos, n, "a string")
        try:
            return str(self.buf[pos : pos + n], "utf-8"), pos + n
        except UnicodeDecodeError as e:
            raise FlaxFormatError(f"string at offset {pos} is not UTF-8: {e}") from None

    def _array(self, pos: int, n: int, depth: int) -> tuple[list, int]:
        out = []
        for _ in range(n):
            v, pos = self.parse(pos, depth + 1)
            out.append(v)
        return out, pos

    def _map(self, pos: int, n: int, depth: int) -> tuple[Any, int]:
        out: dict[Any, Any] = {}
        for _ in range(n):
            key_pos = pos
            k, pos = self.parse(pos, depth + 1)
            if isinstance(k, (list, dict)):
                raise FlaxFormatError(f"map key at offset {key_pos} is a {type(k).__name__}, expected a string")
            v, pos = self.parse(pos, depth + 1)
            if k in out:
                raise FlaxFormatError(f"duplicate map key {k!r} at offset {key_pos}")
            out[k] = v
        if out.get(CHUNKED_KEY) is True:
            return self._unchunk(out), pos
        return out, pos

    def _ext(self, pos: int, n: int, depth: int) -> tuple[Any, int]:
        self._need(pos, 1 + n, "an ext record")
        code = struct.unpack("b", self.buf[pos : pos + 1])[0]
        start, end = pos + 1, pos + 1 + n
        if code in (EXT_NDARRAY, EXT_NPSCALAR):
            ref = self._ndarray(start, end)
            if code == EXT_NPSCALAR:
                return ref.numpy()[()], end
            return ref, end
        if code == EXT_NATIVE_COMPLEX:
            (re_im, stop) = self.parse(start, depth + 1)
            if stop != end or not (isinstance(re_im, list) and len(re_im) == 2):
                raise FlaxFormatError(f"malformed complex record at offset {pos}")
            return complex(re_im[0], re_im[1]), end
        raise FlaxFormatError(
            f"unknown msgpack ext type {code} at offset {pos - 1}; Flax writes 1 (ndarray), "
            "2 (complex) or 3 (numpy scalar)")

    def _ndarray(self, start: int, end: int) -> ArrayRef:
        """The ext-1 payload: a 3-array (shape, dtype name, raw bytes); data is located, not read."""
        if end <= start:
            raise FlaxFormatError(f"empty ndarray record at offset {start}")
        b = self.buf[start]
        if not 0x90 <= b <= 0x9F or (b & 0x0F) != 3:
            raise FlaxFormatError(f"ndarray record at offset {start} is not a (shape, dtype, data) triple")
        shape, pos = self.parse(start + 1, 1)
        dtype, pos = self.parse(pos, 1)
        if isinstance(dtype, bytes):
            dtype = dtype.decode("ascii")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FlaxFormatError(f"ndarray shape at offset {start} is {shape!r}, expected a list of ints")
        if not isinstance(dtype, str):
            raise FlaxFormatError(f"ndarray dtype at offset {start} is {dtype!r}, expected a dtype name")
        tag = self.buf[pos]
        if tag not in (0xC4, 0xC5, 0xC6):
            raise FlaxFormatError(f"ndarray data at offset {pos} is not a msgpack bin (tag 0x{tag:02x})")
        k = 1 << (tag - 0xC4)
        n = self._uint(pos + 1, k, "a bin header")
        data = pos + 1 + k
        if data + n != end:
            raise FlaxFormatError(f"ndarray record at offset {start} has {end - data - n} stray bytes")
        ref = ArrayRef(tuple(shape), dtype, ((data, n),), self.f)
        expected = ref.size * _torch_itemsize(dtype)
        if expected != n:
            raise FlaxFormatError(
                f"ndarray at offset {start}: shape {tuple(shape)} of {dtype} needs {expected} bytes, found {n}")
        return ref

    def _unchunk(self, d: dict) -> ArrayRef:
        try:
            shape = tuple(int(d["shape"][str(i)]) for i in range(len(d["shape"])))
            chunks = [d["chunks"][str(i)] for i in range(len(d["chunks"]))]
        except (KeyError, TypeError) as e:
            raise FlaxFormatError(f"malformed chunked array (missing {e})") from None
        if not chunks or not all(isinstance(c, ArrayRef) and len(c.shape) == 1 for c in chunks):
            raise FlaxFormatError("chunked array whose chunks are not 1-D arrays")
        dtypes = {c.dtype for c in chunks}
        if len(dtypes) != 1:
            raise FlaxFormatError(f"chunked array with mixed dtypes {sorted(dtypes)}")
        segs = tuple(s for c in chunks for s in c.segments)
        ref = ArrayRef(shape, chunks[0].dtype, segs, self.f)
        if sum(c.size for c in chunks) != ref.size:
            raise FlaxFormatError(f"chunked array of shape {shape}: chunks hold {sum(c.size for c in chunks)} items")
        return ref


def _torch_itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=_torch_dtype(dtype)).element_size()


def read_flax_msgpack(path: str | os.PathLike) -> FlaxMsgpackFile:
    """Open a Flax msgpack checkpoint lazily (see :class:`FlaxMsgpackFile`)."""
    return FlaxMsgpackFile(path)


def load_flax_msgpack(path: str | os.PathLike) -> dict[str, Any]:
    """Read a whole checkpoint into a nested dict of numpy arrays (copies; for small files)."""
    with FlaxMsgpackFile(path) as f:
        def materialise(t):
            if isinstance(t, dict):
                return {k: materialise(v) for k, v in t.items()}
            return t.numpy() if isinstance(t, ArrayRef) else t
        return materialise(f.tree)


def is_flax_msgpack(path: str | os.PathLike) -> bool:
    """Cheap sniff: a regular file whose first byte is a msgpack map header."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        head = fh.read(1)
    return bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


# ---------------------------------------------------------------------------------------------
# Writer (what flax.serialization.msgpack_serialize writes)
# ---------------------------------------------------------------------------------------------
def _ext_header(code: int, n: int) -> bytes:
    """msgpack's smallest ext header for an ``n``-byte payload (as msgpack.packb chooses it)."""
    fixext = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixext:
        return struct.pack(">Bb", fixext[n], code)
    if n < 2**8:
        return struct.pack(">BBb", 0xC7, n, code)
    if n < 2**16:
        return struct.pack(">BHb", 0xC8, n, code)
    if n < 2**32:
        return struct.pack(">BIb", 0xC9, n, code)
    raise ValueError(f"ext payload of {n} bytes exceeds msgpack's 4 GiB limit")


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return struct.pack(">BB", 0xC4, n)
    if n < 2**16:
        return struct.pack(">BH", 0xC5, n)
    return struct.pack(">BI", 0xC6, n)


def _write_ndarray(fh: BinaryIO, arr: np.ndarray, code: int = EXT_NDARRAY) -> None:
    if arr.dtype.hasobject or arr.dtype.isalignedstruct or arr.dtype.names:
        raise ValueError(f"cannot serialise arrays of dtype {arr.dtype}")
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    packer = msgpack.Packer(use_bin_type=True)
    head = b"\x93" + packer.pack(tuple(arr.shape)) + packer.pack(arr.dtype.name) + _bin_header(arr.nbytes)
    fh.write(_ext_header(code, len(head) + arr.nbytes))
    fh.write(head)
    fh.write(memoryview(arr.reshape(-1)).cast("B"))


def _write_tree(fh: BinaryIO, tree: Any, packer: msgpack.Packer, max_chunk: int) -> None:
    if callable(tree):  # a lazy leaf: produced only now, so huge trees stream one array at a time
        tree = tree()
    if isinstance(tree, torch.Tensor):
        tree = tree.detach().cpu().numpy()
    if isinstance(tree, Mapping):
        fh.write(packer.pack_map_header(len(tree)))
        for k, v in tree.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint keys must be str, got {k!r}")
            fh.write(packer.pack(k))
            _write_tree(fh, v, packer, max_chunk)
    elif isinstance(tree, np.ndarray):
        if tree.nbytes > max_chunk:  # flax's _chunk: flat pieces of max_chunk // itemsize items
            step = max(1, max_chunk // tree.dtype.itemsize)
            flat = tree.reshape(-1)
            chunked = {
                CHUNKED_KEY: True,
                "shape": {str(i): d for i, d in enumerate(tree.shape)},
                "chunks": {str(i): flat[s : s + step] for i, s in enumerate(range(0, flat.size, step))},
            }
            fh.write(packer.pack_map_header(3))
            for k, v in chunked.items():
                fh.write(packer.pack(k))
                if isinstance(v, dict) and k == "chunks":
                    fh.write(packer.pack_map_header(len(v)))
                    for ck, cv in v.items():
                        fh.write(packer.pack(ck))
                        _write_ndarray(fh, cv)
                else:
                    fh.write(packer.pack(v))
        else:
            _write_ndarray(fh, tree)
    elif isinstance(tree, np.generic):
        _write_ndarray(fh, np.asarray(tree), EXT_NPSCALAR)
    elif isinstance(tree, complex):
        payload = msgpack.packb((tree.real, tree.imag))
        fh.write(_ext_header(EXT_NATIVE_COMPLEX, len(payload)) + payload)
    elif tree is None or isinstance(tree, (bool, int, float, str, bytes)):
        fh.write(packer.pack(tree))
    else:
        raise TypeError(f"cannot serialise a {type(tree).__name__} into a Flax checkpoint")


def write_flax_msgpack(tree: Mapping[str, Any], path: str | os.PathLike, max_chunk_size: int = MAX_CHUNK_SIZE) -> Path:
    """Write ``tree`` (nested dicts of numpy arrays / tensors / scalars) as Flax's msgpack bytes.

    Streams leaf by leaf; a leaf may also be a zero-argument callable that returns the array, so
    a full-size checkpoint can be written without ever holding it in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    packer = msgpack.Packer(use_bin_type=True, strict_types=True)
    with open(path, "wb") as fh:
        _write_tree(fh, tree, packer, max_chunk_size)
    return path
