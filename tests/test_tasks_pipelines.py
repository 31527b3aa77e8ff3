"""Two-step keypoints and sliding-window QA, run end to end with a tiny randomly initialised model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from uio.config import ModelConfig
from uio.data.collate import collate
from uio.processing import Processor
from uio.tasks import get_task
from uio.tasks.pipelines import answer_with_windows, keypoints_two_step

from _task_examples import make_example, smooth_image


@pytest.fixture(scope="module")
def tiny(text_tokenizer):
    from uio.model import Model

    torch.manual_seed(0)
    cfg = ModelConfig.from_size("tiny", text_vocab=text_tokenizer.vocab.text_vocab, image_vocab=256,
                                image_input_size=(64, 64), image_target_grid=(4, 4), image_target_size=(64, 64),
                                encoder_max_text_len=48, decoder_max_text_len=128, num_encoder_layers=2,
                                num_decoder_layers=2)
    model = Model(cfg).eval()
    return model, Processor.from_config(cfg, text_tokenizer)


def test_keypoints_two_step(tiny):
    model, proc = tiny
    image = smooth_image(np.random.default_rng(0), (60, 80))
    fast = dict(loc_kwargs={"max_text_len": 12, "method": "sample"}, kp_kwargs={"max_text_len": 24})
    out = keypoints_two_step(model, image, proc, max_people=2, generator=torch.Generator().manual_seed(0), **fast)
    k = len(out["boxes"])
    assert 1 <= k <= 2 and out["keypoints"].shape == (k, 17, 3) and out["scores"].shape == (k,)
    assert np.all(np.diff(out["scores"]) < 0)
    assert (out["boxes"][:, [0, 2]] <= 80).all() and (out["boxes"][:, [1, 3]] <= 60).all()
    xy = out["keypoints"][..., :2]
    assert (xy >= 0).all() and (xy[..., 0] <= 80).all() and (xy[..., 1] <= 60).all()
    assert set(np.unique(out["keypoints"][..., 2])) <= {0, 1, 2}
    # the second step asked for the joints of exactly the localized boxes
    kp = get_task("keypoints")
    s = kp.encode({"image": image, "box": out["boxes"][0], "keypoints": [[0, 0, 0]] * 17}, proc)
    assert s["meta"]["prompt"].endswith(f'" {proc.region_text(out["boxes"][0], (60, 80))} " .')


def test_answer_with_windows_keeps_the_most_confident_window(tiny):
    model, proc = tiny
    ex = make_example("question_answering", np.random.default_rng(1), sentences=10)
    task = get_task("question_answering")
    wins = task.windows(ex, proc)
    assert len(wins) > 1
    out = answer_with_windows(model, ex, proc, batch_size=2, max_text_len=8)
    assert len(out["answers"]) == len(out["scores"]) == len(wins)
    ranked = sorted(range(len(wins)), key=lambda i: (bool(out["answers"][i]), out["scores"][i]))
    assert out["window"] == ranked[-1] and out["answer"] == out["answers"][ranked[-1]]
    # the per-window answers are what generation on that window alone gives
    kw = {**task.generation_config.to_kwargs(), "max_text_len": 8}
    w = out["window"]
    gen = model.generate(collate([task.encode_windows(ex, proc)[w]], proc.max_input_len), **kw)
    assert task.decode(gen.text_tokens[0], None, {}, proc)["answer"] == out["answer"]
