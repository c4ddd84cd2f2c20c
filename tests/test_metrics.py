"""Metric functions against hand-computed values and against rouge-score / sacrebleu used directly."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from peftlab.evaluation.metrics import (
    ROUGE_KEYS,
    accuracy,
    bleu_from_statistics,
    bleu_statistics,
    corpus_bleu,
    lead_n,
    macro_f1,
    mean_percent,
    per_label_f1,
    rouge_f1_per_example,
    rouge_l,
    rouge_l_per_example,
    rouge_scores,
    split_sentences,
)


def test_rouge_hand_computed():
    # pred/ref share "the" x2, "cat", "on", "mat" (5 of 6 unigrams); bigrams "the cat", "on the", "the mat" (3 of 5);
    # LCS "the cat on the mat" (5 of 6).
    scores = rouge_scores(["the cat sat on the mat"], [["the cat lay on the mat"]])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(60.0)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)
    assert scores["rougeLsum"] == pytest.approx(100 * 5 / 6)


def test_rouge_is_a_mean_over_examples():
    scores = rouge_scores(["the cat sat on the mat", "dogs bark"], [["the cat lay on the mat"], ["birds sing"]])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6 / 2)


def test_rouge_matches_rouge_score_with_stemming():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pred = "Police arrested two running suspects on Tuesday, officials said."
    ref = "two suspects were arrested by police\nofficials say the suspects ran"
    ours = rouge_scores([pred], [[ref]])
    direct = scorer.score(ref, pred)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours[key] == pytest.approx(100 * direct[key].fmeasure)
    assert 0 < ours["rouge1"] < 100


def test_rouge_multi_reference_takes_the_best_reference():
    scores = rouge_scores(["the cat sat on the mat"], [["dogs bark loudly", "the cat sat on the mat"]])
    assert scores["rouge1"] == pytest.approx(100.0)
    assert rouge_l(["the cat sat on the mat"], [["dogs bark loudly", "the cat lay on the mat"]]) == pytest.approx(
        100 * 5 / 6)


def test_rouge_lsum_splits_untokenized_predictions_into_sentences():
    # Summary-level LCS unions the matches of each prediction sentence: "gamma delta" and "alpha beta" both match the
    # reference sentence in full (4/4), while one flat sequence only matches 2 in order (rougeL = 50).
    scores = rouge_scores(["Gamma delta. Alpha beta."], [["alpha beta gamma delta."]])
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    assert scorer.score("alpha beta gamma delta.", "Gamma delta. Alpha beta.")["rougeLsum"].fmeasure == 0.5


def test_rouge_of_an_empty_prediction_is_zero():
    assert rouge_scores([""], [["the cat"]]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}


def test_split_sentences_prefers_newlines():
    assert split_sentences("First line. Still first.\n\nSecond line\n") == ["First line. Still first.", "Second line"]


def test_split_sentences_cased_prose_keeps_abbreviations_and_quotes():
    text = 'Mr. Smith met Dr. J. Jones in the U.S. capital. "I know this." Then he left! Really? Yes (see above.) OK'
    assert split_sentences(text) == [
        "Mr. Smith met Dr. J. Jones in the U.S. capital.", '"I know this."', "Then he left!", "Really?",
        "Yes (see above.)", "OK"]


def test_split_sentences_tokenized_text():
    # PTB-tokenized: only stand-alone "." ends a sentence ("l.l." does not); closing quotes stay with their sentence.
    text = ('in san jose , calif. , police said , l.l. doungal added . " there were thousands of them . " he said . '
            "obama said `` absolutely . '' it ended")
    assert split_sentences(text) == [
        "in san jose , calif. , police said , l.l. doungal added .", '" there were thousands of them . "', "he said .",
        "obama said `` absolutely . ''", "it ended"]


def test_split_sentences_cased_prose_with_stray_standalone_periods():
    # CNN/DM 3.0.0 DailyMail articles open with "By . Daily Mail Reporter ."; the prose after must still split.
    text = "By . Daily Mail Reporter . A man went home. He slept well. Then he woke up. It was late."
    assert split_sentences(text) == ["By .", "Daily Mail Reporter .", "A man went home.", "He slept well.",
                                     "Then he woke up.", "It was late."]


def test_lead_n_tokenized_and_cased():
    tokenized = "( cnn ) the u.s. team won . fans cheered loudly . the coach smiled . more followed ."
    assert lead_n(tokenized) == "( cnn ) the u.s. team won .\nfans cheered loudly .\nthe coach smiled ."
    cased = "(CNN)The U.S. team won. Fans cheered! Was the coach happy? He said so. More followed."
    assert lead_n(cased) == "(CNN)The U.S. team won.\nFans cheered!\nWas the coach happy?"
    assert lead_n(cased, n=1) == "(CNN)The U.S. team won."
    assert lead_n("One sentence only") == "One sentence only"
    with pytest.raises(ValueError, match="n must be > 0"):
        lead_n(cased, n=0)


def test_bleu_equals_sacrebleu_with_equal_reference_counts():
    preds = ["the cat is on the mat", "there is a dog in the park today", "hello world"]
    refs = [["the cat sat on the mat", "a cat is on the mat"],
            ["a dog is in the park", "there is a dog in a park"],
            ["hello there world", "hello world !"]]
    expected = sacrebleu.corpus_bleu(preds, [list(stream) for stream in zip(*refs, strict=True)]).score
    assert corpus_bleu(preds, refs) == pytest.approx(expected)
    assert 0 < expected < 100


def test_bleu_multi_reference_hand_computed():
    # Example 1 (one reference): c=6, r=6, n-gram matches 6/6, 5/5, 4/4, 3/3.
    # Example 2 (two references): "the dog ran" is matched in full by the second reference; closest reference length
    # to c=3 is 4 (not 6): 3/3, 2/2, 1/1, 0/0.
    # Corpus: all precisions 1, c=9, r=10 -> BLEU = 100 * exp(1 - 10/9).
    preds = ["the cat sat on the mat", "the dog ran"]
    refs = [["the cat sat on the mat"], ["a dog ran in a park", "the dog ran fast"]]
    assert corpus_bleu(preds, refs) == pytest.approx(100 * math.exp(1 - 10 / 9))


def test_bleu_variable_reference_counts_match_repeating_a_reference():
    # Repeating one of an example's references changes neither its clipped counts nor its closest length, so the
    # None-padded score must equal sacrebleu's equal-count score on references padded by repetition. The short last
    # prediction catches padding with "" instead: a zero-length reference would be its closest length.
    preds = ["a cheap pub near the river", "the blue fox serves french food", "it is family friendly", "the"]
    refs = [["a cheap pub by the river"], ["the blue fox is a french place", "blue fox serves food", "a fox"],
            ["it is not family friendly", "kids are welcome"], ["the cat sat on the mat"]]
    repeated = [r + [r[-1]] * (3 - len(r)) for r in refs]
    expected = sacrebleu.corpus_bleu(preds, [list(s) for s in zip(*repeated, strict=True)]).score
    assert corpus_bleu(preds, refs) == pytest.approx(expected)
    empty_padded = [r + [""] * (3 - len(r)) for r in refs]
    wrong = sacrebleu.corpus_bleu(preds, [list(s) for s in zip(*empty_padded, strict=True)]).score
    assert wrong != pytest.approx(expected)


def test_accuracy_and_macro_f1_hand_computed():
    preds = ["a", "a", "b", "b", "c"]
    golds = ["a", "b", "b", "b", "c"]
    assert accuracy(preds, golds) == pytest.approx(80.0)
    # F1(a) = 2*1/(2+1+0) = 2/3; F1(b) = 2*2/(4+0+1) = 4/5; F1(c) = 1.
    assert per_label_f1(preds, golds, ["a", "b", "c"]) == pytest.approx({"a": 200 / 3, "b": 80.0, "c": 100.0})
    assert macro_f1(preds, golds, ["a", "b", "c"]) == pytest.approx((200 / 3 + 80 + 100) / 3)
    # A label in the set that is neither predicted nor gold counts as 0 (scikit-learn's convention).
    assert macro_f1(preds, golds, ["a", "b", "c", "d"]) == pytest.approx((200 / 3 + 80 + 100) / 4)


def test_constant_prediction_has_half_macro_f1_ceiling():
    preds = ["positive"] * 4
    golds = ["positive", "positive", "negative", "negative"]
    assert accuracy(preds, golds) == 50.0
    assert macro_f1(preds, golds, ["negative", "positive"]) == pytest.approx((0 + 100 * 2 / 3) / 2)


@pytest.mark.parametrize("fn", [rouge_scores, rouge_l, corpus_bleu])
def test_mismatched_or_empty_inputs_raise(fn):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        fn(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        fn([], [])
    with pytest.raises(ValueError, match="example 0 has no references"):
        fn(["a"], [[]])


def test_classification_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="1 predictions but 2"):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty label set"):
        macro_f1(["a"], ["a"], [])


# --- per-example scores (paired significance) ----------------------------------------------------------------------

E2E_PREDS = ["The Eagle is a cheap coffee shop near Burger King in the riverside area.",
             "Fitzbillies is a family friendly Italian restaurant with a high customer rating.",
             "Near the river.",  # short: the brevity penalty and missing 4-grams
             "",  # nothing generated
             "Blue Spice serves Chinese food in the city centre and is not family-friendly, costing more than £30."]
E2E_REFS = [["The Eagle coffee shop is cheap and near Burger King by the riverside.",
             "In the riverside area, near Burger King, is The Eagle, a cheap coffee shop.",
             "The Eagle is a low-priced coffee shop near Burger King in riverside."],
            ["Fitzbillies is a highly rated, kid friendly Italian restaurant."],
            ["The Mill is a pub near the river.", "Near the river is The Mill pub."],
            ["Alimentum serves English food."],
            ["Blue Spice is an expensive Chinese restaurant in the city centre. It is not family-friendly.",
             "In the city centre is Blue Spice, a Chinese place that is not kid friendly and costs over £30.",
             "Blue Spice, a Chinese restaurant in the centre, is not family-friendly.",
             "Chinese food costing more than £30 at Blue Spice in the city centre; no families."]]


def _old_rouge_scores(preds, refs_list):
    """The mean ROUGE loop as it was before per-example scores existed (the reference for bit-identical means)."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, refs in zip(preds, refs_list, strict=True):
        best = scorer.score_multi(["\n".join(split_sentences(r)) for r in refs], "\n".join(split_sentences(pred)))
        for key in ROUGE_KEYS:
            totals[key] += best[key].fmeasure
    return {key: 100.0 * total / len(preds) for key, total in totals.items()}


def test_mean_rouge_is_bit_identical_to_the_old_loop_and_the_mean_of_per_example_scores():
    preds = E2E_PREDS + ["Police arrested two suspects. They were released on Tuesday."]
    refs = E2E_REFS + [["Two suspects were arrested by police.\nBoth were released Tuesday."]]
    assert rouge_scores(preds, refs) == _old_rouge_scores(preds, refs)  # exact, not approx
    per_example = rouge_f1_per_example(preds, refs)
    assert sorted(per_example) == sorted(ROUGE_KEYS) and all(len(v) == len(preds) for v in per_example.values())
    assert rouge_scores(preds, refs)["rougeL"] == mean_percent(per_example["rougeL"])
    old_rouge_l = 100.0 * sum(max(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(r, p)["rougeL"]
                                  .fmeasure for r in rs) for p, rs in zip(preds, refs, strict=True)) / len(preds)
    assert rouge_l(preds, refs) == pytest.approx(old_rouge_l, abs=1e-12)
    assert rouge_l(preds, refs) == mean_percent(rouge_l_per_example(preds, refs))


def test_bleu_from_summed_statistics_is_sacrebleus_corpus_bleu():
    stats = bleu_statistics(E2E_PREDS, E2E_REFS)
    assert len(stats) == len(E2E_PREDS) and all(len(row) == 10 and all(isinstance(v, int) for v in row)
                                                 for row in stats)
    assert stats[3][0] == 0 and stats[2][5] == 0  # nothing generated; "Near the river ." matches no 4-gram
    width = max(len(r) for r in E2E_REFS)
    streams = [[r[k] if k < len(r) else None for r in E2E_REFS] for k in range(width)]
    for subset in (range(5), [0, 1], [2, 3], [4], [0, 2, 4], [3]):
        preds, refs = [E2E_PREDS[i] for i in subset], [E2E_REFS[i] for i in subset]
        summed = [sum(stats[i][k] for i in subset) for k in range(10)]
        assert bleu_from_statistics(summed) == corpus_bleu(preds, refs)  # exact
    expected = sacrebleu.corpus_bleu(E2E_PREDS, streams).score
    assert bleu_from_statistics([sum(col) for col in zip(*stats, strict=True)]) == expected
    assert 0 < expected < 100
    with pytest.raises(ValueError, match="expected 10 statistics"):
        bleu_from_statistics([1, 2, 3])
