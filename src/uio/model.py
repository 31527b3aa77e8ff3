"""``uio.Model``: the Unified-IO network with its frozen image tokenizer and its text tokenizer.

>>> cfg = ModelConfig.from_size("tiny", text_vocab=500, image_input_size=(64, 64), image_target_grid=(4, 4))
>>> model = Model(cfg)                      # initialised (T5X init) unless built on the meta device
>>> out = model(batch)                      # batch: the dict of docs/design.md (contract 3)
>>> out.loss.backward()
>>> gen = model.generate(batch, max_text_len=16, method="beam", num_beams=4)
>>> scores = model.score_options(batch, [tok.encode("yes"), tok.encode("no")])   # (B, 2)

Batches follow contract 3 of ``docs/design.md``. Image targets are either pixels
(``image_targets``, tokenised here by the frozen image tokenizer under ``no_grad``) or
pre-computed codes (``image_target_codes``); the decoder then runs on ``[text slots] + [image
slots]``. The loss is the token cross-entropy under the modality masks (text slots over text ids,
image slots over image ids), averaged over every valid target token of the batch.

``save_pretrained(dir)`` writes ``model.safetensors`` (network weights, and the image tokenizer's
under ``image_tokenizer.``), ``config.json`` (the :class:`ModelConfig`, whose ``image_tokenizer``
field holds the tokenizer's spec) and the text tokenizer's ``spiece.model``.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uio.config import ModelConfig
from uio.inference import InferenceMixin
from uio.modeling.generation import AllowedTokens, GenerationOutput, Options
from uio.modeling.generation import generate as _generate
from uio.modeling.generation import score_options as _score_options
from uio.modeling.generation import token_log_probs, used_length
from uio.modeling.network import EncoderOutput, UnifiedIONetwork
from uio.vocab import Vocab

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class ModelOutput:
    """``loss``: mean token cross-entropy over all valid targets; ``per_example_loss`` (B,): mean
    over each row's targets (0 for a row without any); ``text_loss``/``image_loss``: mean over the
    batch's text / image target tokens (0 when there are none); ``num_text_tokens`` /
    ``num_image_tokens``: how many were counted; ``per_example_tokens`` (B,): each row's count;
    ``logits`` (B, Ld+Ni, V) with the modality masks, only when ``return_logits=True`` (they are large)."""

    loss: torch.Tensor
    per_example_loss: torch.Tensor
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    num_text_tokens: torch.Tensor
    num_image_tokens: torch.Tensor
    per_example_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def layout_groups(b: Mapping[str, Any]) -> list[torch.Tensor]:
    """Row indices of a validated batch grouped by layout: (has a visible input patch, has an image
    target), in order of first appearance."""
    bsz = b["text_inputs"].shape[0]
    keys = torch.zeros(bsz, dtype=torch.long, device=b["text_inputs"].device)
    if b.get("image_inputs") is not None:
        keys += 2 * b["image_input_masks"].any(1).long()
    if b.get("image_target_codes") is not None:
        keys += b["image_target_masks"].any(1).long()
    found = keys.tolist()
    return [torch.tensor([i for i, k in enumerate(found) if k == key], device=keys.device)
            for key in dict.fromkeys(found)]


def _layout_subbatch(b: Mapping[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The rows of a validated batch, trimmed to their own layout: text to the longest row, no
    image input when none of them has a visible patch, no image slots when none has an image target."""
    sub: dict[str, Any] = {}
    for key in ("text_inputs", "text_targets"):
        t = b[key][rows]
        sub[key] = t[:, :used_length(t)]
    image, masks = b.get("image_inputs"), b.get("image_input_masks")
    if image is not None and bool(masks[rows].any()):
        sub["image_inputs"], sub["image_input_masks"] = image[rows], masks[rows]
    else:
        sub["image_inputs"] = sub["image_input_masks"] = None
    codes, tmask = b.get("image_target_codes"), b.get("image_target_masks")
    if codes is not None and bool(tmask[rows].any()):
        sub["image_target_codes"], sub["image_target_masks"] = codes[rows], tmask[rows]
    else:
        sub["image_target_codes"] = sub["image_target_masks"] = None
    return sub


def check_loc_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0 or sigma == float("inf"):
        raise ValueError(f"loc_sigma (train.loc_label_sigma) must be a finite number of location bins >= 0 "
                         f"(0: one-hot targets), got {sigma!r}")
    return float(sigma)


def location_soft_nll(network: "UnifiedIONetwork", hidden: torch.Tensor, targets: torch.Tensor,
                      sigma: float) -> torch.Tensor:
    """Cross-entropy of text-slot hidden states (N, d) against a Gaussian over the location bins
    around each target bin (``targets``: location ids), standard deviation ``sigma`` bins, cut at 3
    sigma and renormalised. The softmax is the text slots' own (every text id), so probability put on
    non-location ids still costs. A one-hot location target says a box edge one bin off is as wrong
    as one across the image; with this target the nearby bins share the credit, the gradient says
    which way to move, and the argmax stays on the true bin. (Not in the paper, whose loss is the
    plain token cross-entropy; an option of this project's training, off by default.)"""
    vocab = network.vocab
    logp = torch.log_softmax(network.logits(hidden, "text"), dim=-1)  # (N, text), float32
    logp_bins = logp[:, vocab.loc_start : vocab.loc_end].flip(-1)  # column b = bin b (ids are reversed)
    bins = torch.arange(vocab.num_loc_bins, device=hidden.device, dtype=torch.float32)
    dist = bins[None, :] - vocab.loc_bin(targets).to(torch.float32)[:, None]  # (N, bins)
    q = torch.exp(-0.5 * (dist / sigma) ** 2) * (dist.abs() <= 3 * sigma)
    q = q / q.sum(-1, keepdim=True)
    return -(q * logp_bins).sum(-1)


class Model(InferenceMixin, nn.Module):
    """Network + optional frozen image tokenizer + optional text tokenizer. The task methods
    (``caption``, ``detect``, ``depth``, ...) come from :class:`uio.inference.InferenceMixin`."""

    def __init__(self, config: ModelConfig, image_tokenizer: nn.Module | None = None, text_tokenizer: Any = None,
                 init: bool = True):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a uio.ModelConfig (e.g. ModelConfig.from_size('tiny')), "
                            f"got {type(config).__name__}")
        if image_tokenizer is None and config.image_tokenizer is not None:
            from uio.image_tokenizer import build_image_tokenizer

            image_tokenizer = build_image_tokenizer(config.image_tokenizer)
        if image_tokenizer is not None:
            self._check_image_tokenizer(image_tokenizer, config)
            if hasattr(image_tokenizer, "freeze"):
                image_tokenizer.freeze()
            else:
                image_tokenizer.requires_grad_(False).eval()
            if config.image_tokenizer is None and hasattr(image_tokenizer, "spec"):
                config = dataclasses.replace(config, image_tokenizer=image_tokenizer.spec())
        if text_tokenizer is not None:
            n = text_tokenizer.vocab.text_vocab
            if n != config.text_vocab:
                raise ValueError(f"the text tokenizer has {n} pieces but config.text_vocab is {config.text_vocab}; "
                                 f"build the config with text_vocab={n}")
        self.config = config
        # Allocate on the meta device, then materialise and initialise: no double initialisation,
        # and a model built inside `with torch.device("meta")` stays weightless (xl in a second).
        device = torch.get_default_device()
        with torch.device("meta"):
            network = UnifiedIONetwork(config)
        if device.type != "meta":
            network.to_empty(device=device)
            if init:
                network.init_weights()
        self.network = network
        self.image_tokenizer = image_tokenizer
        self.text_tokenizer = text_tokenizer

    @staticmethod
    def _check_image_tokenizer(tok: nn.Module, cfg: ModelConfig) -> None:
        for attr, want in (("num_codes", cfg.image_vocab), ("grid", tuple(cfg.image_target_grid)),
                           ("image_size", tuple(cfg.image_target_size))):
            have = getattr(tok, attr, None)
            have = tuple(have) if isinstance(have, (list, tuple)) else have
            if have != want:
                field = {"num_codes": "image_vocab", "grid": "image_target_grid", "image_size": "image_target_size"}
                raise ValueError(f"image tokenizer {attr}={have} does not match config.{field[attr]}={want}")

    # ---- basics -------------------------------------------------------------------------------
    @property
    def vocab(self) -> Vocab:
        return self.config.vocab

    @property
    def device(self) -> torch.device:
        return self.network.token_embedder.weight.device

    def init_weights(self) -> None:
        """(Re-)initialise the network (the image tokenizer keeps its weights)."""
        self.network.init_weights()

    def num_parameters(self, include_image_tokenizer: bool = False) -> int:
        mods = [self] if include_image_tokenizer or self.image_tokenizer is None else [self.network]
        return sum(p.numel() for m in mods for p in m.parameters())

    # ---- batch checking -----------------------------------------------------------------------
    def _tensor(self, batch: Mapping, key: str, ndim: int, kind: str, required: bool = True) -> torch.Tensor | None:
        if key not in batch or batch[key] is None:
            if required:
                raise ValueError(f"batch is missing {key!r} (see docs/design.md, contract 3)")
            return None
        t = batch[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"batch[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"batch[{key!r}] must have {ndim} dimensions, got shape {tuple(t.shape)}")
        ok = {"int": _is_int(t), "float": t.is_floating_point(), "bool": t.dtype == torch.bool}[kind]
        if not ok:
            want = {"int": "an integer dtype (int64)", "float": "a floating dtype", "bool": "torch.bool"}[kind]
            raise TypeError(f"batch[{key!r}] must have {want}, got {t.dtype}")
        return t.to(self.device, non_blocking=True)

    def _check_batch(self, batch: Mapping, targets: bool) -> dict[str, torch.Tensor | None]:
        """Validate a contract-3 batch; returns its tensors on the model's device."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict (docs/design.md contract 3), got {type(batch).__name__}")
        cfg, vocab = self.config, self.vocab
        text = self._tensor(batch, "text_inputs", 2, "int")
        b = text.shape[0]
        if text.shape[1] > cfg.encoder_max_text_len:
            raise ValueError(f"text_inputs has {text.shape[1]} tokens, more than encoder_max_text_len="
                             f"{cfg.encoder_max_text_len}")
        out: dict[str, torch.Tensor | None] = {"text_inputs": text.long()}

        def rows(key: str, t: torch.Tensor | None) -> None:
            if t is not None and t.shape[0] != b:
                raise ValueError(f"batch[{key!r}] has {t.shape[0]} rows but text_inputs has {b}")

        image = self._tensor(batch, "image_inputs", 4, "float", required=False)
        masks = self._tensor(batch, "image_input_masks", 2, "bool", required=False)
        if image is not None:
            rows("image_inputs", image)
            h, w = cfg.image_input_size
            if image.shape[1] != 3 or tuple(image.shape[2:]) != (h, w):
                raise ValueError(f"image_inputs must have shape (B, 3, {h}, {w}) (config.image_input_size), "
                                 f"got {tuple(image.shape)}")
            p = cfg.encoder_max_image_len
            if masks is None:
                masks = torch.ones(b, p, dtype=torch.bool, device=self.device)
            rows("image_input_masks", masks)
            if masks.shape[1] != p:
                raise ValueError(f"image_input_masks must have shape (B, {p}) (one flag per {cfg.patch_size}x"
                                 f"{cfg.patch_size} patch of {h}x{w}), got {tuple(masks.shape)}")
            image = image.to(self.network.encoder.image_projection.weight.dtype)
        elif masks is not None and bool(masks.any()):
            raise ValueError("image_input_masks marks visible patches but the batch has no image_inputs")
        out["image_inputs"], out["image_input_masks"] = image, masks
        checks = [(text < 0) | (text >= vocab.text_vocab_size)]
        if targets:
            tt = self._tensor(batch, "text_targets", 2, "int")
            rows("text_targets", tt)
            if tt.shape[1] > cfg.decoder_max_text_len:
                raise ValueError(f"text_targets has {tt.shape[1]} tokens, more than decoder_max_text_len="
                                 f"{cfg.decoder_max_text_len}")
            out["text_targets"] = tt.long()
            checks.append((tt < 0) | (tt >= vocab.text_vocab_size))
            ni = cfg.decoder_max_image_len
            codes = self._tensor(batch, "image_target_codes", 2, "int", required=False)
            pixels = self._tensor(batch, "image_targets", 4, "float", required=False)
            tmask = self._tensor(batch, "image_target_masks", 2, "bool", required=False)
            if codes is None and pixels is not None:
                rows("image_targets", pixels)
                ht, wt = cfg.image_target_size
                if pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (ht, wt):
                    raise ValueError(f"image_targets must have shape (B, 3, {ht}, {wt}) (config.image_target_size), "
                                     f"got {tuple(pixels.shape)}")
                codes = self.encode_image_targets(pixels)
            if codes is not None:
                rows("image_target_codes", codes)
                if codes.shape[1] != ni:
                    raise ValueError(f"image_target_codes must have shape (B, {ni}) (image_target_grid "
                                     f"{cfg.image_target_grid}), got {tuple(codes.shape)}")
                checks.append(((codes < 0) | (codes >= vocab.image_vocab)).any(1, keepdim=True))
                if tmask is None:
                    tmask = torch.ones(b, ni, dtype=torch.bool, device=self.device)
                rows("image_target_masks", tmask)
                if tmask.shape[1] != ni:
                    raise ValueError(f"image_target_masks must have shape (B, {ni}), got {tuple(tmask.shape)}")
                codes = codes.long()
            elif tmask is not None and bool(tmask.any()):
                raise ValueError("image_target_masks marks image targets but the batch has neither "
                                 "image_targets nor image_target_codes")
            out["image_target_codes"], out["image_target_masks"] = codes, (tmask if codes is not None else None)
        # one host synchronisation for all id-range checks; details only when something is wrong
        if bool(torch.cat([c.reshape(-1) for c in checks]).any()):
            self._explain_ids(out)
        return out

    def _explain_ids(self, out: dict) -> None:
        v = self.vocab
        for key, hi in (("text_inputs", v.text_vocab_size), ("text_targets", v.text_vocab_size),
                        ("image_target_codes", v.image_vocab)):
            t = out.get(key)
            if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
                extra = " (codes, not vocabulary ids: subtract Vocab.image_offset)" if key == "image_target_codes" else \
                    " (text ids, location and sentinel ids are below text_vocab_size)"
                raise ValueError(f"batch[{key!r}] values must be in [0, {hi}){extra}, got [{int(t.min())}, "
                                 f"{int(t.max())}]")

    @contextmanager
    def _eval(self):
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    @torch.no_grad()
    def encode_image_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, Ht, Wt) in [-1, 1] -> codes (B, Ni) with the frozen image tokenizer (fp32)."""
        if self.image_tokenizer is None:
            raise ValueError("the batch has image_targets (pixels) but this model has no image tokenizer; pass "
                             "image_target_codes instead or build the Model with an image_tokenizer")
        param = next(self.image_tokenizer.parameters(), None)  # a tokenizer may have no parameters
        dtype = param.dtype if param is not None else torch.float32
        with torch.autocast(self.device.type, enabled=False):
            return self.image_tokenizer.encode(images.to(dtype))

    @torch.no_grad()
    def tokenize_image_targets(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """A batch whose image targets are pixels (``image_targets``) -> the same batch with
        ``image_target_codes`` from the frozen tokenizer instead, encoding only the rows that have a
        target (in a multi-task batch most have none; the others get code 0, masked out). The batch
        is returned as it is when it already has codes, no image targets, or the model no tokenizer."""
        pixels, masks = batch.get("image_targets"), batch.get("image_target_masks")
        if pixels is None or masks is None or batch.get("image_target_codes") is not None \
                or self.image_tokenizer is None:
            return batch
        rows = masks.any(dim=1).nonzero().flatten()  # (R,)
        codes = torch.zeros(masks.shape, dtype=torch.long, device=masks.device)
        if rows.numel():
            codes[rows] = self.encode_image_targets(pixels[rows])
        out = {k: v for k, v in batch.items() if k != "image_targets"}
        out["image_target_codes"] = codes
        return out

    def decode_image_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, Ni) -> images (B, 3, Ht, Wt) in about [-1, 1] with the image tokenizer."""
        if self.image_tokenizer is None:
            raise ValueError("this model has no image tokenizer to turn image codes into pixels")
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return self.image_tokenizer.decode(codes)

    def encode(self, batch: Mapping, num_patches: int | None = None,
               generator: torch.Generator | None = None) -> EncoderOutput:
        """Run the encoder on a batch (validated)."""
        b = self._check_batch(batch, targets=False)
        return self.network.encode(b["text_inputs"], b["image_inputs"], b["image_input_masks"], num_patches, generator)

    # ---- training -----------------------------------------------------------------------------
    def forward(self, batch: Mapping, num_patches: int | None = None, return_logits: bool = False,
                generator: torch.Generator | None = None, group_rows: bool = False,
                loc_sigma: float = 0.0) -> ModelOutput:
        """Teacher-forced loss on a batch. ``num_patches``: encode a random subset of that many
        visible patches per row (training-time subsampling).

        ``group_rows=True`` runs the rows in groups of one layout -- (has an input image, has an
        image target) -- each with only its own padding: in a multi-task batch most rows then skip
        the image-target slots and the masked patches of an absent image, and the text is padded to
        the group's longest row, not the batch's. Every row's computation is the same as in the
        whole batch (positions and biases do not depend on the padding), so the loss is the same
        up to float rounding; only the work is smaller. Not with ``return_logits``.

        ``loc_sigma > 0`` (training only, ``train.loc_label_sigma``): a location target's loss is the
        cross-entropy against a Gaussian over the location bins (standard deviation ``loc_sigma``
        bins, cut at 3 sigma) instead of the one-hot bin, see :func:`location_soft_nll`."""
        b = self._check_batch(batch, targets=True)
        loc_sigma = check_loc_sigma(loc_sigma)
        if not group_rows:
            return self._output(*self._token_losses(b, num_patches, generator, return_logits, loc_sigma))
        if return_logits:
            raise ValueError("group_rows=True returns no logits (the groups have different lengths)")
        bsz = b["text_inputs"].shape[0]
        row_sum = torch.zeros(bsz, dtype=torch.float32, device=self.device)
        per_row = torch.zeros(bsz, dtype=torch.long, device=self.device)
        text_sum = image_sum = row_sum.new_zeros(())
        n_text = n_image = per_row.new_zeros(())
        for rows in layout_groups(b):
            ts, nt, is_, ni, rs, pr, _ = self._token_losses(_layout_subbatch(b, rows), num_patches, generator, False,
                                                            loc_sigma)
            text_sum, n_text, image_sum, n_image = text_sum + ts, n_text + nt, image_sum + is_, n_image + ni
            row_sum = row_sum.index_put((rows,), rs)
            per_row = per_row.index_put((rows,), pr)
        return self._output(text_sum, n_text, image_sum, n_image, row_sum, per_row, None)

    @staticmethod
    def _output(text_sum, n_text, image_sum, n_image, row_sum, per_row, logits) -> ModelOutput:
        return ModelOutput(
            loss=(text_sum + image_sum) / (n_text + n_image).clamp(min=1),
            per_example_loss=row_sum / per_row.clamp(min=1),
            text_loss=text_sum / n_text.clamp(min=1),
            image_loss=image_sum / n_image.clamp(min=1),
            num_text_tokens=n_text, num_image_tokens=n_image, per_example_tokens=per_row, logits=logits)

    def _token_losses(self, b: Mapping[str, Any], num_patches: int | None, generator: torch.Generator | None,
                      return_logits: bool, loc_sigma: float = 0.0):
        """Sums of the token negative log-likelihoods of a validated batch: (text sum, text count,
        image sum, image count, per-row sums (B,), per-row counts (B,), masked logits or None)."""
        net, vocab = self.network, self.vocab
        tt = b["text_targets"]  # (B, Ld)
        bsz, ld = tt.shape
        inputs = [torch.cat([torch.zeros_like(tt[:, :1]), tt[:, :-1]], 1)]  # shift right, 0 start
        valid = [tt != 0]
        codes, tmask = b["image_target_codes"], b["image_target_masks"]
        if codes is not None:
            bos = torch.full_like(codes[:, :1], vocab.image_bos_id)
            inputs.append(torch.cat([bos, codes[:, :-1] + vocab.image_offset], 1))
            valid.append(tmask)
        ids, key_valid = torch.cat(inputs, 1), torch.cat(valid, 1)  # (B, Ld+Ni)
        text_emb, dec_emb = net.embed_tokens(b["text_inputs"], ids)  # one lookup in the tied table
        enc = net.encode(b["text_inputs"], b["image_inputs"], b["image_input_masks"], num_patches, generator,
                         text_emb=text_emb)
        hidden = net.decode(enc, ids, ld, key_valid, input_emb=dec_emb)  # (B, Ld+Ni, d)

        # per-token negative log-likelihoods, only at valid targets (text: text ids, image: codes)
        vt = valid[0]
        soft = vt & vocab.is_loc(tt) if loc_sigma > 0 else None  # location targets scored by location_soft_nll
        hard = vt if soft is None else vt & ~soft
        nll_text = torch.zeros(bsz, ld, dtype=torch.float32, device=ids.device).masked_scatter(
            hard, -token_log_probs(net, hidden[:, :ld][hard], tt[hard], "text"))
        if soft is not None and bool(soft.any()):
            nll_text = nll_text.masked_scatter(soft, location_soft_nll(net, hidden[:, :ld][soft], tt[soft], loc_sigma))
        n_text = vt.sum()
        text_sum = nll_text.sum()
        row_sum = nll_text.sum(1)
        if codes is not None:
            nll_image = torch.zeros(bsz, codes.shape[1], dtype=torch.float32, device=ids.device).masked_scatter(
                tmask, -token_log_probs(net, hidden[:, ld:][tmask], codes[tmask], "image"))
            n_image = tmask.sum()
            image_sum = nll_image.sum()
            row_sum = row_sum + nll_image.sum(1)
        else:
            n_image, image_sum = torch.zeros_like(n_text), hidden.new_zeros((), dtype=torch.float32)
        logits = net.masked_logits(hidden, ld) if return_logits else None
        return text_sum, n_text, image_sum, n_image, row_sum, key_valid.sum(1), logits

    # ---- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: Mapping, max_text_len: int = 32, image_output: bool = False, method: str = "greedy",
                 num_beams: int = 1, top_p: float = 0.9, temperature: float = 1.0,
                 allowed_tokens: AllowedTokens = None, generator: torch.Generator | None = None,
                 alpha: float = 0.0, use_cache: bool = True, num_samples: int = 1) -> GenerationOutput:
        """Decode text, then (``image_output=True``) the image tokens; see :mod:`uio.modeling.generation`.

        ``allowed_tokens`` restricts the text steps: bool (V,) or (B, V) over the whole vocabulary
        (e.g. ``model.vocab.loc_mask()``), or ``callable(step, prefix (B*beams, step)) -> mask``.
        ``images`` are decoded when the model has an image tokenizer.

        ``num_samples > 1`` (sampling, image-only outputs such as depth, normals and image synthesis):
        draw that many images from one encoding and return the mean of their pixels in ``images``
        (test-time ensembling: an estimate of the model's conditional mean, which lowers squared
        errors such as depth RMSE); ``image_codes`` and ``text_tokens`` are the first sample's.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if num_samples > 1 and not (image_output and method == "sample" and max_text_len <= 1):
            raise ValueError("num_samples > 1 averages sampled images: it needs image_output=True, method='sample' "
                             f"and no text output (max_text_len=1), got image_output={image_output}, "
                             f"method={method!r}, max_text_len={max_text_len}")
        if num_samples > 1 and self.image_tokenizer is None:
            raise ValueError("num_samples > 1 averages decoded images, and this model has no image tokenizer")
        kw = dict(max_text_len=max_text_len, image_output=image_output, method=method, num_beams=num_beams,
                  top_p=top_p, temperature=temperature, allowed_tokens=allowed_tokens, generator=generator,
                  alpha=alpha, use_cache=use_cache)
        with self._eval():
            enc = self.encode(batch)
            out = _generate(self.network, enc, **kw)
            if out.image_codes is not None and self.image_tokenizer is not None:
                out.images = self.decode_image_codes(out.image_codes)
                for _ in range(num_samples - 1):
                    out.images = out.images + self.decode_image_codes(_generate(self.network, enc, **kw).image_codes)
                out.images = out.images / num_samples
        return out

    @torch.no_grad()
    def score_options(self, batch: Mapping, options: Options, average: bool = False) -> torch.Tensor:
        """(B, K) log-likelihoods of K answer options (token-id lists, shared by all rows or one list
        of K per row; EOS appended if missing), summed over tokens or averaged. The paper classifies
        by the best-scoring option: ``scores.argmax(1)``."""
        with self._eval():
            return _score_options(self.network, self.encode(batch), options, average=average)

    # ---- persistence --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors``, ``config.json`` (+ ``spiece.model``) to ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "uio"})
        cfg = self.config.to_dict()
        if self.image_tokenizer is not None and hasattr(self.image_tokenizer, "spec"):
            cfg["image_tokenizer"] = self.image_tokenizer.spec()  # weights travel in model.safetensors
        (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        if self.text_tokenizer is not None:
            self.text_tokenizer.save(directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, **original: Any) -> "Model":
        """Load a directory written by :meth:`save_pretrained`. ``dtype`` casts the network only
        (the image tokenizer stays in its saved precision). A released Flax checkpoint file
        (``{size}_1000k.bin``) is converted on the fly by :func:`uio.convert.load_original`, which
        takes the ``original`` keywords (``config``, ``spiece``)."""
        from safetensors.torch import load_file

        from uio.convert import is_flax_msgpack, load_original

        directory = Path(directory).expanduser()
        if is_flax_msgpack(directory):
            return load_original(directory, device=device, dtype=dtype, **original)
        if original:
            raise TypeError(f"{sorted(original)} apply only to original Flax checkpoints, and {directory} is not one")
        weights, cfg_file = directory / WEIGHTS_NAME, directory / CONFIG_NAME
        for f in (weights, cfg_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: expected {WEIGHTS_NAME} and {CONFIG_NAME} written by "
                                        "Model.save_pretrained")
        config = ModelConfig.load(cfg_file)
        text_tokenizer = None
        if (directory / "spiece.model").is_file():
            from uio.text_tokenizer import TextTokenizer

            text_tokenizer = TextTokenizer.from_dir(directory, image_vocab=config.image_vocab)
        image_tokenizer = None
        with torch.device("meta"):
            if config.image_tokenizer is not None:
                from uio.image_tokenizer import build_image_tokenizer

                spec = {k: v for k, v in config.image_tokenizer.items() if k != "weights"}
                image_tokenizer = build_image_tokenizer(spec)
            model = cls(config, image_tokenizer=image_tokenizer, text_tokenizer=text_tokenizer)
        state = load_file(str(weights), device=str(device))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match the configured model: missing {sorted(missing)[:8]}"
                             f"{'...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
                             f"{'...' if len(unexpected) > 8 else ''}")
        if image_tokenizer is not None:
            image_tokenizer.requires_grad_(False)
        if dtype is not None:
            model.network.to(dtype)
        return model
