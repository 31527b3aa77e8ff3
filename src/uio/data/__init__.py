"""The data path: WebDataset shards, the temperature mixture, collate and the Lightning data module.

See ``docs/design.md`` for the raw-example / encoded-sample / batch contracts.
"""
from uio.data.shards import (
    CorruptSample,
    ReadStats,
    ShardSource,
    ShardWriter,
    decode_sample,
    discover,
    encode_example,
    expand_urls,
    load_manifest,
    manifest_splits,
    manifest_urls,
    read_examples,
    write_examples,
)

__all__ = [
    "CorruptSample", "ReadStats", "ShardSource", "ShardWriter", "decode_sample", "discover", "encode_example",
    "expand_urls", "load_manifest", "manifest_splits", "manifest_urls", "read_examples", "write_examples",
]
