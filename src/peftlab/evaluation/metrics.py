"""Pure metric functions: lists of strings in, floats out (percentages, 0-100).

* ROUGE-1/2/L/Lsum F1 with Google's ``rouge-score`` (Porter stemming; ``rougeLsum`` is the summary-level LCS over
  sentences, which ``rouge-score`` reads as newline-separated lines, so both sides are split into sentences first).
* Corpus BLEU with ``sacrebleu`` against every reference of every example (variable reference counts supported).
* Per-example scores for paired significance tests: ROUGE F1 of each example (the means above are their means) and
  each example's BLEU sufficient statistics (corpus BLEU is a function of their sums).
* Accuracy and macro-F1 for classification.
* ``split_sentences`` / ``lead_n``: a dependency-free sentence splitter (no NLTK data downloads) that handles both
  cased prose (``"... of us. I also ..."``) and PTB-tokenized text (``"... of them . many ..."``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.metrics.bleu import BLEU

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BLEU_ORDER = 4  # n-gram orders of BLEU (sacrebleu's default)

# Words that end with a period without ending a sentence (compared lowercased, without the period).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft gen col lt sgt capt cpl maj adm gov sen rep pres rev hon vs etc inc ltd co "
    "corp bros no nos vol fig approx est dept univ jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_TERMINAL = re.compile(r"^[.!?]+$")  # a stand-alone sentence end in PTB-tokenized text: "." "!" "?!" "..."
_ENDS_SENTENCE = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*$")  # "us." 'messenger."' "(see above.)"
_TRAILING = re.compile(r"[\"'\u201d\u2019)\]]+$")  # closing quotes/brackets after a sentence end
_CLOSERS = frozenset({"''", "'", ")", "]", "-rrb-", "\u201d", "\u2019"})  # tokens that still belong to the sentence


def _check_lengths(preds: Sequence[str], refs: Sequence[object], what: str) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{what}: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError(f"{what}: no predictions to score")


def _is_abbreviation(word: str) -> bool:
    """True for words whose final period is not a sentence end: titles, initials ("J."), initialisms ("u.s.")."""
    if not _TRAILING.sub("", word).endswith("."):
        return False  # "!" and "?" always end a sentence
    core = _TRAILING.sub("", word).rstrip(".").lstrip("\"'(\u201c\u2018[")
    return core.lower() in _ABBREVIATIONS or len(core) == 1 or "." in core


def _closes_previous(token: str, previous: str) -> bool:
    """A closing quote/bracket token right after a sentence end belongs to that sentence.

    The ASCII ``"`` of tokenized CNN/DM train/validation text opens and closes quotes alike: it closes the previous
    sentence only when that sentence has an odd number of ``"`` tokens (an open quote).
    """
    if token == '"':
        return previous.split().count('"') % 2 == 1
    return token.lower() in _CLOSERS


def split_sentences(text: str) -> list[str]:
    """Split text into sentences without any model or downloaded data.

    Newlines win when present (CNN/DM highlights are one sentence a line). Otherwise, PTB-tokenized text (most sentence
    ends are stand-alone ``.`` tokens) ends a sentence only at stand-alone ``.``/``!``/``?`` tokens, absorbing closing
    quote/bracket tokens that follow; untokenized prose ends a sentence at a word ending in ``.``/``!``/``?``
    (optionally followed by closing quotes/brackets), unless the word is an abbreviation or an initial.

    Args:
        text: any text.

    Returns:
        The non-empty sentences, whitespace-normalized (tokens joined by single spaces).
    """
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > 1:
        return lines
    tokens = text.split()
    # PTB-tokenized text ends most sentences with stand-alone "." tokens; cased prose may have a few stray ones
    # (CNN/DM 3.0.0 has "By . Daily Mail Reporter ."), so the majority decides.
    standalone = sum(_TERMINAL.match(token) is not None for token in tokens)
    attached = sum(len(token) > 1 and _ENDS_SENTENCE.search(token) is not None and not _is_abbreviation(token)
                   and _TERMINAL.match(token) is None for token in tokens)
    tokenized = standalone > attached
    sentences: list[str] = []
    current: list[str] = []
    for i, token in enumerate(tokens):
        if not current and sentences and _closes_previous(token, sentences[-1]):
            sentences[-1] += " " + token  # a closing quote/bracket after the end belongs to the previous sentence
            continue
        current.append(token)
        if tokenized:
            ends = _TERMINAL.match(token) is not None
        else:
            ends = _ENDS_SENTENCE.search(token) is not None and not _is_abbreviation(token)
        if ends or i == len(tokens) - 1:
            sentences.append(" ".join(current))
            current = []
    return sentences


def lead_n(article: str, n: int = 3) -> str:
    """The first ``n`` sentences of ``article``, one a line (the lead-n summarization baseline).

    Args:
        article: the article text (cased prose or PTB-tokenized).
        n: how many sentences to keep.

    Returns:
        The sentences joined by ``"\\n"`` (the form ``rougeLsum`` expects).
    """
    if n <= 0:
        raise ValueError(f"lead_n: n must be > 0, got {n}")
    return "\n".join(split_sentences(article)[:n])


def _one_sentence_per_line(text: str) -> str:
    return "\n".join(split_sentences(text))


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge_f1_per_example(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """ROUGE-1/2/L/Lsum F1 of each example, in [0, 1]; with several references, each key takes the best one.

    Args:
        preds: one prediction per example.
        refs_list: the references of each example (at least one each).

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rougeLsum"}`` -> one F1 per example, in order.
    """
    _check_lengths(preds, refs_list, "rouge_scores")
    scorer = _rouge_scorer()
    scores: dict[str, list[float]] = {key: [] for key in ROUGE_KEYS}
    for i, (pred, refs) in enumerate(zip(preds, refs_list, strict=True)):
        if not refs:
            raise ValueError(f"rouge_scores: example {i} has no references")
        # rougeLsum reads sentences as lines: split both sides the same way.
        targets = [_one_sentence_per_line(ref) for ref in refs]
        best = scorer.score_multi(targets, _one_sentence_per_line(pred))
        for key in ROUGE_KEYS:
            scores[key].append(best[key].fmeasure)
    return scores


def mean_percent(values: Sequence[float]) -> float:
    """100 x the mean of per-example scores in [0, 1] (summed in order, so a mean is reproducible bit for bit)."""
    return 100.0 * sum(values) / len(values)


def rouge_scores(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 (x100): the mean of :func:`rouge_f1_per_example`.

    Args:
        preds: one prediction per example.
        refs_list: the references of each example (at least one each).

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rougeLsum"}`` -> mean F1 in [0, 100].
    """
    return {key: mean_percent(values) for key, values in rouge_f1_per_example(preds, refs_list).items()}


def rouge_l_per_example(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> list[float]:
    """ROUGE-L F1 of each example against its best reference, in [0, 1].

    Args:
        preds: one prediction per example.
        refs_list: the references of each example (at least one each).

    Returns:
        One F1 per example, in order.
    """
    _check_lengths(preds, refs_list, "rouge_l")
    scorer = _rouge_scorer()
    scores = []
    for i, (pred, refs) in enumerate(zip(preds, refs_list, strict=True)):
        if not refs:
            raise ValueError(f"rouge_l: example {i} has no references")
        scores.append(max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs))
    return scores


def rouge_l(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F1 (x100), the best reference of each example: the mean of :func:`rouge_l_per_example`."""
    return mean_percent(rouge_l_per_example(preds, refs_list))


def _reference_streams(refs_list: Sequence[Sequence[str]], what: str) -> list[list[str | None]]:
    """sacrebleu's reference streams (stream k = the k-th reference of every example), padded with ``None``."""
    for i, refs in enumerate(refs_list):
        if not refs:
            raise ValueError(f"{what}: example {i} has no references")
    width = max(len(refs) for refs in refs_list)
    return [[refs[k] if k < len(refs) else None for refs in refs_list] for k in range(width)]


def corpus_bleu(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exp smoothing) against all references of each example.

    sacrebleu takes reference *streams* of equal length (stream k = the k-th reference of every example). Examples
    with fewer references are padded with ``None``, which sacrebleu drops per segment; an empty string would instead
    count as a zero-length reference and distort the brevity penalty (closest reference length).

    Args:
        preds: one prediction per example.
        refs_list: the references of each example (at least one each, any number).

    Returns:
        BLEU in [0, 100].
    """
    _check_lengths(preds, refs_list, "corpus_bleu")
    return float(sacrebleu.corpus_bleu(list(preds), _reference_streams(refs_list, "corpus_bleu")).score)


@lru_cache(maxsize=1)
def _bleu() -> BLEU:
    return BLEU()  # sacrebleu's corpus_bleu defaults: 13a tokenization, 'exp' smoothing, n-grams up to 4


def bleu_statistics(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> list[list[int]]:
    """sacrebleu's sufficient statistics of each example: ``[sys_len, ref_len, correct1..4, total1..4]``.

    Corpus BLEU is a function of these statistics summed over the examples (:func:`bleu_from_statistics`), so a
    resample of the examples is scored by summing its rows. Each example is scored as a one-segment corpus against
    its own references, exactly as :func:`corpus_bleu` scores that segment.

    Args:
        preds: one prediction per example.
        refs_list: the references of each example (at least one each, any number).

    Returns:
        One list of 10 integers per example.
    """
    _check_lengths(preds, refs_list, "bleu_statistics")
    _reference_streams(refs_list, "bleu_statistics")  # the same checks as corpus_bleu
    bleu = _bleu()
    rows = []
    for pred, refs in zip(preds, refs_list, strict=True):
        score = bleu.corpus_score([pred], [[ref] for ref in refs])
        rows.append([int(score.sys_len), int(score.ref_len), *map(int, score.counts), *map(int, score.totals)])
    return rows


def bleu_from_statistics(summed: Sequence[int]) -> float:
    """Corpus BLEU from summed :func:`bleu_statistics` rows (sacrebleu's own formula with 'exp' smoothing).

    Args:
        summed: ``[sys_len, ref_len, correct1..4, total1..4]`` summed over the examples.

    Returns:
        BLEU in [0, 100], equal to :func:`corpus_bleu` of those examples.
    """
    if len(summed) != 2 + 2 * BLEU_ORDER:
        raise ValueError(f"bleu_from_statistics: expected {2 + 2 * BLEU_ORDER} statistics, got {len(summed)}")
    values = [int(v) for v in summed]
    return float(BLEU.compute_bleu(correct=values[2:2 + BLEU_ORDER], total=values[2 + BLEU_ORDER:],
                                   sys_len=values[0], ref_len=values[1], smooth_method="exp").score)


def accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Share of exact matches, x100."""
    _check_lengths(preds, golds, "accuracy")
    return 100.0 * sum(p == g for p, g in zip(preds, golds, strict=True)) / len(preds)


def per_label_f1(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """F1 of each label, x100: 2 TP / (2 TP + FP + FN); 0 when the label is neither predicted nor gold."""
    _check_lengths(preds, golds, "per_label_f1")
    scores = {}
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(preds, golds, strict=True))
        fp = sum(p == label and g != label for p, g in zip(preds, golds, strict=True))
        fn = sum(p != label and g == label for p, g in zip(preds, golds, strict=True))
        scores[label] = 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return scores


def macro_f1(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of the per-label F1 over ``labels`` (as scikit-learn's ``f1_score(average="macro")``), x100.

    Args:
        preds: predicted labels.
        golds: gold labels.
        labels: the label set averaged over (a label absent from both sides scores 0, as in scikit-learn).

    Returns:
        Macro-F1 in [0, 100].
    """
    if not labels:
        raise ValueError("macro_f1: empty label set")
    scores = per_label_f1(preds, golds, labels)
    return sum(scores.values()) / len(labels)
