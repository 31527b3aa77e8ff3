"""Caption metrics: CIDEr-D and corpus BLEU-4 as computed by the COCO caption evaluation.

Both follow the coco-caption algorithms (Vedantam et al. 2015 with the "-D" changes; Papineni et
al. 2002 with coco-caption's closest-reference length and smoothing constants), written here from
their definitions. The Stanford PTB tokenizer that coco-caption runs first is approximated: text is
lower-cased, clitics are split off as PTB does ("don't" -> "do n't", "dog's" -> "dog 's") and
punctuation is dropped; hyphenated words and decimals stay single tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from uio.metrics.base import UIOMetric, as_text, as_text_list, get_field

_CLITIC_NT = re.compile(r"(?<=\w)(n't)\b")
_CLITIC = re.compile(r"(?<=\w)('s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-.'][^\W_]+)*")

Ngrams = Counter  # Counter[tuple[str, ...]]


def caption_tokenize(text: str) -> list[str]:
    """Lower-cased PTB-like word tokens with punctuation removed."""
    text = text.lower().replace("\u2019", "'")
    text = _CLITIC_NT.sub(r" \1", text)
    text = _CLITIC.sub(r" \1", text)
    return _TOKEN.findall(text)


def ngram_counts(words: Sequence[str], n: int = 4) -> Ngrams:
    """Counts of all 1..n-grams of ``words``."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4, sigma: float = 6.0) -> list[float]:
    """CIDEr-D score of each hypothesis (token lists) against its references.

    * idf from the reference corpus: ``log(#images) - log(max(1, df(g)))`` where ``df(g)`` counts
      the images whose references contain n-gram ``g``;
    * per n, the tf-idf vectors of hypothesis and reference are compared by a clipped cosine,
      ``sum_g min(h_g, r_g) * r_g / (|h| |r|)``, damped by ``exp(-(l_h - l_r)^2 / (2 sigma^2))``
      where ``l`` is the number of bigrams (coco-caption's length);
    * averaged over n = 1..4 and over the references, times 10.
    """
    n_img = len(refs)
    if n_img == 0:
        return []
    ref_counts = [[ngram_counts(r, n) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rcs in ref_counts:
        df.update({g for rc in rcs for g in rc})
    log_n = math.log(float(n_img))

    def vectorize(counts: Ngrams) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(v * v for v in vk.values())) for vk in vec]
        n_bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, norms, n_bigrams

    scores = []
    for hyp, rcs in zip(hyps, ref_counts):
        hv, hn, hl = vectorize(ngram_counts(hyp, n))
        total = 0.0
        for rc in rcs:
            rv, rn, rl = vectorize(rc)
            penalty = math.exp(-((hl - rl) ** 2) / (2 * sigma**2))
            for k in range(n):
                if hn[k] == 0 or rn[k] == 0:
                    continue
                dot = sum(min(w, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, w in hv[k].items())
                total += dot / (hn[k] * rn[k]) * penalty / n
        scores.append(10.0 * total / max(1, len(rcs)))
    return scores


def corpus_bleu(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4) -> float:
    """Corpus BLEU-n as coco-caption computes it.

    Clipped n-gram matches and hypothesis n-gram counts are summed over the corpus; the reference
    length of each sentence is the closest reference length (ties -> the shorter);
    ``BLEU = BP * prod_k ((m_k + 1e-15) / (c_k + 1e-9))^(1/n)`` with
    ``BP = exp(1 - r/c)`` when the hypotheses are shorter than the references.
    """
    correct, guess = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs):
        hc = ngram_counts(hyp, n)
        maxref: Counter = Counter()
        for r in rs:
            maxref |= ngram_counts(r, n)
        for g, c in hc.items():
            correct[len(g) - 1] += min(c, maxref[g])
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in rs)[1]
    tiny, small = 1e-15, 1e-9
    log_p = sum(math.log((correct[k] + tiny) / (guess[k] + small)) for k in range(n)) / n
    bleu = math.exp(log_p)
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        bleu *= math.exp(1 - 1 / ratio)
    return bleu


class CaptionMetric(UIOMetric):
    """Image / region captioning: ``cider`` (CIDEr-D, idf from the evaluated references) and
    ``bleu4`` (corpus BLEU-4). pred ``{"text": str}``, target ``{"captions": list[str]}``
    (``"caption": str`` also accepted). The whole corpus is gathered before scoring.
    """

    name = "captioning"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_records("records")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        hyp = as_text(get_field(pred, "text", "prediction", "caption"), "pred['text']")
        refs = as_text_list(get_field(target, "captions", "target", "caption"), "target['captions']",
                            allow_empty=False)
        self.records.append((hyp, refs))

    def compute(self) -> dict[str, float]:
        if not self.records:
            return {"cider": math.nan, "bleu4": math.nan}
        hyps = [caption_tokenize(h) for h, _ in self.records]
        refs = [[caption_tokenize(r) for r in rs] for _, rs in self.records]
        scores = cider_d(hyps, refs)
        return {"cider": sum(scores) / len(scores), "bleu4": corpus_bleu(hyps, refs)}
