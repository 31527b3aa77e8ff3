"""Task registry, prompts, contract-2 samples, bad-input errors and malformed generations.

Round trips (random ground truth -> encode -> perfect generation -> decode) are in
tests/test_tasks_roundtrip.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from uio.processing import Processor
from uio.tasks import GROUPS, TASKS, get_task, list_tasks, no_coordinates_id
from uio.tasks.base import clean_tokens, parse_located

from _task_examples import make_example

ALL = [
    "image_generation", "image_inpainting", "segmentation_to_image", "detection", "object_localization",
    "referring_expression", "keypoints", "object_segmentation", "depth", "surface_normals",
    "image_classification", "region_classification", "image_captioning", "region_captioning", "vqa",
    "relationship", "grounded_vqa", "text_classification", "question_answering", "summarization",
    "span_corruption", "masked_image_denoising",
]
TEXT_ONLY = {"text_classification", "question_answering", "summarization", "span_corruption"}
IMAGE_OUT = {"image_generation", "image_inpainting", "segmentation_to_image", "object_segmentation", "depth",
             "surface_normals", "grounded_vqa", "masked_image_denoising"}


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    return Processor(text_tokenizer)


# ---- registry ----------------------------------------------------------------------------------------
def test_registry_has_every_task_with_its_paper_group():
    assert sorted(TASKS) == sorted(ALL)
    groups = {n: t.group for n, t in TASKS.items()}
    assert {g for g in groups.values()} == set(GROUPS)
    assert groups["masked_image_denoising"] == "pretraining" and groups["span_corruption"] == "language_modelling"
    assert groups["keypoints"] == "sparse_labelling" and groups["depth"] == "dense_labelling"
    assert groups["region_classification"] == "image_classification"
    assert groups["grounded_vqa"] == "vision_language" and groups["summarization"] == "nlp"
    assert set(list_tasks("image_synthesis")) == {"image_generation", "image_inpainting", "segmentation_to_image"}
    for t in TASKS.values():
        assert t.prompts and t.output and t.output_format and isinstance(t.metrics, tuple)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'nope'.*depth.*vqa"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown task group"):
        list_tasks("vision")
    assert get_task("depth") is TASKS["depth"]


def test_uio_exports_tasks_and_get_task():
    import uio

    assert uio.get_task("vqa") is TASKS["vqa"] and uio.tasks.TASKS is TASKS


def test_metric_names_exist():
    from uio.metrics import METRICS

    for t in TASKS.values():
        assert set(t.metrics) <= set(METRICS), t.name
    assert not TASKS["span_corruption"].metrics  # trained on loss only


def test_replace_overrides_a_task_setting():
    d = get_task("depth").replace(max_depth=80.0)
    assert d.max_depth == 80.0 and get_task("depth").max_depth == 10.0
    with pytest.raises(AttributeError):
        get_task("depth").replace(nope=1)


# ---- prompts ------------------------------------------------------------------------------------------
ORIGINAL_PROMPTS = {
    "image_captioning": "What does the image describe ?",
    "depth": "What is the depth map of the image ?",
    "surface_normals": "What is the surface normal of the image ?",
    "object_segmentation": 'What is the segmentation of " {} " ?',
    "image_generation": 'What is the complete image? Text: " {} " .',
    "referring_expression": 'Which region does the text " {} " describe ?',
    "object_localization": 'Which region does the text " {} " describe ?',
    "region_captioning": 'What does the region " {} " describe ?',
    "region_classification": 'What is the category of region " {} " ?',
    "image_classification": "What is this in the image ?",
    "image_inpainting": 'Filling the blank region " {} " ?',
    "keypoints": 'Find the human joints in the region " {} " .',
    "segmentation_to_image": 'What is the complete image? Segmentation color: " {} "',
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_PROMPTS))
def test_first_prompt_is_the_original_string(name):
    assert get_task(name).prompts[0] == ORIGINAL_PROMPTS[name]


def test_eval_prompts_are_filled_like_the_original(processor):
    rng = np.random.default_rng(0)
    v = processor.vocab

    def prompt(name, **kw):
        ex = make_example(name, rng, hw=(120, 160), **kw)
        s = get_task(name).encode(ex, processor, rng, train=False)
        assert s["text_inputs"] == processor.encode_text(s["meta"]["prompt"])
        return ex, s["meta"]["prompt"]

    ex, p = prompt("vqa")
    assert p == ex["question"].lower() and p != ex["question"]
    ex, p = prompt("image_generation")
    assert p == f'What is the complete image? Text: " {ex["caption"]} " .'
    ex, p = prompt("object_localization")
    assert p == f'Which region does the text " {ex["label"]} " describe ?'
    ex, p = prompt("image_inpainting")
    loc = " ".join(f"<extra_id_{100 + b}>" for b in v.quantize(np.asarray(ex["box"])[[1, 0, 3, 2]], 160))
    assert p == f'Filling the blank region " {loc} {ex["label"]} " ?'
    ex, p = prompt("keypoints")
    loc = " ".join(f"<extra_id_{100 + b}>" for b in v.quantize(np.asarray(ex["box"])[[1, 0, 3, 2]], 160))
    assert p == f'Find the human joints in the region " {loc} " .'
    ex, p = prompt("segmentation_to_image")
    pairs = " , ".join(f"{s['label']} : {c}" for s, c in zip(ex["segments"], ["red", "lime", "blue", "white"]))
    assert p == f'What is the complete image? Segmentation color: " {pairs} "'
    ex, p = prompt("summarization")
    assert p == f"{ex['text']} question: What is a short summary of this document ?"
    ex, p = prompt("question_answering")
    assert p.startswith("context:") and p.endswith(f"question: {ex['question']}")


def test_training_picks_paraphrases_with_the_rng(processor):
    task = get_task("image_captioning")
    ex = make_example("image_captioning", np.random.default_rng(0), hw=(32, 32))
    seen = {task.encode(ex, processor, np.random.default_rng(s), train=True)["meta"]["prompt"] for s in range(30)}
    assert seen == set(task.prompts)
    again = task.encode(ex, processor, np.random.default_rng(7), train=True)["meta"]["prompt"]
    assert again == task.encode(ex, processor, np.random.default_rng(7), train=True)["meta"]["prompt"]


# ---- contract 2 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("train", [False, True])
def test_encoded_sample_follows_contract_2(processor, name, train):
    rng = np.random.default_rng(1)
    s = get_task(name).encode(make_example(name, rng, hw=(90, 140)), processor, rng, train=train)
    eos = processor.vocab.eos_id
    assert set(s) == {"text_inputs", "image_input", "image_input_mask", "text_targets", "image_target",
                      "image_target_mask", "task", "meta"}
    assert s["task"] == name and s["meta"]["task"] == name and isinstance(s["meta"], dict)
    for k in ("text_inputs", "text_targets"):
        ids = s[k]
        assert isinstance(ids, list) and ids[-1] == eos and all(isinstance(i, int) for i in ids)
        assert 0 not in ids and eos not in ids[:-1]
    assert len(s["text_inputs"]) <= processor.max_input_len and len(s["text_targets"]) <= processor.max_target_len
    assert s["image_input"].shape == (3, 384, 384) and s["image_input"].dtype == np.float32
    assert s["image_input_mask"].shape == (576,) and s["image_input_mask"].dtype == bool
    assert s["image_target_mask"].shape == (256,) and s["image_target_mask"].dtype == bool
    if name in TEXT_ONLY and not (name == "span_corruption" and s["image_input_mask"].any()):
        assert not s["image_input_mask"].any() and not s["image_input"].any()
    elif name != "image_generation":
        assert s["image_input_mask"].any()
    if name in IMAGE_OUT:
        t = s["image_target"]
        assert t.shape == (3, 256, 256) and t.dtype == np.float32 and t.min() >= -1 and t.max() <= 1
        assert s["image_target_mask"].any()
        if name not in ("object_segmentation", "grounded_vqa"):
            assert s["text_targets"] == [eos]
    else:
        assert s["image_target"] is None and not s["image_target_mask"].any()
    if not train:
        gt = get_task(name).targets_for_metrics(s["meta"])
        assert isinstance(gt, dict) and (gt or name == "span_corruption")


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, change, err, msg", [
    ("detection", {"boxes": [[0, 0, 5, 5]] * 2, "labels": ["a"]}, ValueError, "2 boxes but 1 labels"),
    ("detection", {"boxes": [[1, 2, 3]], "labels": ["a"]}, ValueError, r"boxes\[0\] must be 4"),
    ("referring_expression", {"box": [50, 50, 10, 10]}, ValueError, "x1 <= x2"),
    ("object_localization", {"boxes": np.zeros((2, 3))}, ValueError, r"\(N, 4\)"),
    ("object_localization", {"boxes": None}, ValueError, "list of"),
    ("keypoints", {"keypoints": [[1, 2, 2]] * 16}, ValueError, r"shape \(17, 3\)"),
    ("keypoints", {"keypoints": [[1, 2, 5]] * 17}, ValueError, "visibilities must be 0, 1 or 2"),
    ("object_segmentation", {"masks": [np.ones((3, 3), bool)]}, ValueError, r"image's size \(90, 140\)"),
    ("depth", {"depth": np.ones((10, 10), np.float32)}, ValueError, r"depth must be float \(H, W\)"),
    ("depth", {"max_depth": -1.0}, ValueError, "max_depth must be a positive number"),
    ("surface_normals", {"normals": np.ones((90, 140), np.float32)}, ValueError, r"\(H, W, 3\)"),
    ("vqa", {"answers": []}, ValueError, "non-empty list"),
    ("vqa", {"question": 3}, TypeError, "question must be a str"),
    ("image_classification", {"label": "zebra"}, ValueError, "not among the"),
    ("segmentation_to_image", {"segments": []}, ValueError, "non-empty list"),
    ("image_captioning", {"image": "cat.jpg"}, TypeError, "unsupported image type"),
    ("image_captioning", {"image": np.zeros((5, 5, 3), np.int16)}, TypeError, "dtype"),
])
def test_bad_examples_fail_with_clear_errors(processor, name, change, err, msg):
    rng = np.random.default_rng(0)
    ex = make_example(name, rng, hw=(90, 140))
    ex.update(change)
    with pytest.raises(err, match=msg):
        get_task(name).encode(ex, processor, rng, train=False)


def test_missing_keys_are_named(processor):
    with pytest.raises(KeyError, match=r"missing key\(s\) \['labels'\]"):
        get_task("detection").encode({"image": np.zeros((4, 4, 3), np.uint8), "boxes": []}, processor)
    with pytest.raises(TypeError, match="must be a dict"):
        get_task("vqa").encode(["image"], processor)


# ---- malformed generations ------------------------------------------------------------------------------------
def _garbage(processor, rng):
    v = processor.vocab
    yield None
    yield []
    yield [v.eos_id]
    yield rng.integers(0, v.size, 50)
    yield rng.integers(-10**6, 10**6, 40)
    yield [v.loc_id(3), v.loc_id(4), 7, 8, v.loc_id(5)]  # truncated box then text
    yield [v.loc_id(3)] * 7  # 1 box + truncated one, 2 points + truncated one
    yield v.image_id(np.arange(30))  # image ids where text was expected
    yield [v.sentinel_id(0), v.image_bos_id, no_coordinates_id(v), no_coordinates_id(v), 2, 2]
    yield np.array([[v.loc_id(1), v.loc_id(2)], [v.loc_id(3), v.loc_id(4)]])  # 2-D
    yield np.array([1.5, np.nan, 3.0])
    yield ["a", "b"]
    yield torch.tensor([v.loc_id(10)] * 4 + [5, 6])
    yield [v.loc_id(1)] * 300


def _garbage_images(rng):
    yield None
    yield np.zeros((256, 256), np.float32)
    yield np.full((3, 256, 256), np.nan, np.float32)
    yield rng.uniform(-3, 3, (3, 256, 256)).astype(np.float32)
    yield rng.uniform(-1, 1, (256, 256, 3)).astype(np.float32)
    yield torch.rand(1, 3, 64, 64)
    yield "image"


@pytest.mark.parametrize("name", ALL)
def test_malformed_generations_never_raise(processor, name):
    rng = np.random.default_rng(0)
    task = get_task(name)
    s = task.encode(make_example(name, rng, hw=(60, 80)), processor, rng, train=False)
    for tokens in _garbage(processor, rng):
        for image in _garbage_images(rng):
            assert isinstance(task.decode(tokens, image, s["meta"], processor), dict)
    for meta in ({}, {"image_hw": "oops", "target_hw": (0, 5)}, {"max_depth": "x", "box": "abc"}, None, ["x"]):
        for tokens in _garbage(processor, rng):
            assert isinstance(task.decode(tokens, np.zeros((3, 64, 64), np.float32), meta, processor), dict)


def test_garbage_decodes_to_empty_or_partial_predictions(processor):
    v = processor.vocab
    meta = {"image_hw": (100, 100)}
    det = get_task("detection")
    tokens = v.box_to_tokens([10, 10, 50, 50], (100, 100)) + processor.tokens("cube") + [v.loc_id(5), v.loc_id(6)]
    pred = det.decode(tokens, None, meta, processor)
    assert pred["boxes"].shape == (1, 4) and pred["labels"] == ["cube"]
    pred = det.decode(v.image_id(np.arange(20)), None, meta, processor)
    assert pred["boxes"].shape == (0, 4) and pred["labels"] == [] and pred["scores"].shape == (0,)
    kp = get_task("keypoints").decode([v.loc_id(1), v.loc_id(2)] + processor.tokens("3"), None, meta, processor)
    assert kp["keypoints"].shape == (17, 3) and not kp["valid"] and kp["keypoints"][0, 2] == 2
    assert (kp["keypoints"][1:, 2] == 0).all()
    seg = get_task("object_segmentation").decode([v.eos_id], None, meta, processor)
    assert seg["masks"] == []
    depth = get_task("depth").decode([], np.zeros((256, 256)), {"target_hw": (30, 40)}, processor)
    assert depth["depth"].shape == (30, 40) and not depth["valid"]


def test_clean_tokens_stops_at_eos_or_pad(processor):
    v = processor.vocab
    assert clean_tokens([5, 6, v.eos_id, 7], v).tolist() == [5, 6]
    assert clean_tokens(torch.tensor([5, 0, 0]), v).tolist() == [5]
    assert clean_tokens(np.array([[5, 6], [7, 1]]), v).tolist() == [5, 6, 7]


def test_parse_located_groups(processor):
    v = processor.vocab
    L = [int(v.loc_id(i)) for i in range(8)]
    items = parse_located(np.array([9] + L[:4] + [20, 21] + L[:8] + [22] + L[:3] + [23]), v, 4)
    assert [len(c) for c, _ in items] == [4, 4, 4]
    assert [lab for _, lab in items] == [[20, 21], [], [22]]


# ---- allowed tokens --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["detection", "object_localization", "referring_expression", "keypoints"])
def test_allowed_tokens_accept_every_ground_truth_step(processor, name):
    rng = np.random.default_rng(3)
    task = get_task(name)
    ex = make_example(name, rng, hw=(100, 150))
    if name == "keypoints":  # inference masks the no-coordinates token: use a fully labelled person
        ex["keypoints"] = [[x, y, 2] for x, y, _ in ex["keypoints"]]
    target = task.encode(ex, processor, rng, train=False)["text_targets"]
    allowed = task.allowed_tokens(processor)
    for t in range(len(target)):
        mask = allowed(t, torch.tensor([target[:t]], dtype=torch.long))
        assert mask.shape == (1, processor.vocab.size) and mask.dtype == torch.bool
        assert mask[0, target[t]], (name, t, target[t])


def test_allowed_tokens_structure(processor):
    v = processor.vocab
    det = get_task("detection").allowed_tokens(processor)
    L = [int(v.loc_id(i)) for i in (1, 2, 3, 4)]
    m = det(0, torch.zeros(2, 0, dtype=torch.long))
    assert m.shape == (2, v.size) and m[0, L[0]] and m[0, v.eos_id] and not m[0, 50] and not m[0, v.image_id(0)]
    m = det(2, torch.tensor([L[:2], [50, 51]]))
    assert m[0, L[0]] and not m[0, 50] and not m[0, v.eos_id]  # inside a box: locations only
    assert m[1, 50] and m[1, L[0]] and m[1, v.eos_id]  # after a label: anything textual
    m = det(4, torch.tensor([L]))
    assert m[0, 50] and not m[0, L[0]] and not m[0, v.eos_id]  # a label must follow a box
    ref = get_task("referring_expression").allowed_tokens(processor)(4, torch.tensor([L]))
    assert ref[0].nonzero().flatten().tolist() == [v.eos_id]
    kp = get_task("keypoints").allowed_tokens(processor)
    nc = no_coordinates_id(v)
    assert not kp(0, torch.zeros(1, 0, dtype=torch.long))[0, nc]
    assert not kp(3, torch.tensor([[L[0], L[1], 60]]))[0, nc]
    assert get_task("vqa").allowed_tokens(processor) is None


def test_no_coordinates_token_is_an_unused_text_id(processor):
    v = processor.vocab
    nc = no_coordinates_id(v)
    assert v.sentinel_end <= nc < v.image_bos_id and not v.is_loc(nc) and not v.is_sentinel(nc)
    from uio.vocab import Vocab

    assert no_coordinates_id(Vocab()) == 33100


# ---- scoring tasks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["image_classification", "region_classification", "text_classification"])
def test_scoring_tasks_rank_candidates(processor, name):
    rng = np.random.default_rng(0)
    task = get_task(name)
    ex = make_example(name, rng, hw=(50, 60))
    assert task.scoring
    cands = task.candidates(ex)
    s = task.encode(ex, processor, rng, train=False)
    assert s["meta"]["candidates"] == cands
    toks = task.candidate_tokens(cands, processor)
    assert all(t[-1] == processor.vocab.eos_id for t in toks)
    assert toks[cands.index(ex["label"])] == s["text_targets"]
    scores = np.full(len(cands), -5.0)
    scores[cands.index(ex["label"])] = -1.0
    assert task.decode_scores(torch.tensor(scores), s["meta"])["label"] == ex["label"]
    assert task.decode_scores([np.nan] * len(cands), s["meta"])["label"] == ""
    assert task.decode_scores([1.0], s["meta"])["label"] == ""  # wrong length: empty, no exception


# ---- docs and real examples ----------------------------------------------------------------------------------
def test_docs_table_lists_every_task_with_its_prompt_and_metric():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in doc.splitlines() if line.startswith("| `")}
    assert set(rows) == set(TASKS)
    for name, t in TASKS.items():
        row = rows[name]
        assert f"| {t.group} |" in row
        assert all(f"`{m}`" in row for m in t.metrics), name
        if name in ORIGINAL_PROMPTS:
            assert f"★ `{t.prompts[0]}`" in row, name


def test_toyworld_examples_encode_decode_and_score(processor):
    """The data engineers' toy-world examples (contract 1) go through every task and its metric."""
    from uio.data.toyworld import examples_for_scene

    rng = np.random.default_rng(0)
    examples: dict[str, list] = {}
    for index in range(8):  # scenes until every image task has an example (some scenes have no person)
        for name, exs in examples_for_scene(0, "val", index).items():
            examples.setdefault(name, exs)
        if set(examples) >= set(ALL) - {"span_corruption"}:
            break
    assert set(examples) >= set(ALL) - {"span_corruption"}
    for name, exs in examples.items():
        task = get_task(name)
        for ex in exs:
            task.encode(ex, processor, rng, train=True)
            s = task.encode(ex, processor, rng, train=False)
            pred = task.decode(s["text_targets"], s["image_target"], s["meta"], processor)
            for metric in task.build_metrics().values():
                metric.update([pred], [task.targets_for_metrics(s["meta"])])
                assert metric.compute()
