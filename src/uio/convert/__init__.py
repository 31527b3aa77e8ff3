"""Loading the released Unified-IO checkpoints (Flax msgpack) into :class:`uio.Model`.

>>> from uio.convert import load_original
>>> model = load_original("small_1000k.bin", spiece="spiece.model")   # doctest: +SKIP
>>> model.save_pretrained("uio-small")                                 # doctest: +SKIP

or from the shell: ``uio-convert small_1000k.bin uio-small --spiece spiece.model``.
"""
from __future__ import annotations

from typing import Any

from uio.convert.flax_msgpack import (
    ArrayRef,
    FlaxFormatError,
    FlaxMsgpackFile,
    is_flax_msgpack,
    load_flax_msgpack,
    read_flax_msgpack,
    write_flax_msgpack,
)

_LAZY = {  # names from uio.convert.original, imported on first use (it pulls in the model)
    "load_original", "convert_to_directory", "convert_checkpoint", "build_plan", "check_config", "infer_config",
    "infer_vqgan_config", "original_shapes", "original_transformer_shapes", "original_vqgan_shapes",
    "write_original_checkpoint", "ConversionError", "Plan", "DEAD",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from uio.convert import original

        return getattr(original, name)
    raise AttributeError(f"module 'uio.convert' has no attribute {name!r}")


__all__ = ["ArrayRef", "FlaxFormatError", "FlaxMsgpackFile", "is_flax_msgpack", "load_flax_msgpack",
           "read_flax_msgpack", "write_flax_msgpack", *sorted(_LAZY)]
