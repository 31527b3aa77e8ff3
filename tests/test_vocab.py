import numpy as np
import pytest
import torch

from uio.config import ModelConfig
from uio.vocab import Vocab


def test_released_layout():
    v = Vocab(text_vocab=32000, image_vocab=16384)
    assert v.loc_id(0) == 32999
    assert v.loc_id(999) == 32000
    assert v.sentinel_id(0) == 33099
    assert v.sentinel_id(99) == 33000
    assert v.text_vocab_size == 33152
    assert v.image_bos_id == 33151
    assert v.image_id(0) == 33152
    assert v.size == 49536
    # T5's <extra_id_i> is id N + 1100 - 1 - i
    assert v.extra_id(0) == 33099 and v.extra_id(100) == v.loc_id(0) and v.extra_id(1099) == 32000


def test_layout_scales_with_text_vocab():
    v = Vocab(text_vocab=1000, image_vocab=512)
    assert v.loc_id(0) == 1999 and v.sentinel_id(0) == 2099
    assert v.text_vocab_size == 2176 and v.text_vocab_size % 128 == 0
    assert v.size == 2176 + 512


def test_masks_partition_the_vocabulary():
    v = Vocab(text_vocab=1000, image_vocab=512)
    t, i, loc = v.text_mask(), v.image_mask(), v.loc_mask()
    assert t.shape == (v.size,) and bool((t ^ i).all())
    assert int(loc.sum()) == 1000 and bool((loc & t).sum() == 1000)
    ids = torch.arange(v.size)
    assert torch.equal(v.is_loc(ids), loc)
    assert int(v.is_sentinel(ids).sum()) == 100


@pytest.mark.parametrize("seed", range(5))
def test_box_round_trip_within_one_bin(seed):
    v = Vocab()
    rng = np.random.default_rng(seed)
    for _ in range(200):
        h, w = rng.integers(8, 2000, size=2)
        x1, x2 = np.sort(rng.uniform(0, w, 2))
        y1, y2 = np.sort(rng.uniform(0, h, 2))
        box = np.array([x1, y1, x2, y2])
        toks = v.box_to_tokens(box, (h, w))
        assert all(v.loc_start <= t < v.loc_end for t in toks)
        back = v.tokens_to_box(toks, (h, w))
        bin_px = max(h, w) / 999
        assert np.all(np.abs(back - box) <= bin_px + 1e-6), (box, back, bin_px)


def test_box_token_order_is_yx():
    v = Vocab()
    toks = v.box_to_tokens([0, 999, 0, 999], (999, 999))  # x1=0, y1=999
    assert v.loc_bin(toks[0]) == 999 and v.loc_bin(toks[1]) == 0


def test_bad_boxes_and_tokens():
    v = Vocab()
    with pytest.raises(ValueError, match="4 numbers"):
        v.box_to_tokens([1, 2, 3], (10, 10))
    with pytest.raises(ValueError, match="location ids"):
        v.tokens_to_box([5, 6, 7, 8], (10, 10))


def test_point_round_trip():
    v = Vocab()
    toks = v.point_to_tokens((123.0, 45.0), (480, 640))
    x, y = v.tokens_to_point(toks, (480, 640))
    assert abs(x - 123) <= 640 / 999 and abs(y - 45) <= 640 / 999


def test_model_config_sizes_and_errors():
    c = ModelConfig.from_size("xl")
    assert (c.d_model, c.num_heads, c.head_dim, c.num_segments) == (2048, 32, 64, 8)
    assert ModelConfig.from_size("small").inner_dim == 384
    assert c.encoder_max_image_len == 576 and c.decoder_max_image_len == 256 and c.vocab_size == 49536
    with pytest.raises(ValueError, match="unknown model size 'huge'.*small"):
        ModelConfig.from_size("huge")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ModelConfig.from_size("tiny", image_input_size=(100, 96))
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"d_modle": 3})


def test_model_config_json_round_trip(tmp_path):
    c = ModelConfig.from_size("tiny", text_vocab=1000, image_vocab=512, image_input_size=(64, 64))
    c.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == c
