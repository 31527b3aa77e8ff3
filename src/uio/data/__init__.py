"""The data path: WebDataset shards, the temperature mixture, collate and the Lightning data module.

See ``docs/design.md`` for the raw-example / encoded-sample / batch contracts.
"""
from uio.data.collate import Collator, collate
from uio.data.mixture import (
    PAPER_GROUP_RATES,
    MixtureDataset,
    MixtureProgress,
    MixtureSource,
    compute_rates,
    format_rates,
)
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
    "Collator", "collate", "PAPER_GROUP_RATES", "MixtureDataset", "MixtureProgress", "MixtureSource",
    "compute_rates", "format_rates", "UIODataModule",
    "CorruptSample", "ReadStats", "ShardSource", "ShardWriter", "decode_sample", "discover", "encode_example",
    "expand_urls", "load_manifest", "manifest_splits", "manifest_urls", "read_examples", "write_examples",
]


def __getattr__(name: str):
    # the data module imports Lightning: load it only when asked for
    if name == "UIODataModule":
        from uio.data.datamodule import UIODataModule

        return UIODataModule
    raise AttributeError(f"module 'uio.data' has no attribute {name!r}")
