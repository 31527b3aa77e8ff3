import pytest

from uio.text_tokenizer import TextTokenizer


def test_special_ids_and_eos(text_tokenizer):
    ids = text_tokenizer.encode("a red cube")
    assert ids[-1] == 1 and 0 not in ids
    assert text_tokenizer.encode("") == [1]
    assert text_tokenizer.decode(ids) == "a red cube"


def test_extra_ids_map_to_unified_layout(text_tokenizer):
    v = text_tokenizer.vocab
    ids = text_tokenizer.encode("box <extra_id_100> <extra_id_1099> then <extra_id_0>", add_eos=False)
    assert v.loc_id(0) in ids and v.loc_id(999) in ids and v.sentinel_id(0) in ids
    text = text_tokenizer.decode(ids)
    assert "<extra_id_100>" in text and "<extra_id_1099>" in text and "<extra_id_0>" in text


def test_decode_drops_pad_and_image_ids_and_stops_at_eos(text_tokenizer):
    v = text_tokenizer.vocab
    ids = text_tokenizer.encode("red cube", add_eos=False)
    assert text_tokenizer.decode([0] + ids + [v.image_id(3), 1] + ids) == "red cube"


def test_truncation_keeps_eos(text_tokenizer):
    ids = text_tokenizer.encode("a red cube is left of the blue sphere", max_length=4)
    assert len(ids) == 4 and ids[-1] == 1


def test_save_and_reload(tmp_path, text_tokenizer):
    text_tokenizer.save(tmp_path)
    tok = TextTokenizer.from_dir(tmp_path)
    assert tok.encode("the green cone") == text_tokenizer.encode("the green cone")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        TextTokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="empty"):
        TextTokenizer.train([], tmp_path, vocab_size=100)
