"""Toy-world language: exact facts about a rendered scene and the sentences built from them.

Everything said here is true of the scene by construction. Spatial relations use margins so that
a relation is either clearly true, clearly false, or *undecided* (``None``); undecided relations
are never stated, asked about, or used to single out an object.

Conventions: "objects" are the shapes; people are "people". Left/right are as seen by the camera
and must hold both in the camera frame (metres) and in the image (box centres). "In front of" /
"behind" compare distances from the camera.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uio.data.toyworld_scene import COLORS, PERSON, SHAPES, Scene, SceneObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLURALS = {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders", "cone": "cones", "pyramid": "pyramids",
           PERSON: "people"}
POSE_VERBS = {"standing": "standing", "walking": "walking", "waving": "waving", "arms out": "holding both arms out"}
SIZE_RANK = {"small": 0, "medium": 1, "large": 2}
RELATIONS = ("left of", "right of", "in front of", "behind", "larger than", "smaller than", "next to")

LATERAL_MARGIN = 0.3  # metres, camera frame
IMAGE_MARGIN = 0.05  # fraction of the image width, box centres
DEPTH_MARGIN = 0.8  # metres
NEAR_GAP, FAR_GAP = 0.6, 1.5  # footprint gaps (metres) for "next to" / clearly not next to


def all_labels() -> list[str]:
    """Every object label of the world ("red cube", ..., "person"): the classification candidates."""
    return [f"{c} {s}" for s in SHAPES for c in COLORS] + [PERSON]


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def cap(s: str) -> str:
    """Upper-case the first letter only."""
    return s[:1].upper() + s[1:]


def plural_count(n: int, noun: str) -> str:
    """"one object", "two objects", "one person", "two people"."""
    plural = PLURALS.get(noun, noun + "s")
    return f"{number(n)} {noun if n == 1 else plural}"


def number(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def noun_phrase(obj: SceneObject, size: bool = False, color: bool = True) -> str:
    """"large red cube", "red cube", "cube", "person in a red shirt", "person"."""
    if obj.category == PERSON:
        return f"person in {article(obj.color)} shirt" if color else PERSON
    words = ([obj.size] if size else []) + ([obj.color] if color else []) + [obj.category]
    return " ".join(words)


def join_list(items: list[str]) -> str:
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


@dataclass
class Facts:
    """Per-object measurements of a rendered scene that the language is built on."""

    scene: Scene
    cx: np.ndarray  # box centre x / image width, (n,)
    lateral: np.ndarray  # camera-frame x of the base centre (metres), (n,)
    dist: np.ndarray  # z-depth of the base centre (metres), (n,)

    @classmethod
    def of(cls, scene: Scene) -> "Facts":
        w = scene.image_hw[1]
        cam = np.array([scene.cam_position(k) for k in range(len(scene.objects))]).reshape(-1, 3)
        cx = np.array([(b[0] + b[2]) / 2 / w for b in scene.boxes])
        return cls(scene, cx, cam[:, 0], -cam[:, 2])

    @property
    def objects(self) -> list[SceneObject]:
        return self.scene.objects

    @property
    def n(self) -> int:
        return len(self.scene.objects)

    # ---- relations -------------------------------------------------------------------------------
    def relation(self, a: int, b: int, pred: str) -> bool | None:
        """Whether ``objects[a] <pred> objects[b]`` holds: True, False, or None when too close to call."""
        oa, ob = self.objects[a], self.objects[b]
        if pred in ("left of", "right of"):
            sign = 1.0 if pred == "left of" else -1.0
            dx = sign * (self.lateral[a] - self.lateral[b])
            du = sign * (self.cx[a] - self.cx[b])
            if dx < -LATERAL_MARGIN and du < -IMAGE_MARGIN:
                return True
            return False if dx > 0 and du > 0 else None
        if pred in ("in front of", "behind"):
            dd = (self.dist[a] - self.dist[b]) * (1.0 if pred == "in front of" else -1.0)
            if dd < -DEPTH_MARGIN:
                return True
            return False if dd > 0 else None
        if pred in ("larger than", "smaller than"):
            ra, rb = _size_rank(oa), _size_rank(ob)
            if pred == "smaller than":
                ra, rb = rb, ra
            if ra > rb:
                return True
            if ra < rb or oa.category == ob.category:
                return False
            return None  # same size class, different shapes
        if pred == "next to":
            gap = np.hypot(oa.x - ob.x, oa.z - ob.z) - oa.radius - ob.radius
            return True if gap < NEAR_GAP else (False if gap > FAR_GAP else None)
        raise ValueError(f"unknown relation {pred!r}; expected one of {RELATIONS}")

    def dominant_relation(self, a: int, b: int) -> str | None:
        """The one predicate the relationship task asks for: the clearer of the lateral and the depth
        relation (depth differences count half), else a size relation, else "next to"."""
        cands = []
        for pred in ("left of", "right of"):
            if self.relation(a, b, pred):
                cands.append((abs(self.lateral[a] - self.lateral[b]), pred))
        for pred in ("in front of", "behind"):
            if self.relation(a, b, pred):
                cands.append((abs(self.dist[a] - self.dist[b]) / 2, pred))
        if cands:
            return max(cands)[1]
        for pred in ("larger than", "smaller than", "next to"):
            if self.relation(a, b, pred):
                return pred
        return None

    def region(self, k: int) -> str | None:
        """Where the object is in the image: "left", "middle", "right" (None near a border)."""
        c = self.cx[k]
        if c < 0.3:
            return "left"
        if c > 0.7:
            return "right"
        if 0.4 < c < 0.6:
            return "middle"
        return None

    # ---- descriptions that single out one object --------------------------------------------------
    def matches(self, pred) -> list[int]:
        return [k for k, o in enumerate(self.objects) if pred(o)]

    def unique_phrases(self, k: int) -> list[str]:
        """Attribute-only noun phrases (without article) that fit object k and no other object."""
        o = self.objects[k]
        out = []
        tests = [
            (noun_phrase(o, color=False), lambda p: p.category == o.category),
            (noun_phrase(o), lambda p: p.category == o.category and p.color == o.color),
        ]
        if o.category != PERSON:
            tests += [
                (f"{o.size} {o.category}", lambda p: p.category == o.category and p.size == o.size),
                (noun_phrase(o, size=True), lambda p: (p.category, p.color, p.size) == (o.category, o.color, o.size)),
                (f"{o.color} object", lambda p: p.color == o.color),
            ]
        for phrase, pred in tests:
            if self.matches(pred) == [k]:
                out.append(phrase)
        return out

    def referring_expressions(self, k: int) -> list[str]:
        """Every expression (with "the") this module can build that identifies object k uniquely:
        attributes, extremes ("the leftmost sphere") and relations to another object."""
        o = self.objects[k]
        exprs = [f"the {p}" for p in self.unique_phrases(k)]
        bases = [(noun_phrase(o, color=False), lambda p, o=o: p.category == o.category),
                 (noun_phrase(o), lambda p, o=o: p.category == o.category and p.color == o.color)]
        for base, pred in bases:
            group = self.matches(pred)
            if len(group) < 2:
                continue
            others = [g for g in group if g != k]
            for pred_name, word in (("left of", "leftmost"), ("right of", "rightmost"),
                                    ("in front of", "closest"), ("behind", "farthest")):
                if all(self.relation(k, g, pred_name) for g in others):
                    if word in ("leftmost", "rightmost"):
                        exprs.append(f"the {word} {base}")
                        exprs.append(f"the {base} on the {word[:-4]}")
                    else:
                        exprs.append(f"the {base} {word} to the camera" if word == "closest" else
                                     f"the {base} farthest from the camera")
            # relational: "the red cube left of the blue sphere"
            for r in range(self.n):
                if r in group:
                    continue
                ref = self.unique_phrases(r)
                if not ref:
                    continue
                for rel in ("left of", "right of", "in front of", "behind", "next to"):
                    if self.relation(k, r, rel) and all(self.relation(g, r, rel) is False for g in others):
                        exprs.append(f"the {base} {rel} the {min(ref, key=len)}")
        return list(dict.fromkeys(exprs))

    # ---- scene-level phrases -----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Count of each object name ("red cube": 2, "person": 1)."""
        out: dict[str, int] = {}
        for o in self.objects:
            out[o.name] = out.get(o.name, 0) + 1
        return out

    def inventory(self, rng: np.random.Generator | None = None, people_detail: bool = True,
                  indices: list[int] | None = None) -> str:
        """"a red cube, two blue spheres and a person in a green shirt" (order: left to right, or
        shuffled with ``rng``); ``indices`` restricts it to some objects."""
        order = [int(k) for k in (np.argsort(self.cx) if rng is None else rng.permutation(self.n))]
        if indices is not None:
            order = [k for k in order if k in set(indices)]
        groups: dict[str, list[int]] = {}
        for k in order:
            o = self.objects[k]
            key = noun_phrase(o) if (o.category == PERSON and people_detail) else o.name
            groups.setdefault(key, []).append(int(k))
        items = []
        for key, ks in groups.items():
            if len(ks) == 1:
                items.append(article(key))
            elif key == PERSON:
                items.append(f"{number(len(ks))} people")
            elif key.startswith(PERSON):  # same shirt colour (the colour is part of the key)
                items.append(f"{number(len(ks))} people in {self.objects[ks[0]].color} shirts")
            else:
                color, shape = key.rsplit(" ", 1)
                items.append(f"{number(len(ks))} {color} {PLURALS[shape]}")
        return join_list(items)


def _size_rank(o: SceneObject) -> int:
    """small < medium < large shapes < people (1.6-1.9 m tall, over twice a large shape)."""
    return 3 if o.category == PERSON else SIZE_RANK[o.size]


def describe_object(f: Facts, k: int, rng: np.random.Generator) -> str:
    """One sentence about object k: its size/colour/shape or pose, and where it is."""
    o = f.objects[k]
    where = f.region(k)
    where_s = {"left": "on the left", "right": "on the right", "middle": "in the middle"}.get(where, "")
    near = "close to the camera" if f.dist[k] < 3.8 else ("far from the camera" if f.dist[k] > 6.0 else "")
    place = ", ".join(s for s in (where_s, near) if s) or "in the room"
    if o.category == PERSON:
        s = f"{article(noun_phrase(o))} is {POSE_VERBS[o.pose]}"
    else:
        verb = ["stands", "sits", "is"][int(rng.integers(3))]
        s = f"{article(noun_phrase(o, size=True))} {verb}"
    return cap(f"{s} {place}.")


def describe_scene(f: Facts, rng: np.random.Generator) -> str:
    """A paragraph: the room, then one sentence per object (left to right or shuffled)."""
    sc = f.scene
    n_people = sum(o.category == PERSON for o in f.objects)
    n_shapes = f.n - n_people
    head = (f"The room has {article(sc.wall)} wall and {article(sc.floor)} floor. "
            f"It holds {plural_count(n_shapes, 'object')}")
    head += f" and {plural_count(n_people, 'person')}." if n_people else "."
    order = np.argsort(f.cx) if rng.random() < 0.5 else rng.permutation(f.n)
    return " ".join([head] + [describe_object(f, int(k), rng) for k in order])


def captions(f: Facts, rng: np.random.Generator, num: int = 5) -> list[str]:
    """``num`` different, true captions (COCO-style: one or two sentences)."""
    sc = f.scene
    inv_lr = f.inventory()
    inv = f.inventory(rng)
    cands = [
        f"{inv_lr} on {article(sc.floor)} floor.",
        f"A room with {article(sc.wall)} wall and {article(sc.floor)} floor, containing {inv}.",
        f"From left to right: {inv_lr}.",
        f"{inv} in a room.",
        f"Things on {article(sc.floor)} floor: {f.inventory(rng, people_detail=False)}.",
    ]
    n_shapes = sum(o.category != PERSON for o in f.objects)
    n_people = f.n - n_shapes
    if n_shapes:
        count = f"There {'is' if n_shapes == 1 else 'are'} {plural_count(n_shapes, 'object')}"
        cands.append(count + (f" and {plural_count(n_people, PERSON)}" if n_people else "") + f" in the room: {inv}.")
    pairs = [(a, b) for a in range(f.n) for b in range(f.n) if a != b]
    rng.shuffle(pairs)
    for a, b in pairs[:6]:
        rel = f.dominant_relation(a, b)
        if rel is None or rel in ("larger than", "smaller than"):
            continue
        oa, ob = f.objects[a], f.objects[b]
        subj = cap(article(noun_phrase(oa)))
        verb = f"is {POSE_VERBS[oa.pose]}" if oa.category == PERSON and rng.random() < 0.5 else "is"
        s = f"{subj} {verb} {rel} {article(noun_phrase(ob))}."
        cands.append(f"{inv_lr} on {article(sc.floor)} floor. {s}" if rng.random() < 0.5 else s)
    for k, o in enumerate(f.objects):
        if o.category != PERSON:
            continue
        near = [j for j in range(f.n) if j != k and f.relation(k, j, "next to")]
        tail = f" next to {article(noun_phrase(f.objects[near[0]]))}" if near else ""
        cands.append(f"{cap(article(noun_phrase(o)))} is {POSE_VERBS[o.pose]} in a room{tail}.")
    cands = [cap(c) for c in dict.fromkeys(cands)]
    idx = rng.permutation(len(cands))[:num]
    return [cands[i] for i in idx]


def short_summary(f: Facts) -> str:
    """One sentence naming everything (the summarisation target)."""
    return cap(f"{f.inventory()} on {article(f.scene.floor)} floor.")
