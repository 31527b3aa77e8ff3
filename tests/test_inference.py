"""uio.Model task methods (uio.inference) and the plotting helpers, on a tiny random model.

A random model's answers are noise, so these tests check what must hold whatever the weights:
types, shapes, coordinates inside the input image, batching, persistence, dtype, clear errors.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from uio import plotting
from uio.config import ModelConfig
from uio.inference import (
    Classification, DepthMap, Detections, GroundedAnswer, NormalMap, Poses, Segmentation, as_image_batch,
    paste_region)

H, W = 40, 52  # a non-square input, smaller than nothing in particular
CANDS = ["cube", "sphere", "red cone"]


def tiny_model(text_tokenizer, seed: int = 0):
    from uio.image_tokenizer import build_image_tokenizer
    from uio.model import Model

    torch.manual_seed(seed)
    cfg = ModelConfig.from_size("tiny", text_vocab=text_tokenizer.vocab.text_vocab, d_model=64, num_heads=2,
                                head_dim=32, d_ff=128, num_encoder_layers=1, num_decoder_layers=1, image_vocab=64,
                                image_target_grid=(4, 4), image_target_size=(16, 16), image_input_size=(32, 32),
                                encoder_max_text_len=64, decoder_max_text_len=64)
    # a 16x16 VQ-GAN: 4x4 = 16 image tokens keep the image-output tasks quick
    image_tokenizer = build_image_tokenizer({"name": "vqgan", "config": "vqgan_test", "image_size": [16, 16]})
    return Model(cfg, image_tokenizer=image_tokenizer, text_tokenizer=text_tokenizer).eval()


@pytest.fixture(scope="module")
def model(text_tokenizer):
    return tiny_model(text_tokenizer)


def _image(seed: int, hw=(H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def _forms(seed: int, hw=(H, W)) -> dict[str, object]:
    """The same image as uint8 numpy, PIL, a float CHW tensor and a uint8 CHW tensor."""
    a = _image(seed, hw)
    return {"numpy": a, "pil": Image.fromarray(a), "tensor_float": torch.from_numpy(a).permute(2, 0, 1).float() / 255,
            "tensor_uint8": torch.from_numpy(a).permute(2, 0, 1).contiguous()}


FAST = {"max_text_len": 12}


def _in_image(xy: np.ndarray, hw) -> bool:
    h, w = hw
    return bool((xy[..., 0] >= 0).all() and (xy[..., 0] <= w).all() and (xy[..., 1] >= 0).all()
                and (xy[..., 1] <= h).all())


# each task method: (call on images, check one result for an image of size hw)
def _check_det(r, hw):
    assert isinstance(r, Detections) and r.image_size == hw
    assert r.boxes.shape == (len(r), 4) and r.boxes.dtype == np.float64 and len(r.labels) == len(r.scores) == len(r)
    assert _in_image(r.boxes.reshape(-1, 2, 2), hw) and (r.boxes[:, 2] >= r.boxes[:, 0]).all()
    assert all(isinstance(s, str) for s in r.labels) and ((r.scores > 0) & (r.scores <= 1)).all()


def _check_poses(r, hw):
    assert isinstance(r, Poses) and r.keypoints.shape == (len(r), 17, 3) and r.boxes.shape == (len(r), 4)
    assert r.scores.shape == (len(r),) and _in_image(r.keypoints[..., :2], hw)
    assert set(np.unique(r.keypoints[..., 2])) <= {0.0, 1.0, 2.0} and len(Poses.JOINTS) == 17


def _check_seg(r, hw):
    assert isinstance(r, Segmentation) and r.masks.dtype == bool and r.masks.shape == (len(r), *hw)
    assert r.mask.shape == hw and len(r.labels) == len(r.colors) == len(r)


def _check_depth(r, hw):
    assert isinstance(r, DepthMap) and r.depth.shape == hw and r.depth.dtype == np.float32
    assert r.depth.min() >= 0 and r.depth.max() <= r.max_depth + 1e-4 and r.image.size == (hw[1], hw[0])


def _check_normals(r, hw):
    assert isinstance(r, NormalMap) and r.normals.shape == (*hw, 3) and r.normals.dtype == np.float32
    norm = np.linalg.norm(r.normals, axis=-1)
    assert np.all((np.abs(norm - 1) < 1e-4) | (norm == 0))


def _check_pil(r, hw):
    assert isinstance(r, Image.Image) and r.mode == "RGB" and r.size == (hw[1], hw[0])


def _check_cls(r, hw):
    assert isinstance(r, Classification) and r.label in CANDS and list(r.scores) == CANDS
    assert r.label == max(r.scores, key=r.scores.get) and abs(sum(r.probabilities.values()) - 1) < 1e-9


def _check_str(r, hw):
    assert isinstance(r, str)


def _check_grounded(r, hw):
    assert isinstance(r, GroundedAnswer) and isinstance(r.answer, str) and r.mask.shape == hw and r.mask.dtype == bool


BOX = [4.0, 6.0, 30.0, 35.0]
METHODS = {
    "caption": (lambda m, x: m.caption(x, **FAST), _check_str),
    "vqa": (lambda m, x: m.vqa(x, "what color is the cube ?", **FAST), _check_str),
    "region_caption": (lambda m, x: m.region_caption(x, BOX, **FAST), _check_str),
    "relationship": (lambda m, x: m.relationship(x, BOX, [15, 2, 29, 30], "cube", "sphere", **FAST), _check_str),
    "grounded_vqa": (lambda m, x: m.grounded_vqa(x, "where is the cube ?", seed=0, **FAST), _check_grounded),
    "classify": (lambda m, x: m.classify(x, CANDS), _check_cls),
    "region_classify": (lambda m, x: m.region_classify(x, BOX, CANDS), _check_cls),
    "detect": (lambda m, x: m.detect(x, max_text_len=25), _check_det),
    "locate": (lambda m, x: m.locate(x, "cube", max_text_len=25), _check_det),
    "refer": (lambda m, x: m.refer(x, "the cube on the left"), _check_det),
    "keypoints_box": (lambda m, x: m.keypoints(x, box=BOX, seed=0, max_text_len=30), _check_poses),
    "keypoints_two_step": (lambda m, x: m.keypoints(x, seed=0, max_people=2, max_text_len=20), _check_poses),
    "segment": (lambda m, x: m.segment(x, "cube", seed=0, **FAST), _check_seg),
    "depth": (lambda m, x: m.depth(x, max_depth=80.0, seed=0), _check_depth),
    "surface_normals": (lambda m, x: m.surface_normals(x, seed=0), _check_normals),
    "inpaint": (lambda m, x: m.inpaint(x, BOX, "cube", seed=0), _check_pil),
}
# which input forms the single call uses / the batch mixes (every form is covered)
SINGLE_FORM = dict(zip(METHODS, ["numpy", "pil", "tensor_float", "tensor_uint8"] * 4))


@pytest.mark.parametrize("name", list(METHODS))
def test_task_method_single_and_batched(model, name):
    call, check = METHODS[name]
    single = call(model, _forms(1)[SINGLE_FORM[name]])
    check(single, (H, W))
    # a batch of two different sizes and types -> a list, one well-formed result per image
    other_hw = (36, 30)
    batch = [_forms(2)["pil"], _forms(3, other_hw)["tensor_float"]]
    out = call(model, batch)
    assert isinstance(out, list) and len(out) == 2
    check(out[0], (H, W))
    check(out[1], other_hw)


def test_numpy_and_tensor_batches_equal_lists(model):
    imgs = [_image(4), _image(5)]
    as_list = model.refer(imgs, "the cube")
    as_np = model.refer(np.stack(imgs), "the cube")
    as_t = model.refer(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2), "the cube")
    for a, b, c in zip(as_list, as_np, as_t):
        np.testing.assert_allclose(a.boxes, b.boxes)
        np.testing.assert_allclose(a.boxes, c.boxes)


def test_batched_equals_one_by_one(model):
    imgs = [_image(6), _image(7, (30, 60)), _image(8)]
    qs = ["what color is the cube ?", "how many cones ?", "is there a sphere ?"]
    batched = model.vqa(imgs, qs, **FAST)
    assert batched == [model.vqa(im, q, **FAST) for im, q in zip(imgs, qs)]
    scores = model.classify(imgs, CANDS, batch_size=2)  # chunked
    for im, s in zip(imgs, scores):
        one = model.classify(im, CANDS)
        assert one.label == s.label
        np.testing.assert_allclose(list(one.scores.values()), list(s.scores.values()), rtol=1e-4, atol=1e-4)


def test_text_methods(model):
    assert isinstance(model.summarize("the red cube is left of the blue sphere .", **FAST), str)
    out = model.summarize(["a red cube .", "two blue spheres ."], **FAST)
    assert isinstance(out, list) and len(out) == 2
    c = model.classify_text("a red cube is here .", ["yes", "no"], text_pair="there is a cube .", dataset="mnli")
    assert isinstance(c, Classification) and c.label in ("yes", "no")
    cs = model.classify_text(["a .", "b ."], ["yes", "no"])
    assert [x.label for x in cs] == [x.label for x in (model.classify_text("a .", ["yes", "no"]),
                                                       model.classify_text("b .", ["yes", "no"]))]
    long_context = " ".join(f"the cube number {i} is red ." for i in range(40))  # longer than the encoder
    assert isinstance(model.answer_question(long_context, "what color is the cube ?", **FAST), str)
    assert len(model.answer_question(["the cube is red .", "the cone is blue ."], "what color ?", **FAST)) == 2


def test_generate_image(model):
    img = model.generate_image("a red cube on a gray floor", seed=0)
    assert isinstance(img, Image.Image) and img.size == (16, 16)  # the image tokenizer's size by default
    imgs = model.generate_image(["a red cube", "a blue cone"], size=(20, 30), seed=0)
    assert [i.size for i in imgs] == [(30, 20), (30, 20)]
    again = model.generate_image("a red cube on a gray floor", seed=0)
    assert np.array_equal(np.asarray(img), np.asarray(again))  # seeded sampling is reproducible


def test_num_samples_returns_the_pixel_mean_of_that_many_samples(model):
    from uio.tasks import get_task

    img = _image(3)
    sample = get_task("depth").encode({"image": img, "depth": np.ones((H, W), np.float32)}, model.processor,
                                      np.random.default_rng(0), train=False)
    batch = model.batch_inputs([sample, sample])
    kw = dict(max_text_len=1, image_output=True, method="sample")
    g = torch.Generator().manual_seed(0)
    one_by_one = [model.generate(batch, generator=g, **kw) for _ in range(3)]
    mean = model.generate(batch, generator=torch.Generator().manual_seed(0), num_samples=3, **kw)
    torch.testing.assert_close(mean.images, sum(o.images for o in one_by_one) / 3)
    assert torch.equal(mean.image_codes, one_by_one[0].image_codes)
    assert not torch.equal(one_by_one[0].image_codes, one_by_one[1].image_codes)  # the samples differ
    d1, d3 = model.depth(img, seed=0), model.depth(img, seed=0, num_samples=3)
    assert d3.depth.shape == d1.depth.shape and not np.array_equal(d3.depth, d1.depth)
    n3 = model.surface_normals(img, seed=0, num_samples=3).normals
    assert np.allclose(np.linalg.norm(n3, axis=-1)[np.linalg.norm(n3, axis=-1) > 0], 1, atol=1e-4)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        model.depth(img, num_samples=0)
    with pytest.raises(ValueError, match="needs image_output=True, method='sample' and no text output"):
        model.depth(img, num_samples=2, method="greedy")
    with pytest.raises(ValueError, match="needs image_output=True"):
        model.caption(img, num_samples=2)


def test_inpaint_paste_keeps_known_pixels(model):
    a = _image(9)
    out = np.asarray(model.inpaint(a, BOX, "cube", seed=0))
    x1, y1, x2, y2 = (int(v) for v in BOX)
    outside = np.ones((H, W), bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], a[outside])
    whole = np.asarray(model.inpaint(a, BOX, "cube", seed=0, paste=False))
    assert np.array_equal(whole[~outside], out[~outside]) and not np.array_equal(whole[outside], a[outside])


def test_paste_region():
    gen, orig = np.full((4, 5, 3), 200, np.uint8), np.zeros((4, 5, 3), np.uint8)
    out = paste_region(gen, orig, [1.2, 0.5, 3.0, 2.0])  # rounded outwards: cols 1..2, rows 0..1
    expect = np.zeros((4, 5), bool)
    expect[0:2, 1:3] = True
    assert np.array_equal(out[..., 0] == 200, expect)


def test_save_load_gives_identical_outputs(model, tmp_path):
    from uio.model import Model

    model.save_pretrained(tmp_path / "m")
    loaded = Model.from_pretrained(tmp_path / "m").eval()
    img = _image(10)
    assert loaded.caption(img, **FAST) == model.caption(img, **FAST)
    np.testing.assert_array_equal(loaded.detect(img, max_text_len=25).boxes, model.detect(img, max_text_len=25).boxes)
    np.testing.assert_array_equal(loaded.depth(img, seed=3).depth, model.depth(img, seed=3).depth)
    np.testing.assert_array_equal(loaded.segment(img, "cube", seed=3).masks, model.segment(img, "cube", seed=3).masks)
    assert loaded.classify(img, CANDS).scores == model.classify(img, CANDS).scores
    assert np.array_equal(np.asarray(loaded.generate_image("a cube", seed=1)),
                          np.asarray(model.generate_image("a cube", seed=1)))


def test_to_dtype_and_device(model):
    m = copy.deepcopy(model).to("cpu", torch.bfloat16)
    assert m.network.token_embedder.weight.dtype == torch.bfloat16
    img = _image(11)
    _check_det(m.detect(img, max_text_len=13), (H, W))
    _check_depth(m.depth(img, seed=0), (H, W))
    _check_cls(m.classify(img, CANDS), (H, W))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16(model):  # pragma: no cover - GPU only
    m = copy.deepcopy(model).to("cuda", torch.bfloat16)
    img = _image(12)
    _check_det(m.detect(img, max_text_len=25), (H, W))
    _check_depth(m.depth(img, seed=0), (H, W))


# ---- malformed inputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.caption("photo.jpg"), TypeError, "PIL image, a numpy array"),
    (lambda m: m.caption([]), ValueError, "empty"),
    (lambda m: m.caption([_image(0), "x"]), TypeError, r"images\[1\] must be a PIL image"),
    (lambda m: m.caption(np.zeros((10, 10, 5), np.uint8)), ValueError, r"\(H, W, 1\|3\|4\)"),
    (lambda m: m.caption([_image(0), np.zeros((8, 8, 2))]), ValueError, r"images\[1\]"),
    (lambda m: m.caption(np.full((8, 8, 3), 3.0)), ValueError, r"\[0, 1\]"),
    (lambda m: m.caption(np.zeros((2, 3, 8, 8, 3))), ValueError, "batch"),
    (lambda m: m.vqa([_image(0), _image(1)], ["a ?", "b ?", "c ?"]), ValueError, "3 question values for 2 image"),
    (lambda m: m.vqa(_image(0), ""), ValueError, "non-empty"),
    (lambda m: m.vqa(_image(0), 3), TypeError, "question must be a str"),
    (lambda m: m.region_caption(_image(0), [1, 2, 3]), ValueError, r"\[x1, y1, x2, y2\]"),
    (lambda m: m.region_caption(_image(0), [10, 2, 5, 8]), ValueError, "x1 < x2"),
    (lambda m: m.region_caption(_image(0), [0, 0, W + 10, 8]), ValueError, "outside"),
    (lambda m: m.region_caption([_image(0)] * 2, np.zeros((3, 4))), ValueError, r"\(2, 4\)"),
    (lambda m: m.classify(_image(0), []), ValueError, "non-empty list"),
    (lambda m: m.classify(_image(0), "cube"), ValueError, "list of label strings"),
    (lambda m: m.classify(_image(0), ["a", "a"]), ValueError, "duplicates"),
    (lambda m: m.caption(_image(0), beams=3), TypeError, "unknown generation option"),
    (lambda m: m.caption(_image(0), seed=1, generator=torch.Generator()), ValueError, "either seed"),
    (lambda m: m.caption(_image(0), batch_size=0), ValueError, "batch_size"),
    (lambda m: m.depth(_image(0), max_depth=-1), ValueError, "max_depth"),
    (lambda m: m.keypoints(_image(0), max_people=0), ValueError, "max_people"),
    (lambda m: m.generate_image(""), ValueError, "non-empty"),
    (lambda m: m.generate_image(["a", 3]), TypeError, r"prompt\[1\]"),
    (lambda m: m.generate_image("a", size=(0, 4)), ValueError, "size"),
    (lambda m: m.summarize([]), TypeError, "non-empty list"),
    (lambda m: m.caption(_image(0), max_text_len=500), ValueError, "decoder_max_text_len"),
])
def test_bad_input_errors(model, call, error, match):
    with pytest.raises(error, match=match):
        call(model)


def test_model_without_text_tokenizer_says_so(text_tokenizer):
    m = tiny_model(text_tokenizer)
    m.text_tokenizer = None
    with pytest.raises(ValueError, match="no text tokenizer"):
        m.caption(_image(0))


def test_as_image_batch_forms():
    a = _image(0)
    for x in (a, Image.fromarray(a), torch.from_numpy(a).permute(2, 0, 1), a[..., 0]):
        imgs, single = as_image_batch(x)
        assert single and len(imgs) == 1 and imgs[0].shape == (H, W, 3) and imgs[0].dtype == np.float32
    imgs, single = as_image_batch(np.stack([a, a]))
    assert not single and len(imgs) == 2
    np.testing.assert_allclose(imgs[0], a / 255.0, atol=1e-6)


def test_result_helpers():
    d = Detections(np.array([[1.0, 2.0, 5.0, 10.0]]), ["cube"], np.array([0.9]), (20, 20))
    assert d.to_coco(7, {"cube": 3}) == [{"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 4.0, 8.0], "score": 0.9}]
    p = Poses(np.zeros((2, 17, 3)), np.array([1.0, 0.5]), np.zeros((2, 4)), (20, 20))
    assert [len(e["keypoints"]) for e in p.to_coco(1)] == [51, 51]
    m = np.zeros((2, 4, 4), bool)
    m[0, 0, 0] = m[1, 3, 3] = True
    s = Segmentation(m, ["a", "a"], ["red", "blue"], (4, 4))
    assert s.mask.sum() == 2 and Segmentation(np.zeros((0, 4, 4), bool), [], [], (4, 4)).mask.shape == (4, 4)
    c = Classification("a", {"a": 0.0, "b": float(np.log(1 / 3))})
    assert c.top(1)[0][0] == "a" and abs(c.probabilities["a"] - 0.75) < 1e-12


# ---- plotting -------------------------------------------------------------------------------------
def test_plotting_draws_each_result(model):
    a = _image(13)
    blank = np.zeros((H, W, 3), np.uint8)
    boxes = plotting.draw_boxes(blank, [[2, 2, 20, 30]], ["cube"], [0.8])
    assert boxes.size[0] >= W and np.asarray(boxes).any()  # upscaled for legibility, and something was drawn
    kp = np.zeros((17, 3))
    kp[:, 0], kp[:, 1], kp[:, 2] = np.linspace(5, 40, 17), np.linspace(5, 30, 17), 2
    assert np.asarray(plotting.draw_keypoints(blank, kp)).any()
    mask = np.zeros((H, W), bool)
    mask[5:15, 5:15] = True
    drawn = np.asarray(plotting.draw_masks(blank, mask, min_side=1))
    assert drawn[10, 10].any() and not drawn[30, 40].any()
    depth = plotting.colorize_depth(np.linspace(0.1, 5, H * W).reshape(H, W), 5.0)
    assert depth.size == (W, H)
    n = np.zeros((H, W, 3), np.float32)
    n[..., 2] = 1
    assert np.asarray(plotting.colorize_normals(n))[0, 0].tolist() == [128, 128, 255]
    results = [model.detect(a, max_text_len=25), model.keypoints(a, box=BOX, seed=0, max_text_len=30), model.segment(a, "cube", seed=0),
               model.depth(a, seed=0), model.surface_normals(a, seed=0), model.grounded_vqa(a, "where ?", seed=0),
               model.inpaint(a, BOX, "cube", seed=0)]
    pics = [plotting.render(r, a) for r in results]
    assert all(isinstance(p, Image.Image) for p in pics)
    grid = plotting.image_grid(pics, ncols=4, size=64)
    assert grid.size == (4 * 68 + 4, 2 * 68 + 4)
    import matplotlib

    matplotlib.use("Agg")
    fig = plotting.show(results, image=a, titles=[str(i) for i in range(len(results))])
    assert len(fig.axes) == 8


def test_plotting_errors():
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        plotting.draw_boxes(_image(0), [[0, 0, 1, 1], [0, 0, 2, 2]], ["a"])
    with pytest.raises(ValueError, match=r"\(17, 3\)"):
        plotting.draw_keypoints(_image(0), np.zeros((17, 2)))
    with pytest.raises(ValueError, match="image size"):
        plotting.draw_masks(_image(0), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="needs the input image"):
        plotting.render(Detections(np.zeros((0, 4)), [], np.zeros(0), (2, 2)))
    with pytest.raises(TypeError, match="cannot render"):
        plotting.render("text")
