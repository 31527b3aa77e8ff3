"""Text-answer metrics: VQA v2 accuracy, SQuAD EM/F1, label accuracy, ROUGE, grounded VQA.

The answer normalisations follow the official evaluation scripts' behaviour (VQA v2
``vqaEval.py``, SQuAD ``evaluate-v2.0.py``) including their quirks, which are noted inline.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping
from typing import Any

from uio.metrics.base import (
    MetricInputError,
    UIOMetric,
    as_mask_list,
    as_text,
    as_text_list,
    get_field,
)
from uio.metrics.dense import union_iou

# ----------------------------------------------------------------------------------------------
# VQA v2 answer normalisation
# ----------------------------------------------------------------------------------------------
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead (not the intended
# look-behind) that always succeeds, so it removes every "." not followed by a digit; the script also
# passes re.UNICODE (= 32) as the *count*, so at most 32 periods go.
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_PERIOD_MAX = int(re.UNICODE)
_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})

# The contraction table maps a word written with exactly one of its apostrophes missing to the full
# contraction ("dont" -> "don't", "hed've" and "he'dve" -> "he'd've"); these are the contractions it
# covers. (The official table also lists capitalised keys, unreachable after lower-casing, and
# identities such as "let's"; those change nothing and are left out.)
_VQA_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's they'd
they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's
won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _one_apostrophe_dropped(word: str) -> list[str]:
    pos = [i for i, c in enumerate(word) if c == "'"]
    return [word[:i] + word[i + 1 :] for i in pos]


VQA_CONTRACTIONS: dict[str, str] = {v: full for full in _VQA_CONTRACTED for v in _one_apostrophe_dropped(full)}
VQA_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: this entry of the official table runs backwards


def vqa_process_punctuation(text: str) -> str:
    """``processPunctuation`` of the VQA evaluation.

    Each punctuation mark is deleted when it touches a space anywhere in the answer (or the answer
    contains a digit-comma-digit group), otherwise replaced by a space; then periods not followed
    by a digit are removed. The conditions look at the original answer, not the running result.
    """
    out = text
    has_number_comma = _VQA_DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _VQA_PUNCT:
        if (p + " " in text) or (" " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_MAX)


def vqa_process_digit_article(text: str) -> str:
    """``processDigitArticle``: lower-case, number words -> digits, drop articles, contractions."""
    words = [_VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_normalize(answer: str) -> str:
    """The full normalisation the VQA evaluation applies to a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(answer))


def vqa_accuracy(answer: str, gt_answers: list[str]) -> float:
    """Official VQA v2 accuracy of one answer against the human answers (usually 10).

    ``mean over i of min(1, #{j != i : gt_j == answer} / 3)`` — the min(#humans / 3, 1) score
    averaged over the leave-one-out subsets. As in ``vqaEval.py``, answers are only normalised when
    the humans disagree: with unanimous human answers both sides are compared after stripping only.
    """
    if not gt_answers:
        raise MetricInputError("VQA accuracy needs at least one ground-truth answer")
    res = answer.replace("\n", " ").replace("\t", " ").strip()
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gt_answers]
    if len(set(gts)) > 1:
        gts = [vqa_normalize(a) for a in gts]
        res = vqa_normalize(res)
    matches = [g == res for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def grit_vqa_accuracy(answer: str, gt_answers: list[str]) -> float:
    """GRIT's VQA score: both sides always normalised, ``min(1, #{gt == answer} / 3)``."""

    def norm(s: str) -> str:
        s = s.replace("\n", " ").replace("\t", " ").lower().strip()
        return vqa_process_digit_article(vqa_process_punctuation(s))

    res = norm(answer)
    return min(1.0, sum(norm(g) == res for g in gt_answers) / 3.0)


class VQAAccuracy(UIOMetric):
    """VQA v2 soft accuracy (see :func:`vqa_accuracy`).

    pred ``{"answer": str}``, target ``{"answers": list[str]}`` (the 10 human answers).
    Returns ``acc`` (official VQA v2) and ``grit_acc`` (GRIT's variant), means over questions in [0, 1].
    """

    name = "vqa_accuracy"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_score("acc", "grit_acc")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        ans = as_text(get_field(pred, "answer", "prediction", "text"), "pred['answer']")
        gts = as_text_list(get_field(target, "answers", "target"), "target['answers']", allow_empty=False)
        self._push(acc=vqa_accuracy(ans, gts), grit_acc=grit_vqa_accuracy(ans, gts))

    def compute(self) -> dict[str, float]:
        return {"acc": self._mean("acc"), "grit_acc": self._mean("grit_acc")}


class GroundedVQA(UIOMetric):
    """Grounded VQA (answer plus the image region it rests on, e.g. VizWiz-Ground).

    pred ``{"answer": str, "masks": list[bool (H, W)]}`` (or ``"mask"``), target
    ``{"answers": list[str], "mask": bool (H, W)}``. ``acc``: VQA v2 accuracy of the answer;
    ``mask_iou``: IoU of the union of the predicted masks with the grounding (both empty = 1).
    """

    name = "grounded_vqa"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_score("acc", "mask_iou")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        import numpy as np

        ans = as_text(get_field(pred, "answer", "prediction", "text"), "pred['answer']")
        gts = as_text_list(get_field(target, "answers", "target"), "target['answers']", allow_empty=False)
        pm = as_mask_list(get_field(pred, "masks", "prediction", "mask"), "pred['masks']")
        gm = as_mask_list(get_field(target, "mask", "target", "masks"), "target['mask']")
        shapes = {m.shape for m in pm + gm}
        if len(shapes) > 1:
            raise MetricInputError(f"predicted and ground-truth masks differ in size: {sorted(shapes)}")
        pu = np.logical_or.reduce(pm) if pm else None
        gu = np.logical_or.reduce(gm) if gm else None
        self._push(acc=vqa_accuracy(ans, gts), mask_iou=union_iou(pu, gu))

    def compute(self) -> dict[str, float]:
        return {"acc": self._mean("acc"), "mask_iou": self._mean("mask_iou")}


# ----------------------------------------------------------------------------------------------
# exact-label accuracies
# ----------------------------------------------------------------------------------------------
def normalize_label(s: str) -> str:
    """Labels are compared after stripping, lower-casing and collapsing inner white space."""
    return " ".join(s.lower().split())


class Accuracy(UIOMetric):
    """Classification accuracy: pred ``{"label": str}``, target ``{"label": str}`` -> ``acc``."""

    name = "accuracy"
    field = "label"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_score("acc")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        f = self.field
        p = as_text(get_field(pred, f, "prediction"), f"pred[{f!r}]")
        t = as_text(get_field(target, f, "target"), f"target[{f!r}]")
        self._push(acc=float(normalize_label(p) == normalize_label(t)))

    def compute(self) -> dict[str, float]:
        return {"acc": self._mean("acc")}


class RelationshipAccuracy(Accuracy):
    """Relationship (predicate) accuracy: pred ``{"predicate"}``, target ``{"predicate"}`` -> ``acc``."""

    name = "relationship_accuracy"
    field = "predicate"


# ----------------------------------------------------------------------------------------------
# SQuAD
# ----------------------------------------------------------------------------------------------
_SQUAD_PUNCT = frozenset(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def squad_normalize(s: str) -> str:
    """SQuAD answer normalisation: lower-case, drop punctuation, drop articles, squeeze spaces."""
    s = "".join(c for c in s.lower() if c not in _SQUAD_PUNCT)
    return " ".join(_SQUAD_ARTICLES.sub(" ", s).split())


def squad_f1(pred: str, gold: str) -> float:
    """Token-overlap F1 after normalisation (an empty side scores 1 only against an empty side)."""
    p, g = squad_normalize(pred).split(), squad_normalize(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


class SquadMetric(UIOMetric):
    """SQuAD exact match and F1, maxima over the gold answers, means over questions in [0, 1].

    pred ``{"answer": str}``, target ``{"answers": list[str]}`` (an empty list = unanswerable, scored
    against the empty answer as SQuAD 2.0 does).
    """

    name = "squad"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_score("em", "f1")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        ans = as_text(get_field(pred, "answer", "prediction", "text"), "pred['answer']")
        golds = [g for g in as_text_list(get_field(target, "answers", "target"), "target['answers']")
                 if squad_normalize(g)] or [""]
        self._push(
            em=max(float(squad_normalize(ans) == squad_normalize(g)) for g in golds),
            f1=max(squad_f1(ans, g) for g in golds),
        )

    def compute(self) -> dict[str, float]:
        return {"em": self._mean("em"), "f1": self._mean("f1")}


# ----------------------------------------------------------------------------------------------
# ROUGE
# ----------------------------------------------------------------------------------------------
class RougeMetric(UIOMetric):
    """ROUGE-1/2/L F-measures (torchmetrics' implementation: lower-cased alphanumeric tokens, no
    stemming), per summary, averaged. pred ``{"text": str}``, target ``{"summary": str}`` or
    ``{"summaries": list[str]}`` (the best reference counts). -> ``rouge1, rouge2, rougeL``.
    """

    name = "rouge"
    _KEYS = ("rouge1", "rouge2", "rougeL")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_score(*self._KEYS)

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        from torchmetrics.functional.text.rouge import rouge_score

        text = as_text(get_field(pred, "text", "prediction", "summary"), "pred['text']")
        refs = as_text_list(get_field(target, "summary", "target", "summaries"), "target['summary']",
                            allow_empty=False)
        scores = rouge_score(text, [refs], accumulate="best", rouge_keys=self._KEYS)
        self._push(**{k: float(scores[f"{k}_fmeasure"]) for k in self._KEYS})

    def compute(self) -> dict[str, float]:
        return {k: self._mean(k) for k in self._KEYS}
