"""Padding encoded samples (design.md contract 2) into the model's batch dict (contract 3)."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

REQUIRED = ("text_inputs", "image_input", "image_input_mask", "text_targets", "image_target_mask", "task")


def _as_array(value: Any, what: str, i: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as e:
        raise TypeError(f"sample {i}: {what} must be an array, got {type(value).__name__}") from e


def _pad_text(rows: list[Any], what: str, cap: int | None, pad_id: int, eos_id: int) -> torch.Tensor:
    """Ragged id lists -> (B, L) int64, L = longest row (at most ``cap``), 0-padded; rows over the
    cap are cut and keep their EOS."""
    ids = []
    for i, r in enumerate(rows):
        a = _as_array(r, what, i).reshape(-1)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"sample {i}: {what} must hold integer ids, got dtype {a.dtype}")
        a = a.astype(np.int64)
        if cap is not None and a.size > cap:
            log.debug("sample %d: %s of length %d cut to %d", i, what, a.size, cap)
            end_eos = a[-1] == eos_id
            a = a[:cap].copy()
            if end_eos:
                a[-1] = eos_id
        ids.append(a)
    length = max(1, max(a.size for a in ids))
    out = torch.full((len(ids), length), pad_id, dtype=torch.int64)
    for i, a in enumerate(ids):
        out[i, : a.size] = torch.from_numpy(a)
    return out


def _stack(rows: list[np.ndarray], what: str, dtype: torch.dtype) -> torch.Tensor:
    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"every sample's {what} must have the same shape to batch them, got {sorted(shapes)} "
                         "(encode all tasks with one Processor)")
    return torch.from_numpy(np.stack(rows)).to(dtype)


class Collator:
    """``Collator(max_input_len, max_target_len)(samples) -> batch`` (contract 3).

    Text is padded to the longest row of the batch, capped at the given lengths (None = no cap).
    ``image_targets`` (or ``image_target_codes`` when every image-target row carries pre-tokenised
    codes) and ``image_target_masks`` are included only when some row has an image target.
    """

    def __init__(self, max_input_len: int | None = None, max_target_len: int | None = None, pad_id: int = 0,
                 eos_id: int = 1):
        for name, v in (("max_input_len", max_input_len), ("max_target_len", max_target_len)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        self.max_input_len, self.max_target_len = max_input_len, max_target_len
        self.pad_id, self.eos_id = pad_id, eos_id

    @classmethod
    def from_config(cls, config: Any) -> "Collator":
        """Caps from a ModelConfig (``encoder_max_text_len`` / ``decoder_max_text_len``)."""
        v = config.vocab
        return cls(config.encoder_max_text_len, config.decoder_max_text_len, v.pad_id, v.eos_id)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        for i, s in enumerate(samples):
            if not isinstance(s, Mapping):
                raise TypeError(f"sample {i} must be a dict (an encoded sample), got {type(s).__name__}")
            missing = [k for k in REQUIRED if k not in s]
            if missing:
                raise KeyError(f"sample {i} (task {s.get('task')!r}) is missing {missing}; an encoded sample has "
                               f"{list(REQUIRED) + ['image_target', 'meta']}")
        batch: dict[str, Any] = {
            "text_inputs": _pad_text([s["text_inputs"] for s in samples], "text_inputs", self.max_input_len,
                                     self.pad_id, self.eos_id),
            "image_inputs": _stack([_as_array(s["image_input"], "image_input", i).astype(np.float32)
                                    for i, s in enumerate(samples)], "image_input", torch.float32),
            "image_input_masks": _stack([_as_array(s["image_input_mask"], "image_input_mask", i).astype(bool)
                                         for i, s in enumerate(samples)], "image_input_mask", torch.bool),
            "text_targets": _pad_text([s["text_targets"] for s in samples], "text_targets", self.max_target_len,
                                      self.pad_id, self.eos_id),
        }
        if batch["image_inputs"].ndim != 4 or batch["image_inputs"].shape[1] != 3:
            raise ValueError(f"image_input must be float (3, H, W) per sample, got {tuple(batch['image_inputs'].shape[1:])}")
        masks = [_as_array(s["image_target_mask"], "image_target_mask", i).astype(bool).reshape(-1)
                 for i, s in enumerate(samples)]
        has_target = [s.get("image_target") is not None or s.get("image_target_codes") is not None or m.any()
                      for s, m in zip(samples, masks)]
        if any(has_target):
            batch.update(self._image_targets(samples, masks, has_target))
        batch["tasks"] = [str(s["task"]) for s in samples]
        batch["meta"] = [dict(s.get("meta") or {}) for s in samples]
        return batch

    def _image_targets(self, samples, masks, has_target) -> dict[str, torch.Tensor]:
        out = {"image_target_masks": _stack(masks, "image_target_mask", torch.bool)}
        rows = [i for i, h in enumerate(has_target) if h]
        codes = [samples[i].get("image_target_codes") for i in rows]
        images = [samples[i].get("image_target") for i in rows]
        n = out["image_target_masks"].shape[1]
        if all(c is not None for c in codes):
            arr = np.zeros((len(samples), n), np.int64)
            for i in rows:
                c = _as_array(samples[i]["image_target_codes"], "image_target_codes", i).reshape(-1)
                if c.size != n:
                    raise ValueError(f"sample {i}: image_target_codes has {c.size} codes, image_target_mask {n}")
                arr[i] = c
            out["image_target_codes"] = torch.from_numpy(arr)
            return out
        if any(im is None for im in images):
            bad = [rows[k] for k, im in enumerate(images) if im is None]
            raise ValueError(f"samples {bad} have an image target mask but neither image_target nor "
                             "image_target_codes (and other rows have no codes)")
        first = _as_array(images[0], "image_target", rows[0])
        if first.ndim != 3 or first.shape[0] != 3:
            raise ValueError(f"image_target must be float (3, Ht, Wt) in [-1, 1], got shape {first.shape}")
        full = [np.zeros(first.shape, np.float32)] * len(samples)
        for i in rows:
            full[i] = _as_array(samples[i]["image_target"], "image_target", i).astype(np.float32)
        out["image_targets"] = _stack(full, "image_target", torch.float32)
        return out


def collate(samples: Sequence[Mapping[str, Any]], max_input_len: int | None = None,
            max_target_len: int | None = None) -> dict[str, Any]:
    """Functional form of :class:`Collator`."""
    return Collator(max_input_len, max_target_len)(samples)
