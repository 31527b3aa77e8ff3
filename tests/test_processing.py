"""Image pre/post-processing: resize-pad, normalisation, patch masks, undo, input formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from uio.config import ModelConfig
from uio.processing import (
    IMAGENET_MEAN, IMAGENET_STD, Processor, denormalize, patch_mask_from_pixels, resize_and_pad, scaled_size,
    to_float_image, undo_resize_and_pad,
)


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    return Processor(text_tokenizer)


def _smooth_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [0.5 + 0.4 * np.sin(2 * np.pi * (a * yy + b * xx) + c) for a, b, c in rng.uniform(0.3, 1.2, (3, 3))]
    return np.stack(chans, -1).astype(np.float32)


# ---- input formats --------------------------------------------------------------------------------
def test_every_supported_image_format_gives_the_same_float_image():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    ref = u8.astype(np.float32) / 255
    variants = [u8, ref, Image.fromarray(u8), torch.from_numpy(u8).permute(2, 0, 1),
                torch.from_numpy(ref).permute(2, 0, 1), np.dstack([u8, np.full((7, 9), 255, np.uint8)]),
                Image.fromarray(np.dstack([u8, np.full((7, 9), 9, np.uint8)]), mode="RGBA")]
    for v in variants:
        np.testing.assert_allclose(to_float_image(v), ref, atol=1e-6, err_msg=type(v).__name__)
    gray = u8[..., 0]
    for g in (gray, gray[..., None], Image.fromarray(gray), torch.from_numpy(gray)[None]):
        out = to_float_image(g)
        assert out.shape == (7, 9, 3) and np.allclose(out[..., 0], out[..., 2])
        np.testing.assert_allclose(out[..., 1], gray / 255, atol=1e-6)


@pytest.mark.parametrize("bad, err, msg", [
    ("image.png", TypeError, "unsupported image type"),
    (np.zeros((2, 4, 4, 3)), ValueError, r"\(H, W\)"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, r"\(H, W, 1\|3\|4\)"),
    (np.full((4, 4, 3), 200.0), ValueError, r"float images must be in \[0, 1\]"),
    (np.full((4, 4, 3), np.nan), ValueError, "NaN"),
    (np.zeros((0, 4, 3), np.uint8), ValueError, "empty side"),
    (np.zeros((4, 4, 3), np.int32), TypeError, "dtype"),
])
def test_bad_images_are_rejected_with_a_clear_error(bad, err, msg):
    with pytest.raises(err, match=msg):
        to_float_image(bad)


# ---- input image ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(200, 100), (100, 130), (384, 384), (50, 700), (1, 1)])
def test_input_resize_pad_normalise_and_patch_mask_match_the_original(processor, hw):
    img = _smooth_image(*hw)
    out = processor.image_input(img)
    sh, sw = scaled_size(hw, (384, 384))
    assert max(sh, sw) == 384 and out.image.shape == (3, 384, 384) and out.image.dtype == np.float32
    assert out.info.original_hw == hw and out.info.scaled_hw == (sh, sw)
    hwc = denormalize(out.image)
    # padding is zero *before* normalisation: pad pixels are -mean/std
    pad = np.ones((384, 384), bool)
    pad[:sh, :sw] = False
    np.testing.assert_allclose(out.image.transpose(1, 2, 0)[pad], np.broadcast_to(-IMAGENET_MEAN / IMAGENET_STD,
                                                                                   (pad.sum(), 3)), atol=1e-5)
    # content = the bilinear antialiased resize (torchvision's F.resize on tensors)
    t = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size=(sh, sw), mode="bilinear",
                      align_corners=False, antialias=True)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(hwc[:sh, :sw], t, atol=1e-5)
    # patch mask: the original's nearest resize of the pixel mask to 24x24
    pm = torch.zeros(1, 1, 384, 384)
    pm[..., :sh, :sw] = 1
    nearest = F.interpolate(pm, size=(24, 24), mode="nearest").reshape(-1).bool().numpy()
    np.testing.assert_array_equal(out.mask, nearest)
    # ...which is "a patch is visible iff it holds a real pixel"
    rows, cols = -(-sh // 16), -(-sw // 16)
    assert out.mask.reshape(24, 24)[:rows, :cols].all() and out.mask.sum() == rows * cols


def test_normalisation_is_imagenet_mean_std(processor):
    img = np.zeros((384, 384, 3), np.float32) + np.array([0.2, 0.5, 0.9], np.float32)
    out = processor.image_input(img)
    np.testing.assert_allclose(out.image[:, 10, 10], (np.array([0.2, 0.5, 0.9]) - IMAGENET_MEAN) / IMAGENET_STD,
                               atol=1e-5)
    assert out.mask.all()


def test_inpainting_region_hides_every_overlapping_patch(processor):
    img = _smooth_image(192, 384)  # scale 1, content rows 0..191 (12 patch rows)
    box = [20, 40, 70, 90]  # x 20..70 -> patch cols 1..4, y 40..90 -> patch rows 2..5
    out = processor.image_input(img, mask_region=box)
    grid = out.mask.reshape(24, 24)
    hidden = np.zeros((24, 24), bool)
    hidden[2:6, 1:5] = True
    real = np.zeros((24, 24), bool)
    real[:12] = True
    np.testing.assert_array_equal(grid, real & ~hidden)


def test_empty_input_for_text_only_tasks(processor):
    out = processor.empty_image_input()
    assert out.image.shape == (3, 384, 384) and not out.image.any() and out.mask.shape == (576,) and not out.mask.any()


# ---- target image and undo ------------------------------------------------------------------------
def test_target_image_range_and_code_grid_mask(processor):
    img = _smooth_image(100, 200)
    tgt = processor.image_target(img)
    assert tgt.image.shape == (3, 256, 256) and tgt.image.dtype == np.float32
    assert tgt.image.min() >= -1 and tgt.image.max() <= 1
    assert np.all(tgt.image[:, 128:, :] == -1)  # padding (0) -> -1
    grid = tgt.mask.reshape(16, 16)
    assert grid[:8].all() and not grid[8:].any()


@pytest.mark.parametrize("hw", [(256, 180), (120, 90), (300, 500)])
def test_output_image_undoes_target_preprocessing(processor, hw):
    img = _smooth_image(*hw, seed=3)
    tgt = processor.image_target(img)
    back = processor.output_image(tgt.image, hw, mode="bilinear")
    assert back.shape == (*hw, 3)
    err = np.abs(back - img)
    if max(hw) == 256:  # no resizing: exact
        assert err.max() < 1e-5
    else:
        assert err.mean() < 0.02


def test_undo_nearest_keeps_label_values(processor):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (6, 8)).repeat(10, 0).repeat(10, 1).astype(np.float32)  # 60x80 blocks
    padded, _, info = resize_and_pad(labels[..., None], (256, 256), mode="nearest")
    back = undo_resize_and_pad(padded[..., 0], info.original_hw, mode="nearest")
    assert set(np.unique(back)) <= set(np.unique(labels))
    assert (back == labels).mean() > 0.97


@pytest.mark.parametrize("bad", [None, np.zeros((256, 256)), np.zeros((4, 256, 256)), "x", np.zeros((3, 0, 5))])
def test_output_image_of_the_wrong_modality_is_none(processor, bad):
    assert processor.output_image(bad, (10, 10)) is None


def test_output_image_accepts_hwc_and_nan(processor):
    img = np.full((256, 256, 3), np.nan, np.float32)
    out = processor.output_image(img, (20, 20))
    assert out.shape == (20, 20, 3) and np.isfinite(out).all()


# ---- processor ------------------------------------------------------------------------------------
def test_from_config_geometry_and_vocab_check(text_tokenizer):
    cfg = ModelConfig.from_size("tiny", text_vocab=text_tokenizer.vocab.text_vocab, image_input_size=(128, 192),
                                encoder_max_text_len=64)
    p = Processor.from_config(cfg, text_tokenizer)
    assert p.patch_grid == (8, 12) and p.num_patches == 96 and p.max_input_len == 64
    assert p.vocab == cfg.vocab
    out = p.image_input(np.zeros((10, 30, 3), np.uint8))
    assert out.image.shape == (3, 128, 192) and out.mask.shape == (96,)
    with pytest.raises(ValueError, match="text_vocab"):
        Processor.from_config(ModelConfig.from_size("tiny"), text_tokenizer)


def test_region_text_is_the_original_extra_id_string(processor, text_tokenizer):
    box = [10.0, 20.0, 100.0, 60.0]
    s = processor.region_text(box, (120, 160))
    bins = (np.array([20, 10, 60, 100]) / 160 * 999).astype(int)
    assert s == " ".join(f"<extra_id_{b + 100}>" for b in bins)
    assert text_tokenizer.encode(s, add_eos=False) == processor.vocab.box_to_tokens(box, (120, 160))


def test_patch_mask_requires_divisible_grid():
    with pytest.raises(ValueError, match="patch grid"):
        patch_mask_from_pixels(np.ones((10, 10), bool), (3, 3))
