"""``uio-convert``: a released Unified-IO checkpoint (Flax msgpack ``{size}_1000k.bin``) -> a
``uio.Model.save_pretrained`` directory (``model.safetensors`` + ``config.json`` + ``spiece.model``).

    uio-convert small_1000k.bin uio-small --spiece spiece.model
    uio-convert xl_1000k.bin uio-xl --spiece spiece.model --dtype bfloat16

The configuration is read off the tensor shapes (``--size`` names it explicitly instead). The
conversion streams tensor by tensor from the memory-mapped file, so even the 10.9 GB xl file
needs little memory. JAX and Flax are not needed.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from uio.config import SIZES, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uio-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="the released checkpoint, e.g. small_1000k.bin")
    p.add_argument("out_dir", type=Path, help="output directory (Model.from_pretrained loads it)")
    p.add_argument("--spiece", type=Path, default=None,
                   help="T5's SentencePiece model (spiece.model, 32000 pieces); default: spiece.model beside SRC")
    p.add_argument("--size", choices=[s for s in SIZES if s in ("small", "base", "large", "xl")], default=None,
                   help="use this released configuration instead of inferring it from the tensor shapes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="storage precision of the transformer weights (the VQ-GAN stays float32)")
    p.add_argument("--encoder-text-len", type=int, default=256, help="text positions of the encoder table (256)")
    p.add_argument("--decoder-text-len", type=int, default=256, help="text positions of the decoder table (256)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    from uio.convert.flax_msgpack import FlaxFormatError, is_flax_msgpack
    from uio.convert.original import ConversionError, convert_to_directory

    if not args.src.is_file():
        print(f"uio-convert: {args.src} is not a file (expected a released *_1000k.bin checkpoint)", file=sys.stderr)
        return 2
    if not is_flax_msgpack(args.src):
        print(f"uio-convert: {args.src} is not a Flax msgpack checkpoint (it does not start with a msgpack map)",
              file=sys.stderr)
        return 2
    config = None
    if args.size is not None:
        config = ModelConfig.from_size(args.size, encoder_max_text_len=args.encoder_text_len,
                                       decoder_max_text_len=args.decoder_text_len)
    start = time.perf_counter()
    try:
        out = convert_to_directory(args.src, args.out_dir, config=config, spiece=args.spiece,
                                   encoder_max_text_len=args.encoder_text_len,
                                   decoder_max_text_len=args.decoder_text_len, dtype=DTYPES[args.dtype])
    except (ConversionError, FlaxFormatError, FileNotFoundError, ValueError) as e:
        print(f"uio-convert: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        cfg = ModelConfig.load(out / "config.json")
        print(f"converted {args.src} -> {out} in {time.perf_counter() - start:.1f}s: {cfg.name} "
              f"(d_model={cfg.d_model}, layers={cfg.num_encoder_layers}+{cfg.num_decoder_layers}, "
              f"heads={cfg.num_heads}x{cfg.head_dim}, d_ff={cfg.d_ff}, vocab={cfg.vocab_size})")
        if not (out / "spiece.model").is_file():
            print("note: no spiece.model was given, so the converted model has no text tokenizer; copy T5's "
                  f"spiece.model into {out} (or rerun with --spiece) to use text prompts", file=sys.stderr)
        print(f"load it with: uio.Model.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
