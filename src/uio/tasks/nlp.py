"""NLP: text classification (GLUE-style), question answering with a sliding window, summarization
(paper A.1.7). Prompts are assembled in token space so that only the long text is ever truncated,
never the question."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from uio.processing import Processor
from uio.tasks.base import GenerationConfig, Task, check_text, check_texts

# The question appended to each text-classification dataset's input (paper: "question: Does this
# sentence entail the following sentence?" for entailment); unknown datasets use DEFAULT_*.
CLASSIFICATION_QUESTIONS = {
    "mnli": "Does this sentence entail the following sentence ?",
    "rte": "Does this sentence entail the following sentence ?",
    "qnli": "Does the sentence answer the question ?",
    "wnli": "Does this sentence entail the following sentence ?",
    "snli": "Does this sentence entail the following sentence ?",
    "scitail": "Does this sentence entail the following sentence ?",
    "cb": "Does this sentence entail the following sentence ?",
    "mrpc": "Do these two sentences mean the same thing ?",
    "qqp": "Do these two questions mean the same thing ?",
    "paws": "Do these two sentences mean the same thing ?",
    "stsb": "How similar are these two sentences ?",
    "sst2": "What is the sentiment of this sentence ?",
    "imdb": "What is the sentiment of this review ?",
    "cola": "Is this sentence grammatical ?",
    "boolq": "What is the answer to the question ?",
}
DEFAULT_PAIR_QUESTION = "What is the relation between the two sentences ?"
DEFAULT_SINGLE_QUESTION = "What is the label of this text ?"
QA_TEMPLATE = "context: {context} question: {question}"
SUMMARY_QUESTION = "What is a short summary of this document ?"


def _dataset_key(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    for k in CLASSIFICATION_QUESTIONS:
        if key.startswith(k) or key.endswith(k):
            return k
    return key


def fit_pieces(processor: Processor, pieces: Sequence[list[int]], fixed: Sequence[bool]) -> list[int]:
    """Concatenate id pieces + EOS within the encoder length, truncating only the non-fixed pieces
    (longest first)."""
    budget = processor.max_input_len - 1 - sum(len(p) for p, f in zip(pieces, fixed) if f)
    if budget < 0:
        raise ValueError(f"the fixed part of the prompt needs {processor.max_input_len - 1 - budget} ids, more than "
                         f"max_input_len={processor.max_input_len}")
    lengths = [0 if f else len(p) for p, f in zip(pieces, fixed)]
    while sum(lengths) > budget:
        i = max(range(len(lengths)), key=lambda j: lengths[j])
        lengths[i] -= 1
    out: list[int] = []
    for p, f, n in zip(pieces, fixed, lengths):
        out += p if f else p[:n]
    return out + [processor.vocab.eos_id]


class TextClassificationTask(Task):
    name = "text_classification"
    group = "nlp"
    prompts = ("{text} {text_pair} question: {question}",)
    output = "label"
    output_format = "label text; evaluated by scoring the dataset's candidate labels"
    metrics = ("accuracy",)
    generation_config = GenerationConfig(max_text_len=16)
    required_keys = ("text", "label")
    scoring = True

    def question(self, dataset: str, paired: bool) -> str:
        return CLASSIFICATION_QUESTIONS.get(_dataset_key(dataset), DEFAULT_PAIR_QUESTION if paired else DEFAULT_SINGLE_QUESTION)

    def candidates(self, example) -> list[str] | None:
        c = example.get("candidates")
        if c is None:
            return None
        if isinstance(c, str) or not isinstance(c, Sequence):
            raise ValueError(f"{self.name}: candidates must be a list of label strings, got {c!r:.80}")
        return check_texts(list(c), self.name, "candidates")

    def _encode(self, example, processor, rng, train):
        text = check_text(example["text"], self.name, "text")
        pair = example.get("text_pair")
        pair = check_text(pair, self.name, "text_pair") if pair else None
        label = check_text(example["label"], self.name, "label")
        question = self.question(str(example.get("dataset", "")), pair is not None)
        pieces = [processor.tokens(text)] + ([processor.tokens(pair)] if pair else []) + \
                 [processor.tokens(f"question: {question}")]
        ids = fit_pieces(processor, pieces, [False] * (len(pieces) - 1) + [True])
        prompt = " ".join([text] + ([pair] if pair else []) + [f"question: {question}"])
        cands = self.candidates(example)
        if cands is not None and not train and label not in cands:
            raise ValueError(f"{self.name}: label {label!r} is not among the candidates {cands}")
        return self.sample(processor, example, ids, None, processor.encode_target(label), None, prompt=prompt,
                           candidates=cands, gt={"label": label})

    def _decode(self, ids, image, meta, processor):
        return {"label": processor.decode_text(ids)}


class QuestionAnsweringTask(Task):
    """Extractive QA as generation. Contexts longer than the encoder are split into overlapping
    windows (Devlin et al.): training uses a window that contains an answer; inference encodes every
    window (:meth:`encode_windows`) and keeps the most confident answer
    (:func:`uio.tasks.pipelines.answer_with_windows`)."""

    name = "question_answering"
    group = "nlp"
    prompts = (QA_TEMPLATE,)
    output = "text"
    output_format = "answer text (best window for long contexts)"
    metrics = ("squad",)
    generation_config = GenerationConfig(max_text_len=32)
    required_keys = ("context", "question", "answers")
    stride_fraction: float = 0.5  # window overlap: stride = window * stride_fraction

    def _pieces(self, example, processor):
        context = check_text(example["context"], self.name, "context")
        question = check_text(example["question"], self.name, "question")
        head = processor.tokens("context:")
        tail = processor.tokens(f"question: {question}")
        window = processor.max_input_len - 1 - len(head) - len(tail)
        if window < 8:
            raise ValueError(f"{self.name}: the question is too long ({len(tail)} ids) for max_input_len="
                             f"{processor.max_input_len}")
        return head, processor.tokens(context), tail, window

    def windows(self, example, processor: Processor) -> list[list[int]]:
        """Encoder ids of every context window (one when the context fits)."""
        head, ctx, tail, window = self._pieces(example, processor)
        stride = max(1, int(window * self.stride_fraction))
        starts = list(range(0, max(len(ctx) - window, 0) + 1, stride))
        if starts[-1] + window < len(ctx):
            starts.append(len(ctx) - window)
        return [head + ctx[s : s + window] + tail + [processor.vocab.eos_id] for s in starts]

    def _encode(self, example, processor, rng, train, window_ids: list[int] | None = None, window: int = 0):
        answers = check_texts(example["answers"], self.name, "answers")
        wins = self.windows(example, processor) if window_ids is None else [window_ids]
        chosen = 0
        if window_ids is None and len(wins) > 1:
            has = [i for i, w in enumerate(wins) if any(a.lower() in processor.decode_text(w).lower() for a in answers)]
            chosen = (has[int(rng.integers(len(has)))] if train else has[0]) if has else 0
        answer = answers[int(rng.integers(len(answers)))] if train else answers[0]
        prompt = processor.decode_text(wins[chosen])
        return self.sample(processor, example, wins[chosen], None, processor.encode_target(answer), None,
                           prompt=prompt, window=window or chosen, num_windows=len(wins), gt={"answers": answers})

    def encode_windows(self, example, processor: Processor) -> list[dict[str, Any]]:
        """One evaluation sample per context window."""
        self.encode(example, processor, None, False)  # validates the example
        return [self._encode(example, processor, None, False, window_ids=w, window=i)
                for i, w in enumerate(self.windows(example, processor))]

    def _decode(self, ids, image, meta, processor):
        return {"answer": processor.decode_text(ids)}


class SummarizationTask(Task):
    name = "summarization"
    group = "nlp"
    prompts = ("{text} question: " + SUMMARY_QUESTION,)
    output = "text"
    output_format = "summary text"
    metrics = ("rouge",)
    generation_config = GenerationConfig(max_text_len=64)
    required_keys = ("text", "summary")

    def _encode(self, example, processor, rng, train):
        text = check_text(example["text"], self.name, "text")
        summary = check_text(example["summary"], self.name, "summary")
        ids = fit_pieces(processor, [processor.tokens(text), processor.tokens(f"question: {SUMMARY_QUESTION}")],
                         [False, True])
        prompt = f"{text} question: {SUMMARY_QUESTION}"
        return self.sample(processor, example, ids, None, processor.encode_target(summary), None, prompt=prompt,
                           gt={"summary": summary})

    def _decode(self, ids, image, meta, processor):
        return {"text": processor.decode_text(ids)}
