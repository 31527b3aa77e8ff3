"""uio-eval and the evaluation library: data resolution, model loading, the eval loop, baselines,
the report and table, GRIT aggregation, saved predictions. Runs on a tiny random model and a tiny
toy world built here."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uio.baselines import (BASELINES, ConstantMask, LocalizationPrior, MajorityText, MeanBox, MeanDepth, MeanNormals,
                           MeanPose, QuestionTypePrior, build_baseline, fit_baseline, score_predictions)
from uio.evaluation import (PRIMARY, TaskEvaluation, evaluate_task, format_grit, format_table, grit_table, image_use,
                            load_examples, load_model, primary_rows, resolve_data, to_jsonable)

from test_inference import tiny_model

EVAL_TASKS = ["vqa", "depth", "detection", "region_classification", "keypoints", "object_segmentation"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny toy world: 5 train and 3 val scenes at 48 px, every scene task."""
    from uio.data.toyworld import build_toyworld
    from uio.data.toyworld_tasks import ALL_TASKS

    root = tmp_path_factory.mktemp("toyworld")
    build_toyworld(root, num_train_scenes=5, num_val_scenes=3, image_size=48, num_workers=1, progress=False,
                   tasks=[t for t in ALL_TASKS if t != "span_corruption"])
    return root


@pytest.fixture(scope="module")
def model_dir(text_tokenizer, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    tiny_model(text_tokenizer).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from uio.cli import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


# ---- data ----------------------------------------------------------------------------------------
def test_resolve_data_forms(world):
    root = resolve_data(world, "vqa", "val")
    folder = resolve_data(world / "vqa" / "toyworld", "vqa", "val")
    manifest = resolve_data(world / "vqa" / "toyworld" / "manifest.json", "vqa", "val")
    assert root == folder == manifest and len(root) == 1 and root[0][0].endswith(".tar")
    tars = resolve_data(root[0][0], "vqa", "val")
    assert tars == root
    with pytest.raises(ValueError, match="holds task 'vqa', not 'depth'"):
        resolve_data(world / "vqa" / "toyworld", "depth", "val")
    with pytest.raises(KeyError, match="no 'test' split"):
        resolve_data(world / "vqa" / "toyworld", "vqa", "test")
    with pytest.raises(FileNotFoundError, match="no nonexistent_task"):
        resolve_data(world, "nonexistent_task", "val")


def test_load_examples_limits_and_defaults_to_the_toy_world(world, monkeypatch, tmp_path):
    exs = load_examples(world, "vqa", "val", max_examples=4)
    assert len(exs) == 4 and all("question" in e and e["image"].shape == (48, 48, 3) for e in exs)
    assert len(load_examples(world, "vqa", "val")) == 9  # 3 questions x 3 scenes
    monkeypatch.setenv("UIO_HOME", str(tmp_path))  # the default: $UIO_HOME/toyworld
    (tmp_path / "toyworld").symlink_to(world)
    assert [e["id"] for e in load_examples(None, "vqa", "val", 4)] == [e["id"] for e in exs]
    with pytest.raises(ValueError, match="max_examples"):
        load_examples(world, "vqa", "val", 0)


# ---- models -------------------------------------------------------------------------------------
def test_load_model_forms(model_dir, model, text_tokenizer, tmp_path):
    from uio.training.module import UIOLitModule

    img = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    want = model.caption(img, max_text_len=10)
    # a run directory with an exported model
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(model_dir, run / "model")
    assert load_model(run).caption(img, max_text_len=10) == want
    # a Lightning checkpoint as uio-train writes it (hyperparameters + "model." weights)
    cfg = model.config.to_dict()
    spec = cfg.pop("image_tokenizer")
    tok_dir = text_tokenizer.save(tmp_path / "tok")
    module = UIOLitModule(model=cfg, image_tokenizer=spec, text_tokenizer=str(tok_dir))
    module.model.load_state_dict(model.state_dict())
    ckpt = tmp_path / "run2" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "global_step": 3}, ckpt)
    assert load_model(ckpt).caption(img, max_text_len=10) == want
    assert load_model(tmp_path / "run2").caption(img, max_text_len=10) == want  # finds checkpoints/last.ckpt
    bf16 = load_model(ckpt, dtype=torch.bfloat16)
    assert bf16.network.token_embedder.weight.dtype == torch.bfloat16
    assert next(bf16.image_tokenizer.parameters()).dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="uio-train"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_model(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a uio-train checkpoint"):
        load_model(tmp_path / "other.ckpt")


# ---- the loop -------------------------------------------------------------------------------------
def test_evaluate_task_scores_model_and_baseline_on_the_same_targets(world, model):
    from uio.evaluation import encode_examples

    exs = load_examples(world, "depth", "val")
    base = fit_baseline("depth", load_examples(world, "depth", "train"))
    r = evaluate_task(model, "depth", exs, baseline=base, keep_predictions=True)
    assert r.num_examples == 3 and set(r.metrics) == {"depth"} and math.isfinite(r.metrics["depth"]["rmse"])
    # the model's numbers are its predictions scored against the encoded ground truth
    preds = [p["prediction"] for p in r.predictions]
    targets = [p["target"] for p in r.predictions]
    assert score_predictions("depth", preds, targets) == r.metrics
    assert all(p["depth"].shape == e["depth"].shape for p, e in zip(preds, exs))
    # the baseline is scored on exactly those targets
    samples = encode_examples("depth", exs, model.processor)
    bpreds = [base.predict(e, s["meta"]) for e, s in zip(exs, samples)]
    assert score_predictions("depth", bpreds, targets) == r.baseline["metrics"]
    assert r.baseline["name"] == "mean depth map" and r.baseline["train_examples"] == 5
    # seeded: the same run gives the same numbers
    assert evaluate_task(model, "depth", exs).metrics == r.metrics


def test_tokenizer_ceiling_is_the_ground_truth_through_the_image_tokenizer(world, model, monkeypatch):
    exs = load_examples(world, "depth", "val")
    r = evaluate_task(model, "depth", exs, ceiling=True)
    assert r.ceiling is not None and math.isfinite(r.ceiling["depth"]["rmse"])
    assert r.to_dict()["tokenizer_ceiling"] == r.ceiling
    assert evaluate_task(model, "vqa", load_examples(world, "vqa", "val"), ceiling=True).ceiling is None
    # with a lossless tokenizer the ceiling is the ground truth itself, up to grey levels and resizing
    # (the dense target is smaller than the image)
    kept = []

    def encode(pixels):
        kept.append(pixels.clone())
        return torch.zeros(pixels.shape[0], model.config.decoder_max_image_len, dtype=torch.long)

    monkeypatch.setattr(model, "encode_image_targets", encode)
    blank = lambda codes: torch.zeros(codes.shape[0], 3, *model.config.image_target_size)  # noqa: E731 (generation)
    monkeypatch.setattr(model, "decode_image_codes", lambda codes: kept.pop() if kept else blank(codes))
    lossless = evaluate_task(model, "depth", exs, ceiling=True).ceiling["depth"]
    assert lossless["abs_rel"] < 0.05 and lossless["delta1"] > 0.95  # what is left: edges blurred by resizing
    assert lossless["rmse"] < 0.2 * r.ceiling["depth"]["rmse"]  # the random test VQ-GAN loses most of it


def test_image_use_is_the_loss_gained_from_the_own_image(world, model):
    exs = load_examples(world, "depth", "val") + load_examples(world, "depth", "train")
    r = evaluate_task(model, "depth", exs, measure_image_use=True, baseline=None)
    use = r.image_use
    assert use is not None and set(use) == {"nll", "nll_other_image", "gain"}
    assert use["gain"] == pytest.approx(use["nll_other_image"] - use["nll"]) and use["gain"] != 0.0
    assert r.to_dict()["image_use"] == use and primary_rows([r])[0]["image_use"] == use["gain"]
    assert "| image use |" in format_table(primary_rows([r]))
    # a token-weighted mean over all targets: the batching does not change it
    assert image_use(model, "depth", exs, batch_size=3) == pytest.approx(use, abs=1e-4)
    # tasks without an input image, or a single example (nothing to swap with), have none
    assert image_use(model, "text_classification", load_examples(world, "text_classification", "val")) is None
    assert image_use(model, "depth", exs[:1]) is None
    assert evaluate_task(model, "vqa", load_examples(world, "vqa", "val")).image_use is None  # not asked for
    # a network blind to the pixels gains nothing from them
    w = model.network.encoder.image_projection.weight
    kept = w.detach().clone()
    try:
        with torch.no_grad():
            w.zero_()
        blind = image_use(model, "depth", exs)
    finally:
        with torch.no_grad():
            w.copy_(kept)
    assert abs(blind["gain"]) < 1e-5 and blind["nll"] != pytest.approx(use["nll"])


def test_question_answering_reads_every_window(world, model, monkeypatch):
    """A context longer than the encoder is answered from all its windows, never the gold one."""
    import uio.tasks.pipelines as pipelines

    exs = [{"id": "qa", "context": " ".join(f"the cube number {i} is red ." for i in range(40)),
            "question": "what color is the cube ?", "answers": ["red"]}]
    calls = []
    real = pipelines.answer_with_windows
    monkeypatch.setattr(pipelines, "answer_with_windows", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = evaluate_task(model, "question_answering", exs, generation={"max_text_len": 6})
    assert calls == [1] and r.num_examples == 1 and 0.0 <= r.metrics["squad"]["f1"] <= 1.0


def test_num_samples_reaches_image_only_tasks(model):
    from uio.evaluation import _generation_kwargs
    from uio.tasks import get_task

    assert _generation_kwargs(get_task("depth"), model, {"num_samples": 4})["num_samples"] == 4
    assert "num_samples" not in _generation_kwargs(get_task("vqa"), model, {"num_samples": 4})  # text: ignored
    assert "num_samples" not in _generation_kwargs(get_task("object_segmentation"), model, {"num_samples": 4})
    with pytest.raises(KeyError, match="or num_samples"):
        _generation_kwargs(get_task("depth"), model, {"samples": 4})


def test_eval_cli_writes_report_and_predictions(world, model_dir, tmp_path, capsys):
    from uio.cli.eval import run

    out = tmp_path / "out"
    cfg = _compose(f"task=[{','.join(EVAL_TASKS)}]", f"ckpt={model_dir}", f"shards={world}", f"output_dir={out}",
                   "save_predictions=true", "generation.max_text_len=24", "max_examples=3", "baseline_train_examples=5")
    report = run(cfg)
    printed = capsys.readouterr().out
    saved = json.loads((out / "report.json").read_text())
    assert saved == to_jsonable(report)  # what was returned is what was written
    assert set(saved["tasks"]) == set(EVAL_TASKS) and saved["split"] == "val"
    for t in EVAL_TASKS:
        assert saved["tasks"][t]["num_examples"] >= 1 and saved["tasks"][t]["baseline"]["metrics"]
    rows = saved["table"]
    assert [r["task"] for r in rows] == EVAL_TASKS
    table = (out / "report.md").read_text()
    assert table.startswith("| task | metric | n | model | baseline | margin |") and table.strip() in printed
    for r in rows:
        if r["model"] is not None and r["baseline"] is not None:
            sign = 1 if r["higher_is_better"] else -1
            assert r["margin"] == pytest.approx(sign * (r["model"] - r["baseline"]))
    # saved predictions in standard formats
    pred = out / "predictions"
    coco = json.loads((pred / "detection" / "coco_results.json").read_text())
    lines = [json.loads(x) for x in (pred / "detection" / "predictions.jsonl").read_text().splitlines()]
    boxes = [b for rec in lines for b in rec["boxes"]]
    assert len(coco) == len(boxes)
    for c, b in zip(coco, boxes):
        assert c["bbox"] == pytest.approx([b[0], b[1], b[2] - b[0], b[3] - b[1]])
    kp = json.loads((pred / "keypoints" / "coco_keypoints.json").read_text())
    assert kp and all(len(k["keypoints"]) == 51 and k["category_id"] == 1 for k in kp)
    depth_rec = json.loads((pred / "depth" / "predictions.jsonl").read_text().splitlines()[0])
    png = np.asarray(Image.open(pred / "depth" / depth_rec["file"]))
    assert png.dtype == np.uint16 and png.shape == (48, 48)
    seg_rec = json.loads((pred / "object_segmentation" / "predictions.jsonl").read_text().splitlines()[0])
    seg = np.asarray(Image.open(pred / "object_segmentation" / seg_rec["file"]))
    assert seg.shape == (48, 48) and seg.max() <= seg_rec["num_instances"]
    assert len(seg_rec["colors"]) == seg_rec["num_instances"] and isinstance(seg_rec["prediction"], str)
    page = (pred / "vqa" / "index.html").read_text()
    assert "<table>" in page and page.count("<tr>") == 1 + 3
    assert all((pred / "vqa" / src).is_file() for src in re.findall(r'src="([^"]+)"', page))


def test_eval_cli_grit_average(world, model_dir, tmp_path, capsys):
    from uio.cli.eval import run
    from uio.metrics.grit import GRIT_TASKS

    cfg = _compose("task=grit", f"ckpt={model_dir}", f"shards={world}", f"output_dir={tmp_path}",
                   "generation.max_text_len=24", "max_examples=2", "baseline_train_examples=5")
    report = run(cfg)
    grit = report["grit"]["model"]
    assert list(grit) == list(GRIT_TASKS) + ["overall"]
    assert grit["overall"] == pytest.approx(sum(grit[t] for t in GRIT_TASKS) / 7)
    # each GRIT number is x100 of its task's metric key
    t = report["tasks"]
    assert grit["vqa"] == pytest.approx(100 * t["vqa"]["metrics"]["vqa_accuracy"]["grit_acc"])
    assert grit["normal"] == pytest.approx(100 * t["surface_normals"]["metrics"]["surface_normals"]["grit_sn"])
    assert grit["refexp"] == pytest.approx(100 * t["referring_expression"]["metrics"]["box_accuracy"]["acc"])
    out = capsys.readouterr().out
    assert "| categorization | localization | vqa | refexp | segmentation | keypoint | normal | overall |" in out


def _result(task: str, metrics: dict, base: dict | None = None) -> TaskEvaluation:
    return TaskEvaluation(task, 10, metrics, 1.0, None if base is None else
                          {"name": "rule", "description": "", "metrics": base, "train_examples": 5})


def test_grit_table_missing_task_counts_zero_and_table_margins():
    results = [_result("vqa", {"vqa_accuracy": {"acc": 0.5, "grit_acc": 0.6}}, {"vqa_accuracy": {"acc": 0.2, "grit_acc": 0.3}}),
               _result("object_localization", {"box_accuracy": {"acc": 0.9, "grit_loc": 0.4, "match50": 0.5}}),
               _result("depth", {"depth": {"rmse": 0.3}}, {"depth": {"rmse": 0.6}})]
    g = grit_table(results)
    assert g["vqa"] == pytest.approx(60.0) and g["localization"] == pytest.approx(40.0)
    assert g["overall"] == pytest.approx(100.0 / 7)  # five GRIT tasks missing count 0
    gb = grit_table(results, baseline=True)
    assert gb == {"vqa": pytest.approx(30.0), "overall": pytest.approx(30.0 / 7)}
    text = format_grit(g, gb)
    assert text.splitlines()[2].startswith("| model | – | 40.0 | 60.0 |") and "| baseline |" in text
    rows = primary_rows(results)
    vqa, loc, depth = rows
    assert vqa["margin"] == pytest.approx(0.3) and vqa["ratio"] == pytest.approx(2.5) and vqa["beats_baseline"]
    assert depth["margin"] == pytest.approx(0.3) and depth["ratio"] == pytest.approx(0.5) and depth["beats_baseline"]
    assert math.isnan(loc["baseline"]) and not loc["beats_baseline"]
    table = format_table(rows)
    assert "| vqa | vqa_accuracy.acc ↑ | 10 | 0.500 | 0.200 | +0.300 | 2.50× | rule | – |" in table
    assert "| depth | depth.rmse ↓ | 10 | 0.300 | 0.600 | +0.300 | 0.50× | rule | – |" in table
    assert "| object_localization | box_accuracy.acc ↑ | 10 | 0.900 | – | – | – | – | – |" in table
    results[2].ceiling = {"depth": {"rmse": 0.1}}
    assert "| depth | depth.rmse ↓ | 10 | 0.300 | 0.600 | +0.300 | 0.50× | rule | 0.100 |" in format_table(primary_rows(results))


def test_eval_config_errors(model_dir):
    from uio.cli.eval import EvalConfigError, run

    with pytest.raises(EvalConfigError, match="Did you mean 'max_examples'"):
        run(_compose("+max_example=3", "task=vqa"))
    with pytest.raises(EvalConfigError, match="Did you mean 'depth'"):
        run(_compose("task=dpeth", f"ckpt={model_dir}"))
    with pytest.raises(EvalConfigError, match="no evaluation metric"):
        run(_compose("task=span_corruption", f"ckpt={model_dir}"))
    with pytest.raises(EvalConfigError, match="dtype"):
        run(_compose("task=vqa", "dtype=int8"))
    with pytest.raises(EvalConfigError, match="generation.beams"):
        run(_compose("task=vqa", "+generation.beams=2"))


def test_bare_uio_eval_lists_every_task(tmp_path):
    from uio.tasks import TASKS

    exe = Path(sys.executable).parent / "uio-eval"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "uio.cli.eval"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, "UIO_HOME": str(tmp_path / "home")})
    assert p.returncode == 0, p.stderr
    for name in TASKS:
        assert f"\n{name} " in p.stdout
    assert "task=grit" in p.stdout and "task=all" in p.stdout
    assert list(tmp_path.iterdir()) == []  # listing writes nothing
    bad = subprocess.run(cmd + ["task=vqa", "ckpt=nowhere"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300, env={**os.environ, "UIO_HOME": str(tmp_path / "home")})
    assert bad.returncode == 2 and "uio-eval: no model at nowhere" in bad.stderr


# ---- baselines ------------------------------------------------------------------------------------
def test_every_evaluated_task_has_a_baseline_that_its_metrics_accept(world, text_tokenizer):
    from uio.evaluation import encode_examples
    from uio.processing import Processor
    from uio.tasks import get_task

    assert set(PRIMARY) <= set(BASELINES)
    for task in ("image_inpainting", "grounded_vqa", "summarization", "image_captioning", "object_localization",
                 "surface_normals", "question_answering", "relationship", "text_classification"):
        b = fit_baseline(task, load_examples(world, task, "train"))
        exs = load_examples(world, task, "val")
        proc = Processor(text_tokenizer, image_input_size=(32, 32), image_target_size=(16, 16), image_target_grid=(4, 4))
        samples = encode_examples(task, exs, proc)
        preds = [b.predict(e, s["meta"]) for e, s in zip(exs, samples)]
        m = score_predictions(task, preds, [get_task(task).targets_for_metrics(s["meta"]) for s in samples])
        metric, key, _ = PRIMARY[task][0]
        assert math.isfinite(m[metric][key]), (task, m)
        assert b.description and b.num_train_examples == len(load_examples(world, task, "train"))


def test_majority_and_box_baselines_by_hand():
    vqa = MajorityText("vqa", lambda ex: ex["answers"][0], ["answer"], "answer").fit(
        [{"answers": ["2"]}, {"answers": ["yes"]}, {"answers": ["yes"]}, {"answers": ["2"]}, {"answers": ["no"]}])
    assert vqa.predict({}) == {"answer": "2"}  # a tie goes to the answer seen first
    img = np.zeros((10, 20, 3), np.uint8)
    mb = MeanBox("referring_expression").fit([{"image": img, "box": [0, 0, 10, 10]}, {"image": img, "box": [10, 0, 20, 6]}])
    np.testing.assert_allclose(mb.predict({"image": np.zeros((20, 40, 3))})["boxes"], [[10, 0, 30, 16]])
    loc = LocalizationPrior("object_localization").fit(
        [{"image": img, "label": "cube", "boxes": []}, {"image": img, "label": "cube", "boxes": []},
         {"image": img, "label": "cube", "boxes": [[0, 0, 5, 5]]},
         {"image": img, "label": "cone", "boxes": [[2, 2, 8, 8]]}, {"image": img, "label": "cone", "boxes": [[2, 2, 8, 8]]}])
    assert loc.predict({"image": img, "label": "cube"})["boxes"].shape == (0, 4)  # mostly absent: predict nothing
    np.testing.assert_allclose(loc.predict({"image": img, "label": "cone"})["boxes"], [[2, 2, 8, 8]])
    kps = np.zeros((17, 3))
    kps[:, 0], kps[:, 1], kps[:, 2] = 10, 30, 2
    kps[0] = [0, 0, 0]  # an unlabelled joint does not count
    pose = MeanPose("keypoints").fit([{"box": [0, 20, 20, 40], "keypoints": kps}])
    out = pose.predict({"box": [100, 100, 140, 120]})["keypoints"]
    np.testing.assert_allclose(out[1:, :2], np.tile([120, 110], (16, 1)))


def test_question_type_prior_answers_from_the_question_alone():
    qs = [("Is there a red cube?", "yes"), ("Is there a blue cone?", "no"), ("Is there a cyan sphere ?", "no"),
          ("What color is the cube?", "red"), ("What color is the cone?", "red"), ("What color is the ball?", "blue"),
          ("How many cubes are there?", "2")]
    train = [{"question": q, "answers": [a] * 3} for q, a in qs]
    prior = QuestionTypePrior("vqa", max_words=3, min_count=2).fit(train)
    assert prior.predict({"question": "Is there a pink pyramid?"}) == {"answer": "no"}  # "is there a": 1 yes, 2 no
    assert prior.predict({"question": "WHAT colour is it"}) == {"answer": "red"}  # only "what" is a known type
    assert prior.predict({"question": "How many cones are there?"}) == {"answer": "no"}  # unknown: overall majority
    # VQA v2 annotations name the type; it takes precedence over the opening words
    typed = [{"question": f"q{i}", "question_type": "how many", "answers": ["3"]} for i in range(2)]
    prior = QuestionTypePrior("vqa", min_count=2).fit(train + typed)
    assert prior.predict({"question": "Is there a dog?", "question_type": "how many"}) == {"answer": "3"}
    gvqa = build_baseline("grounded_vqa")
    assert gvqa.name == "majority answer per question type + best constant mask"


def test_dense_baselines_by_hand():
    d = np.full((16, 16), 2.0, np.float32)
    d[:8, :8] = 0.0  # invalid: the mean there is over the other map only
    md = MeanDepth("depth").fit([{"depth": d}, {"depth": np.full((16, 16), 4.0, np.float32)}])
    pred = md.predict({"image": np.zeros((8, 8, 3))})["depth"]
    assert pred.shape == (8, 8)
    np.testing.assert_allclose(pred[5:, 5:], 3.0, atol=1e-4)
    np.testing.assert_allclose(pred[:3, :3], 4.0, atol=1e-4)
    n = np.zeros((6, 6, 3), np.float32)
    n[..., 1] = 1.0
    nm = MeanNormals("surface_normals").fit([{"normals": n}, {"normals": n * 3}])
    np.testing.assert_allclose(nm.predict({"image": np.zeros((4, 4, 3))})["normals"][..., 1], 1.0, atol=1e-5)
    m = np.zeros((16, 16), bool)
    m[:, :8] = True
    cm = ConstantMask("object_segmentation", lambda ex: ex["masks"], allow_empty=True).fit(
        [{"image": np.zeros((16, 16, 3)), "label": "cube", "masks": [m]}] * 3 +
        [{"image": np.zeros((16, 16, 3)), "label": "cone", "masks": []}] * 3)
    got = cm.predict({"image": np.zeros((32, 32, 3)), "label": "cube"})["masks"]
    assert len(got) == 1 and got[0][:, :16].all() and not got[0][:, 16:].any()  # the left half, at the new size
    assert cm.predict({"image": np.zeros((32, 32, 3)), "label": "cone"})["masks"] == []


def test_baseline_errors():
    with pytest.raises(KeyError, match="no trivial baseline for task 'span_corruption'"):
        build_baseline("span_corruption")
    with pytest.raises(ValueError, match="zero training examples"):
        build_baseline("vqa").fit([])
    with pytest.raises(RuntimeError, match="not fitted"):
        build_baseline("vqa").predict({})
