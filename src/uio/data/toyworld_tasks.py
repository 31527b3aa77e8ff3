"""Toy-world raw examples: one rendered scene -> examples for every task (design.md contract 1).

:func:`scene_examples` returns ``{task: [example, ...]}`` with exactly the keys of contract 1.
Ground truth is exact: boxes and masks come from the renderer's instance buffer, depth and
normals from the ray caster, and every sentence from :mod:`uio.data.toyworld_text` facts.
Text-only tasks (text classification, question answering, summarisation) describe the scene in
words; span corruption uses real packaged text (:mod:`uio.data.text_corpus`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from uio.data.toyworld_scene import CATEGORIES, COLORS, PERSON, SHAPES, Scene
from uio.data.toyworld_text import (
    PLURALS, POSE_VERBS, Facts, all_labels, article, captions, describe_scene, noun_phrase, number,
    short_summary)

DATASET = "toyworld"
IMAGE_TASKS: tuple[str, ...] = (
    "image_generation", "image_inpainting", "segmentation_to_image", "detection", "object_localization",
    "referring_expression", "keypoints", "object_segmentation", "depth", "surface_normals",
    "image_classification", "region_classification", "image_captioning", "region_captioning", "vqa",
    "relationship", "grounded_vqa", "masked_image_denoising")
SCENE_TEXT_TASKS: tuple[str, ...] = ("text_classification", "question_answering", "summarization")
TEXT_TASKS: tuple[str, ...] = SCENE_TEXT_TASKS + ("span_corruption",)
ALL_TASKS: tuple[str, ...] = IMAGE_TASKS + TEXT_TASKS
_SCENE_TASKS = IMAGE_TASKS + SCENE_TEXT_TASKS
NLI_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
POSE_ANSWERS = {"standing": "standing", "walking": "walking", "waving": "waving", "arms out": "arms out"}
VQA_NUM_ANSWERS = 10  # VQA v2 collects 10 human answers per question


@dataclass
class ExampleConfig:
    """How many examples of each kind one scene yields."""

    max_depth: float = 10.0
    vqa_per_scene: int = 3
    referring_per_scene: int = 2
    relationships_per_scene: int = 2
    region_captions_per_scene: int = 1
    absent_prob: float = 0.25  # localisation/segmentation queries for a class that is not there


# ---- question pools ------------------------------------------------------------------------------
QA = tuple[str, str, int | None, str]  # (question, answer, grounding object or None, question type)


def vqa_pool(f: Facts, rng: np.random.Generator) -> list[QA]:
    """Every question this module can ask about the scene, with its exact answer."""
    out: list[QA] = []
    objs = f.objects
    phrases = [f.unique_phrases(k) for k in range(f.n)]
    for k, o in enumerate(objs):
        colorless = [p for p in phrases[k] if o.color not in p.split()]
        if colorless:
            p = colorless[int(rng.integers(len(colorless)))]
            q = f"What color is the {p}?" if o.category != PERSON else f"What color is the shirt of the {p}?"
            out.append((q, o.color, k, "color"))
        if o.category != PERSON and f"{o.color} object" in phrases[k]:
            out.append((f"What shape is the {o.color} object?", o.category, k, "shape"))
        sizeless = [p for p in phrases[k] if o.size not in p.split()]
        if o.category != PERSON and sizeless:
            p = sizeless[int(rng.integers(len(sizeless)))]
            out.append((f"What size is the {p}?", o.size, k, "size"))
        if phrases[k] and f.region(k) in ("left", "right"):
            p = min(phrases[k], key=len)
            out.append((f"Is the {p} on the left or on the right?", f.region(k), k, "where"))
        if o.category == PERSON and phrases[k]:
            out.append((f"What is the {min(phrases[k], key=len)} doing?", POSE_ANSWERS[o.pose], k, "pose"))
    # counting
    for cat in CATEGORIES:
        n = sum(o.category == cat for o in objs)
        out.append((f"How many {PLURALS[cat]} are there?", str(n), None, "count"))
    for color in COLORS:
        if any(o.category == PERSON and o.color == color for o in objs):
            continue  # "red objects" would be ambiguous with a red shirt
        n = sum(o.color == color for o in objs)
        if n or rng.random() < 0.3:
            out.append((f"How many {color} objects are there?", str(n), None, "count"))
    # existence
    present = {o.name for o in objs if o.category != PERSON}
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
    for name in sorted(present)[:2]:
        out.append((f"Is there {article(name)}?", "yes", None, "exists"))
    for name in rng.choice(absent, size=min(2, len(absent)), replace=False):
        out.append((f"Is there {article(str(name))}?", "no", None, "exists"))
    out.append(("What color is the floor?", f.scene.floor, None, "floor"))
    # relations: yes/no and "what is left of ...?"
    for a in range(f.n):
        for b in range(f.n):
            if a == b or not phrases[a] or not phrases[b]:
                continue
            pa, pb = min(phrases[a], key=len), min(phrases[b], key=len)
            for rel in ("left of", "right of", "in front of", "behind", "larger than", "smaller than"):
                v = f.relation(a, b, rel)
                if v is not None:
                    out.append((f"Is the {pa} {rel} the {pb}?", "yes" if v else "no", None, "relation"))
    for b in range(f.n):
        if not phrases[b]:
            continue
        pb = min(phrases[b], key=len)
        for rel in ("left of", "right of", "in front of", "behind"):
            vals = [(a, f.relation(a, b, rel)) for a in range(f.n) if a != b]
            yes = [a for a, v in vals if v]
            if len(yes) == 1 and all(v is False for a, v in vals if a != yes[0]):
                out.append((f"What is {rel} the {pb}?", objs[yes[0]].name, yes[0], "what_relation"))
    return out


def _pick_balanced(pool: list[QA], n: int, rng: np.random.Generator, grounded: bool = False) -> list[QA]:
    """``n`` distinct questions, choosing the question type uniformly first (so counting does not
    dominate)."""
    pool = [q for q in pool if q[2] is not None] if grounded else list(pool)
    picked: list[QA] = []
    while pool and len(picked) < n:
        types = sorted({q[3] for q in pool})
        t = types[int(rng.integers(len(types)))]
        of_type = [q for q in pool if q[3] == t]
        q = of_type[int(rng.integers(len(of_type)))]
        picked.append(q)
        pool = [p for p in pool if p[0] != q[0]]
    return picked


def text_qa_pool(f: Facts, context: str) -> list[tuple[str, list[str]]]:
    """Questions about a scene *description*; every answer is a span of ``context``."""
    out = [("What color is the floor?", [f.scene.floor]), ("What color is the wall?", [f.scene.wall])]
    n_shapes = sum(o.category != PERSON for o in f.objects)
    out.append(("How many objects does the room hold?", [number(n_shapes), str(n_shapes)]))
    for k, o in enumerate(f.objects):
        for p in f.unique_phrases(k):
            words = p.split()
            if o.color not in words:
                q = f"What color is the {p}?" if o.category != PERSON else f"What color shirt is the {p} wearing?"
                out.append((q, [o.color]))
            if o.category != PERSON and o.size not in words:
                out.append((f"How big is the {p}?", [o.size]))
            region = f.region(k)
            if region in ("left", "right"):
                out.append((f"Where is the {p}?", [f"on the {region}", region]))
            if o.category == PERSON:
                out.append((f"What is the {p} doing?", [POSE_VERBS[o.pose]]))
    return [(q, a) for q, a in out if all(x in context for x in a[:1])]


def nli_example(f: Facts, rng: np.random.Generator) -> dict[str, Any]:
    """A premise describing the scene, a hypothesis, and the exact NLI label."""
    present_names = sorted({o.name for o in f.objects})
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present_names]
    counts = f.counts()
    if rng.random() < 0.5:  # exhaustive premise: everything is decidable
        premise = f"The room contains {f.inventory(rng, people_detail=False)}, and nothing else."
        kind = int(rng.integers(3))
        if kind == 0:
            name = present_names[int(rng.integers(len(present_names)))]
            return _nli(premise, f"There is {article(name)} in the room.", "entailment")
        if kind == 1:
            name = str(absent[int(rng.integers(len(absent)))])
            return _nli(premise, f"There is {article(name)} in the room.", "contradiction")
        name = present_names[int(rng.integers(len(present_names)))]
        true_n = counts[name]
        n = true_n if rng.random() < 0.5 else int(rng.choice([m for m in range(1, 5) if m != true_n]))
        plural = name if n == 1 else (PLURALS[name] if name == PERSON else
                                      f"{name.rsplit(' ', 1)[0]} {PLURALS[name.rsplit(' ', 1)[1]]}")
        verb = "is" if n == 1 else "are"
        hyp = f"There {verb} exactly {number(n)} {plural} in the room."
        return _nli(premise, hyp, "entailment" if n == true_n else "contradiction")
    # partial premise: listed objects are known, anything else is undetermined
    listed = sorted(rng.choice(f.n, size=int(rng.integers(1, f.n)), replace=False).tolist()) if f.n > 1 else [0]
    premise = f"Among other things, the room contains {f.inventory(rng, people_detail=False, indices=listed)}."
    listed_names = sorted({f.objects[k].name for k in listed})
    kind = int(rng.integers(3))
    if kind == 0:
        name = listed_names[int(rng.integers(len(listed_names)))]
        return _nli(premise, f"There is {article(name)} in the room.", "entailment")
    if kind == 1:
        name = listed_names[int(rng.integers(len(listed_names)))]
        return _nli(premise, f"There is no {name} in the room.", "contradiction")
    unlisted = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in listed_names]
    name = str(unlisted[int(rng.integers(len(unlisted)))])
    return _nli(premise, f"There is {article(name)} in the room.", "neutral")


def _nli(premise: str, hypothesis: str, label: str) -> dict[str, Any]:
    return {"text": premise, "text_pair": hypothesis, "label": label, "candidates": list(NLI_LABELS)}


# ---- one scene -> examples ---------------------------------------------------------------------
def _label_query(f: Facts, rng: np.random.Generator, absent_prob: float) -> tuple[str, list[int]]:
    """A class phrase ("cube", "red cube" or "person") and the objects it denotes (maybe none)."""
    if rng.random() < absent_prob:
        present = {o.category for o in f.objects} | {o.name for o in f.objects}
        options = [c for c in CATEGORIES if c not in present] + [
            f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
        label = str(options[int(rng.integers(len(options)))])
    else:
        o = f.objects[int(rng.integers(f.n))]
        label = o.category if (o.category == PERSON or rng.random() < 0.5) else o.name
    ks = [k for k, o in enumerate(f.objects) if label in (o.category, o.name)]
    return label, ks


def scene_examples(scene: Scene, rng: np.random.Generator, scene_id: str,
                   tasks: tuple[str, ...] | list[str] | None = None, cfg: ExampleConfig | None = None,
                   image: Any = None) -> dict[str, list[dict[str, Any]]]:
    """Raw examples of every task in ``tasks`` (default: all image and scene-text tasks) from one
    rendered scene. ``image`` replaces the image array in every example (e.g. its encoded bytes,
    shared by all examples of the scene when writing shards).

    Each task draws from its own child of ``rng`` (``rng.spawn``), so a task's examples do not
    depend on which other tasks are requested."""
    cfg = cfg or ExampleConfig()
    tasks = tuple(tasks) if tasks is not None else IMAGE_TASKS + SCENE_TEXT_TASKS
    unknown = sorted(set(tasks) - set(IMAGE_TASKS + SCENE_TEXT_TASKS))
    if unknown:
        raise ValueError(f"scene_examples cannot make {unknown}; expected tasks from "
                         f"{list(IMAGE_TASKS + SCENE_TEXT_TASKS)} (span_corruption comes from the text corpus)")
    f = Facts.of(scene)
    img = scene.image if image is None else image
    box = lambda k: [float(v) for v in scene.boxes[k]]  # noqa: E731
    out: dict[str, list[dict[str, Any]]] = {}

    def add(task: str, i: int, fields: dict[str, Any], with_image: bool = True) -> None:
        ex = {"id": f"{scene_id}-{task}-{i}", "dataset": DATASET}
        if with_image:
            ex["image"] = img
        ex.update(fields)
        out.setdefault(task, []).append(ex)

    def image_generation():
        add("image_generation", 0, {"caption": captions(f, rng, 1)[0]})

    def image_inpainting():
        k = int(rng.integers(f.n))
        add("image_inpainting", 0, {"box": box(k), "label": f.objects[k].name})

    def segmentation_to_image():
        segs = [{"label": f"{scene.floor} floor", "mask": scene.instance == -1},
                {"label": f"{scene.wall} wall", "mask": scene.instance == -2}]
        segs += [{"label": o.name if o.category != PERSON else noun_phrase(o), "mask": scene.mask(k)}
                 for k, o in enumerate(f.objects)]
        add("segmentation_to_image", 0, {"segments": segs})

    def detection():
        add("detection", 0, {"boxes": [box(k) for k in range(f.n)], "labels": [o.category for o in f.objects]})

    def object_localization():
        label, ks = _label_query(f, rng, cfg.absent_prob)
        add("object_localization", 0, {"boxes": [box(k) for k in ks], "label": label})

    def object_segmentation():
        label, ks = _label_query(f, rng, cfg.absent_prob)
        add("object_segmentation", 0, {"label": label, "masks": [scene.mask(k) for k in ks]})

    def referring_expression():
        cands = [(k, e) for k in range(f.n) for e in f.referring_expressions(k)]
        chosen: set[int] = set()
        for i in range(cfg.referring_per_scene):
            left = [c for c in cands if c[0] not in chosen] or cands
            if not left:
                return
            k, expr = left[int(rng.integers(len(left)))]
            chosen.add(k)
            add("referring_expression", i, {"box": box(k), "expression": expr})

    def keypoints():
        for i, k in enumerate(k for k, o in enumerate(f.objects) if o.category == PERSON):
            kp = [[round(float(x), 2), round(float(y), 2), int(v)] for x, y, v in scene.keypoints[k]]
            add("keypoints", i, {"box": box(k), "keypoints": kp})

    def depth():
        add("depth", 0, {"depth": scene.depth.astype(np.float32), "max_depth": float(cfg.max_depth)})

    def surface_normals():
        add("surface_normals", 0, {"normals": scene.normals.astype(np.float32)})

    def image_classification():
        k = int(np.argmax(scene.areas))
        add("image_classification", 0, {"label": f.objects[k].name, "candidates": all_labels()})

    def region_classification():
        k = int(rng.integers(f.n))
        add("region_classification", 0, {"box": box(k), "label": f.objects[k].name, "candidates": all_labels()})

    def image_captioning():
        add("image_captioning", 0, {"captions": captions(f, rng, 5)})

    def region_captioning():
        for i, k in enumerate(rng.permutation(f.n)[: cfg.region_captions_per_scene]):
            k = int(k)
            o = f.objects[k]
            cap = article(noun_phrase(o, size=True))
            if o.category == PERSON:
                cap += f" {POSE_VERBS[o.pose]}"
            others = [j for j in range(f.n) if j != k and f.dominant_relation(k, j) in ("left of", "right of",
                                                                                       "in front of", "behind")]
            if others and rng.random() < 0.5:
                j = others[int(rng.integers(len(others)))]
                cap += f" {f.dominant_relation(k, j)} {article(noun_phrase(f.objects[j]))}"
            add("region_captioning", i, {"box": box(k), "caption": cap})

    def vqa():
        for i, (q, a, _, _) in enumerate(_pick_balanced(vqa_pool(f, rng), cfg.vqa_per_scene, rng)):
            add("vqa", i, {"question": q, "answers": [a] * VQA_NUM_ANSWERS})

    def relationship():
        pairs = [(a, b) for a in range(f.n) for b in range(f.n) if a != b and f.dominant_relation(a, b)]
        for i, j in enumerate(rng.permutation(len(pairs))[: cfg.relationships_per_scene]):
            a, b = pairs[int(j)]
            add("relationship", i, {"subject_box": box(a), "object_box": box(b), "subject": f.objects[a].name,
                                    "object": f.objects[b].name, "predicate": f.dominant_relation(a, b)})

    def grounded_vqa():
        for q, a, k, _ in _pick_balanced(vqa_pool(f, rng), 1, rng, grounded=True):
            add("grounded_vqa", 0, {"question": q, "answers": [a] * VQA_NUM_ANSWERS, "mask": scene.mask(k)})

    def masked_image_denoising():
        add("masked_image_denoising", 0, {})

    def text_classification():
        add("text_classification", 0, nli_example(f, rng), with_image=False)

    def question_answering():
        context = describe_scene(f, rng)
        pool = text_qa_pool(f, context)
        q, answers = pool[int(rng.integers(len(pool)))]
        add("question_answering", 0, {"context": context, "question": q, "answers": answers}, with_image=False)

    def summarization():
        add("summarization", 0, {"text": describe_scene(f, rng), "summary": short_summary(f)}, with_image=False)

    makers: dict[str, Callable[[], None]] = {n: fn for n, fn in locals().items() if n in _SCENE_TASKS}
    children = dict(zip(_SCENE_TASKS, rng.spawn(len(_SCENE_TASKS))))
    for task in tasks:
        rng = children[task]  # the makers read `rng` from this scope when called
        makers[task]()
    return out

