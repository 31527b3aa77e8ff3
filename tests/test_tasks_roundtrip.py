"""Property tests: random ground truth -> encode -> a perfect generation (the target ids and the
target image itself, i.e. a perfect image-tokenizer stand-in) -> decode -> the ground truth back
within quantization: boxes and points within one location bin, depth within one grey level,
normals within a few degrees, masks at IoU >= 0.95, text exactly."""
from __future__ import annotations

import numpy as np
import pytest

from uio.processing import Processor
from uio.tasks import TASKS, get_task
from uio.tasks.pretraining import corrupt_spans, fill_spans, random_spans_noise_mask, split_spans

from _task_examples import blob_masks, make_example
from uio.tasks.colors import COLOR_RGB

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    return Processor(text_tokenizer)


def roundtrip(name, processor, seed, hw=(96, 128), train=False, **kw):
    rng = np.random.default_rng(seed)
    ex = make_example(name, rng, hw=hw, **kw)
    task = get_task(name)
    s = task.encode(ex, processor, rng, train=train)
    pred = task.decode(s["text_targets"], s["image_target"], s["meta"], processor)
    return ex, s, pred


def small_processor(processor):
    return Processor(processor.text_tokenizer, image_input_size=(32, 32), image_target_size=(32, 32),
                     image_target_grid=(2, 2))


def one_bin(hw) -> float:
    return max(hw) / 999.0  # a location bin in pixels


def iou(a, b) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


# ---- sparse ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("hw", [(96, 128), (300, 200)])
def test_detection_roundtrip(processor, seed, hw):
    ex, s, pred = roundtrip("detection", processor, seed, hw)
    gt = np.asarray(ex["boxes"])
    assert pred["labels"] == ex["labels"]
    assert np.abs(pred["boxes"] - gt).max() <= one_bin(hw)
    assert pred["scores"].shape == (len(gt),) and np.all(np.diff(pred["scores"]) < 0)
    # training order is random but the same set of objects
    ex, s, pred = roundtrip("detection", processor, seed, hw, train=True)
    got = sorted(zip(pred["labels"], pred["boxes"].round(-1).tolist()))
    want = sorted(zip(ex["labels"], np.asarray(ex["boxes"]).round(-1).tolist()))
    assert [g[0] for g in got] == [w[0] for w in want]


def test_detection_training_order_is_randomised(processor):
    rng = np.random.default_rng(0)
    ex = make_example("detection", rng, boxes=[[i, i, i + 5, i + 5] for i in range(0, 60, 10)],
                      labels=[f"red {s}" for s in ["cube", "sphere", "cone", "cylinder", "cube", "cone"]])
    task = get_task("detection")
    firsts = {tuple(task.decode(task.encode(ex, processor, np.random.default_rng(k), train=True)["text_targets"],
                                None, {"image_hw": (96, 128)}, processor)["boxes"][0].round()) for k in range(12)}
    assert len(firsts) > 2


@pytest.mark.parametrize("seed", SEEDS + [3, 4])
def test_object_localization_roundtrip(processor, seed):
    ex, s, pred = roundtrip("object_localization", processor, seed)
    gt = np.asarray(ex["boxes"]).reshape(-1, 4)
    assert pred["boxes"].shape == gt.shape and pred["labels"] == [ex["label"]] * len(gt)
    if len(gt):
        assert np.abs(pred["boxes"] - gt).max() <= one_bin((96, 128))
    else:  # an absent class: the target is EOS alone and decodes to no box
        assert s["text_targets"] == [processor.vocab.eos_id]


@pytest.mark.parametrize("seed", SEEDS)
def test_referring_expression_roundtrip(processor, seed):
    ex, s, pred = roundtrip("referring_expression", processor, seed, hw=(200, 150))
    assert len(s["text_targets"]) == 5 and pred["boxes"].shape == (1, 4)
    assert np.abs(pred["boxes"][0] - ex["box"]).max() <= one_bin((200, 150))


@pytest.mark.parametrize("seed", SEEDS)
def test_keypoints_roundtrip(processor, seed):
    ex, s, pred = roundtrip("keypoints", processor, seed, hw=(240, 180))
    gt = np.asarray(ex["keypoints"])
    kp = pred["keypoints"]
    assert kp.shape == (17, 3) and pred["valid"]
    np.testing.assert_array_equal(kp[:, 2], gt[:, 2])
    vis = gt[:, 2] > 0
    assert np.abs(kp[vis, :2] - gt[vis, :2]).max() <= one_bin((240, 180))
    # invisible joints carry two "no coordinates" tokens and get the mean of the others
    from uio.tasks import no_coordinates_id

    assert s["text_targets"].count(no_coordinates_id(processor.vocab)) == 2 * int((~vis).sum())
    if (~vis).any() and vis.any():
        np.testing.assert_allclose(kp[~vis, :2], np.broadcast_to(kp[vis, :2].mean(0), ((~vis).sum(), 2)))


# ---- dense ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS + [3])
@pytest.mark.parametrize("hw", [(192, 256), (120, 90)])
def test_object_segmentation_roundtrip(processor, seed, hw):
    ex, s, pred = roundtrip("object_segmentation", processor, seed, hw)
    gt = ex["masks"]
    assert len(pred["masks"]) == len(gt)
    assert pred["colors"] == s["meta"]["colors"]  # the colours named in the text, in order
    for m, g in zip(pred["masks"], gt):
        assert m.shape == hw and iou(m, g) >= 0.95


def test_object_segmentation_decoding_clusters_noisy_colours(processor):
    """VQ-GAN-like colour noise and stray pixels: clustering and the 8-pixel rule clean them up."""
    rng = np.random.default_rng(0)
    ex = make_example("object_segmentation", rng, hw=(192, 256), masks=blob_masks(rng, (192, 256), 3))
    task = get_task("object_segmentation")
    s = task.encode(ex, processor, rng, train=True)  # random colours
    colors = s["meta"]["colors"]
    img = s["image_target"] + rng.normal(0, 0.12, s["image_target"].shape).astype(np.float32)
    specks = rng.integers(0, 192, (40, 2)) * np.array([1, 1])
    spare = next(c for c in ("red", "lime", "blue", "yellow") if c not in colors)
    rgb = np.array(COLOR_RGB[spare]) / 127.5 - 1
    img[:, specks[:, 0], specks[:, 1]] = rgb[:, None]  # isolated pixels of an unused colour
    pred = task.decode([processor.vocab.eos_id], img, s["meta"], processor)  # no colour names: whole palette
    assert sorted(pred["colors"]) == sorted(colors)  # the specks (1-pixel components) are gone
    found = dict(zip(pred["colors"], pred["masks"]))
    for c, g in zip(colors, ex["masks"]):
        assert iou(found[c], g) >= 0.95


@pytest.mark.parametrize("seed", SEEDS)
def test_depth_roundtrip_within_one_grey_level(processor, seed):
    ex, s, pred = roundtrip("depth", processor, seed, hw=(192, 256))  # longest side 256: no resampling
    gt, md = ex["depth"], ex["max_depth"]
    valid = gt > 0
    assert pred["depth"].shape == gt.shape and s["meta"]["max_depth"] == md
    assert np.abs(pred["depth"] - gt)[valid].max() <= md / 255
    # through a uint8 image (what a real image decoder gives): still within one grey level
    img8 = np.round((s["image_target"] + 1) / 2 * 255) / 255 * 2 - 1
    d8 = get_task("depth").decode([1], img8, s["meta"], processor)["depth"]
    assert np.abs(d8 - gt)[valid].max() <= md / 255 * 0.5 + 1e-4


@pytest.mark.parametrize("hw", [(120, 90), (400, 300)])
def test_depth_roundtrip_with_resampling(processor, hw):
    ex, s, pred = roundtrip("depth", processor, 0, hw)
    gt, md = ex["depth"], ex["max_depth"]
    valid = gt > 0
    err = np.abs(pred["depth"] - gt)[valid] / md * 255  # grey levels (resampling blurs the 5% holes in)
    assert np.median(err) <= 1.5 and np.mean(err) < 3.0


def test_depth_max_depth_is_per_example_and_configurable(processor):
    rng = np.random.default_rng(0)
    ex = make_example("depth", rng, hw=(64, 64))
    ex.pop("max_depth")
    ex["depth"] = np.clip(ex["depth"], 0, 9.0)
    s = get_task("depth").encode(ex, processor, rng)
    assert s["meta"]["max_depth"] == 10.0
    s80 = get_task("depth").replace(max_depth=80.0).encode(ex, processor, rng)
    assert s80["meta"]["max_depth"] == 80.0
    assert np.abs((s80["image_target"] + 1) - (s["image_target"] + 1) / 8).max() < 1e-5


def _angles(a, b):
    cos = np.clip((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1), -1, 1)
    return np.degrees(np.arccos(cos))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("hw", [(256, 200), (100, 140)])
def test_surface_normals_roundtrip(processor, seed, hw):
    ex, s, pred = roundtrip("surface_normals", processor, seed, hw)
    n = pred["normals"]
    assert n.shape == (*hw, 3)
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-4)
    ang = _angles(n, ex["normals"])[ex["valid"]]
    if max(hw) == 256:
        assert ang.max() < 0.5
        img8 = np.round((s["image_target"] + 1) / 2 * 255) / 255 * 2 - 1  # 8-bit colours: a few degrees at most
        n8 = get_task("surface_normals").decode([1], img8, s["meta"], processor)["normals"]
        assert _angles(n8, ex["normals"])[ex["valid"]].max() < 3.0
    else:
        assert np.median(ang) < 3.0


# ---- image synthesis -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["image_generation", "image_inpainting", "segmentation_to_image",
                                  "masked_image_denoising"])
@pytest.mark.parametrize("hw", [(192, 256), (90, 120)])
def test_image_output_roundtrip(processor, name, hw):
    ex, s, pred = roundtrip(name, processor, 0, hw)
    gt = get_task(name).targets_for_metrics(s["meta"])["image"]
    np.testing.assert_array_equal(gt, ex["image"])
    assert pred["image"].dtype == np.uint8 and pred["image"].shape == (*hw, 3)
    diff = np.abs(pred["image"].astype(int) - ex["image"].astype(int))
    assert diff.max() <= 1 if max(hw) == 256 else diff.mean() < 4


def test_inpainting_hides_the_region_and_names_it(processor):
    ex, s, _ = roundtrip("image_inpainting", processor, 1, (192, 384))
    grid = s["image_input_mask"].reshape(24, 24)
    x1, y1, x2, y2 = ex["box"]
    inside = grid[int(y1 // 16) : int(np.ceil(y2 / 16)), int(x1 // 16) : int(np.ceil(x2 / 16))]
    assert inside.size and not inside.any()
    assert grid[:12].sum() == 12 * 24 - inside.size
    assert s["meta"]["prompt"].endswith(f' {ex["label"]} " ?')


def test_segmentation_to_image_paints_the_named_colours(processor):
    from uio.processing import denormalize
    from uio.tasks.colors import COLOR_RGB

    ex, s, _ = roundtrip("segmentation_to_image", processor, 2, (192, 384), train=True)
    img = denormalize(s["image_input"])
    for (label, color), seg in zip(s["meta"]["colors"], ex["segments"]):
        assert label == seg["label"] and f"{label} : {color}" in s["meta"]["prompt"]
        ys, xs = np.nonzero(seg["mask"])
        core = np.median(img[ys, xs], axis=0) * 255
        np.testing.assert_allclose(core, COLOR_RGB[color], atol=2)


def test_masked_image_denoising_hides_75_percent(processor):
    ex, s, pred = roundtrip("masked_image_denoising", processor, 0, (384, 384))
    assert s["image_input_mask"].sum() == 144 and s["image_target_mask"].all()
    ex, s, _ = roundtrip("masked_image_denoising", processor, 0, (192, 384))  # 288 real patches
    assert s["image_input_mask"].sum() == 72
    assert s["meta"]["prompt"] == "What is the complete image ?"
    rng = np.random.default_rng(0)
    ex = make_example("masked_image_denoising", rng, hw=(16, 16), caption="a red cube")
    task = get_task("masked_image_denoising")
    small = small_processor(processor)
    prompts = [task.encode(ex, small, np.random.default_rng(k), train=True)["meta"]["prompt"] for k in range(200)]
    with_text = sum(p == 'What is the complete image? Text: " a red cube " .' for p in prompts)
    assert 160 <= with_text <= 196  # text dropped ~10% of the time


# ---- text outputs -----------------------------------------------------------------------------------------
TEXT_FIELD = {
    "image_classification": ("label", "label"), "region_classification": ("label", "label"),
    "image_captioning": ("text", "captions"), "region_captioning": ("text", "caption"),
    "relationship": ("predicate", "predicate"), "text_classification": ("label", "label"),
    "summarization": ("text", "summary"),
}


@pytest.mark.parametrize("name", sorted(TEXT_FIELD))
@pytest.mark.parametrize("seed", SEEDS)
def test_text_roundtrip(processor, name, seed):
    ex, s, pred = roundtrip(name, processor, seed)
    key, src = TEXT_FIELD[name]
    want = ex[src][0] if isinstance(ex[src], list) else ex[src]
    assert pred[key] == want
    gt = get_task(name).targets_for_metrics(s["meta"])
    assert set(gt) >= {"label"} or set(gt) & {"captions", "summary", "predicate"}


@pytest.mark.parametrize("seed", SEEDS)
def test_vqa_roundtrip_uses_the_most_frequent_answer(processor, seed):
    ex, s, pred = roundtrip("vqa", processor, seed)
    counts = {a: ex["answers"].count(a) for a in ex["answers"]}
    assert counts[pred["answer"]] == max(counts.values())
    assert get_task("vqa").targets_for_metrics(s["meta"]) == {"answers": ex["answers"]}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("hw", [(192, 256), (90, 130)])
def test_grounded_vqa_roundtrip(processor, seed, hw):
    ex, s, pred = roundtrip("grounded_vqa", processor, seed, hw)
    assert pred["answer"] in ex["answers"] and len(pred["masks"]) == 1
    assert iou(pred["masks"][0], ex["mask"]) >= 0.95


@pytest.mark.parametrize("seed", SEEDS)
def test_question_answering_roundtrip(processor, seed):
    ex, s, pred = roundtrip("question_answering", processor, seed)
    assert pred["answer"] == ex["answers"][0] and s["meta"]["num_windows"] == 1


def test_question_answering_sliding_windows(processor):
    p = Processor(processor.text_tokenizer, max_input_len=48)
    task = get_task("question_answering")
    rng = np.random.default_rng(4)
    ex = make_example("question_answering", rng, sentences=12)
    ctx = p.tokens(ex["context"])
    wins = task.windows(ex, p)
    assert len(wins) > 2 and all(len(w) <= 48 and w[-1] == p.vocab.eos_id for w in wins)
    tail = p.tokens(f"question: {ex['question']}") + [p.vocab.eos_id]
    head = p.tokens("context:")
    bodies = [w[len(head) : len(w) - len(tail)] for w in wins]
    assert all(w[-len(tail):] == tail for w in wins)  # the question is never truncated
    covered = set()
    for b in bodies:  # windows are contiguous slices that overlap and cover the whole context
        start = next(i for i in range(len(ctx)) if ctx[i : i + len(b)] == b)
        covered |= set(range(start, start + len(b)))
    assert covered == set(range(len(ctx)))
    for k in range(5):  # training picks a window that holds the answer
        s = task.encode(ex, p, np.random.default_rng(k), train=True)
        assert ex["answers"][0] in p.decode_text(s["text_inputs"])
    samples = task.encode_windows(ex, p)
    assert [x["text_inputs"] for x in samples] == wins and [x["meta"]["window"] for x in samples] == list(range(len(wins)))


# ---- span corruption ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_span_corruption_roundtrip(processor, seed):
    ex, s, pred = roundtrip("span_corruption", processor, seed, train=True, sentences=8)
    v = processor.vocab
    original = processor.tokens(ex["text"])
    rebuilt = fill_spans(s["text_inputs"], pred["span_ids"], v)
    assert rebuilt == original
    assert len(pred["spans"]) == len(pred["span_ids"]) >= 1
    assert s["text_inputs"].count(v.sentinel_id(0)) == 1 and s["text_targets"][0] == v.sentinel_id(0)


def test_span_corruption_statistics():
    rng = np.random.default_rng(0)
    lengths, density = [], []
    for _ in range(200):
        m = random_spans_noise_mask(200, 0.15, 3.0, rng)
        density.append(m.mean())
        assert not m[0] and m[-1]  # starts with kept text, ends with a noise span
        edges = np.flatnonzero(np.diff(np.r_[0, m.astype(int), 0]))
        lengths += list(edges[1::2] - edges[::2])
    assert abs(np.mean(density) - 0.15) < 0.005 and abs(np.mean(lengths) - 3.0) < 0.2


def test_corrupt_and_split_spans_are_inverse(text_tokenizer):
    v = text_tokenizer.vocab
    ids = list(range(10, 30))
    noise = np.zeros(20, bool)
    noise[[3, 4, 10, 17, 18, 19]] = True
    inp, tgt = corrupt_spans(ids, noise, v)
    s0, s1, s2 = v.sentinel_id(0), v.sentinel_id(1), v.sentinel_id(2)
    assert inp == ids[:3] + [s0] + ids[5:10] + [s1] + ids[11:17] + [s2]
    assert tgt == [s0, 13, 14, s1, 20, s2, 27, 28, 29]
    assert fill_spans(inp, split_spans(tgt, v), v) == ids


def test_span_corruption_uses_the_image_90_percent_of_the_time(processor):
    rng = np.random.default_rng(0)
    ex = make_example("span_corruption", rng)
    ex["image"] = np.zeros((32, 32, 3), np.uint8)
    task = get_task("span_corruption")
    small = small_processor(processor)
    used = [task.encode(ex, small, np.random.default_rng(k), train=True)["image_input_mask"].any() for k in range(200)]
    assert 160 <= sum(used) <= 196
    assert task.encode(ex, processor, rng, train=False)["image_input_mask"].any()


# ---- metrics on perfect predictions --------------------------------------------------------------------------
METRIC_KEY = {
    "detection": ("detection_map", "map", 0.999), "object_localization": ("box_accuracy", "acc", 1.0),
    "referring_expression": ("box_accuracy", "acc", 1.0), "keypoints": ("keypoint_oks_ap", "ap", 0.9),
    "object_segmentation": ("mask_iou", "iou", 0.95), "depth": ("depth", "delta1", 0.99),
    "surface_normals": ("surface_normals", "pct_11.25", 99.0),
    "vqa": ("vqa_accuracy", "acc", 1.0), "image_captioning": ("captioning", "bleu4", 0.99),
    "image_classification": ("accuracy", "acc", 1.0), "relationship": ("relationship_accuracy", "acc", 1.0),
    "question_answering": ("squad", "em", 1.0), "summarization": ("rouge", "rougeL", 1.0),
    "grounded_vqa": ("grounded_vqa", "mask_iou", 0.95), "image_generation": ("image_similarity", "psnr", 40.0),
}


@pytest.mark.parametrize("name", sorted(METRIC_KEY))
def test_decoded_predictions_feed_the_task_metric(processor, name):
    """Decoded predictions and targets_for_metrics are in the formats uio.metrics expects."""
    metric_name, key, floor = METRIC_KEY[name]
    task = get_task(name)
    assert metric_name in task.metrics
    metric = task.build_metrics()[metric_name]
    preds, targets = [], []
    for seed in range(3):
        _, s, pred = roundtrip(name, processor, seed, hw=(192, 256))
        preds.append(pred)
        targets.append(task.targets_for_metrics(s["meta"]))
    metric.update(preds, targets)
    out = metric.compute()
    assert out[key] >= floor, out


def test_every_task_is_covered_by_a_roundtrip_test():
    import sys

    mod = sys.modules[__name__]
    src = open(mod.__file__).read()
    for name in TASKS:
        assert f'"{name}"' in src, name
