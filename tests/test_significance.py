"""Paired significance between cells: bootstrap intervals and p-values, McNemar's exact test, Holm, vectorised
BLEU, id alignment, the report's Significance section, and per-example records written by a real compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from peftlab.evaluation.metrics import bleu_from_statistics, macro_f1
from peftlab.lab.report import write_report
from peftlab.lab.report_runs import group_runs, load_runs
from peftlab.lab.significance import (
    SignificanceError,
    available_metrics,
    bleu_from_sums,
    cell_interval,
    compare_cells,
    holm,
    make_cell,
    mcnemar_exact,
    paired_bootstrap,
    significance_blocks,
)
from peftlab.tasks.base import pack_records


def _ids(n: int) -> list[str]:
    return [f"test-{i}" for i in range(n)]


def _classifier(label: str, correct: np.ndarray, gold: np.ndarray | None = None) -> dict:
    """A seed's records for a two-label task: ``correct`` (bool per example) decides the prediction."""
    gold = gold if gold is not None else np.arange(len(correct)) % 2
    predicted = np.where(correct, gold, 1 - gold)
    return {"ids": _ids(len(correct)), "predicted": predicted.tolist(), "gold": gold.tolist(), "labels": ["a", "b"]}


# ------------------------------------------------------------------------------------------------- the tests


def test_bootstrap_interval_covers_the_true_difference():
    # 40 synthetic test sets where cell A is right with p=0.75 and B with p=0.65 (true difference 10 points,
    # correlated through a shared difficulty): the 95% interval should cover 10 in about 38 of them.
    rng = np.random.default_rng(1)
    covered, rejected = 0, 0
    for _ in range(40):
        hard = rng.random(400) < 0.3
        right_a = rng.random(400) < np.where(hard, 0.75 - 0.35, 0.75 + 0.15)
        right_b = rng.random(400) < np.where(hard, 0.65 - 0.35, 0.65 + 0.15)
        c = paired_bootstrap(make_cell("A", [_classifier("A", right_a)]), make_cell("B", [_classifier("B", right_b)]),
                             "accuracy", resamples=400)
        assert c.difference == pytest.approx(100 * (right_a.mean() - right_b.mean()))
        covered += c.low <= 10.0 <= c.high
        rejected += c.p_bootstrap <= 0.05
    assert 34 <= covered <= 40
    assert rejected >= 25  # a 10-point difference on 400 examples is usually detected


def test_identical_cells_differ_by_zero_with_p_one():
    records = _classifier("A", np.arange(50) % 3 > 0)
    c = paired_bootstrap(make_cell("A", [records]), make_cell("B", [records]), "accuracy", resamples=200)
    assert (c.difference, c.low, c.high, c.p_bootstrap, c.p_mcnemar) == (0.0, 0.0, 0.0, 1.0, 1.0)


def test_mcnemar_exact_by_hand():
    # 1 vs 8 discordant pairs: P(X <= 1) = (C(9,0) + C(9,1)) / 2^9 = 10/512; two-sided: 20/512.
    assert mcnemar_exact(1, 8) == 20 / 512 == mcnemar_exact(8, 1)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 5) == 2 / 32
    assert 0 < mcnemar_exact(900, 1100) < 1e-5  # a large n stays exact (integer arithmetic), no overflow
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 2)


def test_compare_cells_uses_mcnemar_for_single_seed_accuracy():
    right_a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)
    right_b = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=bool)  # A alone right 7x, B alone 1x
    a, b = make_cell("A", [_classifier("A", right_a)]), make_cell("B", [_classifier("B", right_b)])
    c = paired_bootstrap(a, b, "accuracy", resamples=300)
    assert c.p_mcnemar == mcnemar_exact(7, 1) and c.p == c.p_mcnemar
    assert c.difference == pytest.approx(100 * 6 / 12)
    two_seeds = make_cell("A2", [_classifier("A", right_a), _classifier("A", right_b)])
    assert paired_bootstrap(two_seeds, b, "accuracy", resamples=300).p_mcnemar is None  # not a single seed


def test_holm_adjustment_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.06 for the last.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_multi_seed_cells_pool_seeds_and_macro_f1_matches_the_metric():
    rng = np.random.default_rng(0)
    seeds = [_classifier("A", rng.random(60) < 0.7) for _ in range(3)]
    cell = make_cell("A", seeds)
    accuracies = [100 * np.mean(np.array(s["predicted"]) == np.array(s["gold"])) for s in seeds]
    assert cell_interval(cell, "accuracy", resamples=100).value == pytest.approx(np.mean(accuracies))
    one = make_cell("one", seeds[:1])
    names = ["a", "b"]
    expected = macro_f1([names[p] for p in seeds[0]["predicted"]], [names[g] for g in seeds[0]["gold"]], names)
    interval = cell_interval(one, "macro_f1", resamples=200)
    assert interval.value == pytest.approx(expected) and interval.low <= expected <= interval.high
    assert available_metrics(cell) == ["accuracy", "macro_f1"]


def test_vectorised_bleu_matches_sacrebleus_formula():
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(300):  # segment statistics like sacrebleu's: totals fall by one per order, correct <= total
        length = int(rng.integers(0, 12))
        total = [max(length - k, 0) for k in range(4)]
        correct = [int(rng.integers(0, t + 1)) if t else 0 for t in total]
        rows.append([length, int(rng.integers(1, 14)), *correct, *total])
    stats = np.array(rows, dtype=np.float64)
    for subset in [rng.choice(300, size=size) for size in (1, 2, 5, 40, 300)] + [np.array([0])]:
        summed = stats[subset].sum(axis=0)
        assert float(bleu_from_sums(summed)) == pytest.approx(bleu_from_statistics(summed.astype(int)), abs=1e-9)
    batch = np.stack([stats[rng.choice(300, size=30)].sum(axis=0) for _ in range(50)])
    expected = [bleu_from_statistics(row.astype(int)) for row in batch]
    assert bleu_from_sums(batch) == pytest.approx(expected, abs=1e-9)


def test_bleu_and_rouge_cells_compare_on_packed_records():
    rng = np.random.default_rng(5)
    n = 80
    stats = [[int(v) for v in [12, 12, 9, 6, 4, 2, 12, 11, 10, 9] + rng.integers(0, 2, 10)] for _ in range(n)]
    worse = [[row[0], row[1], max(row[2] - 3, 0), max(row[3] - 3, 0), 0, 0, *row[6:]] for row in stats]
    a = make_cell("A", [{"ids": _ids(n), **pack_records({"bleu_stats": stats, "rougeL": [50.0] * n})}])
    b = make_cell("B", [{"ids": _ids(n), **pack_records({"bleu_stats": worse, "rougeL": [40.5] * n})}])
    c = paired_bootstrap(a, b, "bleu", resamples=300)
    expected = bleu_from_statistics(np.sum(stats, axis=0)) - bleu_from_statistics(np.sum(worse, axis=0))
    assert c.difference == pytest.approx(expected) and c.low > 0 and c.p_bootstrap < 0.01
    rouge = paired_bootstrap(a, b, "rougeL", resamples=100)
    assert (rouge.difference, rouge.low, rouge.high) == pytest.approx((9.5, 9.5, 9.5))


def test_cells_are_paired_by_id_and_other_examples_are_a_clear_error():
    right = np.arange(30) % 4 > 0
    records = _classifier("A", right)
    order = np.random.default_rng(2).permutation(30)
    shuffled = {"ids": [records["ids"][i] for i in order], "predicted": [records["predicted"][i] for i in order],
                "gold": [records["gold"][i] for i in order], "labels": ["a", "b"]}
    other = _classifier("B", ~right)
    same = paired_bootstrap(make_cell("A", [records]), make_cell("B", [other]), "accuracy", resamples=100)
    moved = paired_bootstrap(make_cell("A", [shuffled]), make_cell("B", [other]), "accuracy", resamples=100)
    assert (moved.difference, moved.p_mcnemar) == (same.difference, same.p_mcnemar)
    fewer = {key: value[:20] if isinstance(value, list) and key != "labels" else value for key, value in other.items()}
    with pytest.raises(SignificanceError, match=r"B was scored on other test examples than A \(20 vs 30 examples; "
                                                r"0 ids only in B.*10 only in A, e\.g\. \['test-20'"):
        paired_bootstrap(make_cell("A", [records]), make_cell("B", [fewer]), "accuracy")
    with pytest.raises(SignificanceError, match=r"A \(seed 2\) was scored on other test examples than A \(seed 1\)"):
        make_cell("A", [records, fewer])
    with pytest.raises(SignificanceError, match="'predicted' has 3 values for 30 ids"):
        make_cell("A", [{**records, "predicted": [0, 1, 0]}])
    with pytest.raises(SignificanceError, match="no per-example records for 'bleu'"):
        compare_cells([make_cell("A", [records]), make_cell("B", [other])], "bleu")


# ------------------------------------------------------------------------------------------------- the report


def _result(task_dir: Path, method: str, n: int, seed: int, right: np.ndarray | None) -> None:
    """A minimal grid result file (classification), with per-example records unless ``right`` is None."""
    stem = f"{method}--default--n{n}--seed{seed}"
    accuracy = 100 * float(right.mean()) if right is not None else 60.0 + seed
    data = {"metrics": {"test": {"accuracy": accuracy, "n_examples": 200}},
            "grid": {"method": method, "variant": "default", "n_train": n, "seed": seed}}
    if right is not None:
        data["per_example"] = {"test": {**pack_records(_classifier(method, right))}}
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / f"{stem}.json").write_text(json.dumps(data, indent=2))


def _results(root: Path) -> Path:
    rng = np.random.default_rng(7)
    quality = {"zero-shot": 0.5, "lora": 0.85, "bitfit": 0.84, "last-layer": 0.7}
    for method, p in quality.items():
        for seed in ([0] if method == "zero-shot" else [0, 1]):
            _result(root / "classification", method, 0 if method == "zero-shot" else 16, seed, rng.random(200) < p)
    for method in ("lora", "bitfit"):  # results written before per-example records existed
        _result(root / "old-classification", method, 16, 0, None)
    return root


def test_report_has_a_significance_section_and_says_when_it_is_omitted(tmp_path):
    root = _results(tmp_path)
    md, _page = write_report(root, tmp_path / "out")
    text = md.read_text()
    new, old = text.split("## Task: old-classification")[0], text.split("## Task: old-classification")[1]
    assert "### Significance (test split)" in new and "#### N=16 (and the baselines)" in new
    assert "Holm" in new and "McNemar" in new and "accuracy 95% CI (examples)" in new
    assert "| lora | bitfit |" in new and "n.s." in new and "| significant |" in new  # lora vs zero-shot is
    assert "| lora | zero-shot |" in new
    assert "Omitted: none of these result files holds per-example scores" in old
    assert "95% CI (examples)" not in old
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<h3 id=\"significance-test-split\">Significance (test split)</h3>" in html and "n.s." in html


def test_sweep_heatmaps_show_each_cells_interval_over_examples(tmp_path, monkeypatch):
    from peftlab.lab import plots

    rng, task = np.random.default_rng(3), tmp_path / "classification"
    for variant, n, p in [("d0", 16, 0.7), ("d0", 64, 0.8), ("d1", 16, 0.6), ("d1", 64, 0.9)]:
        right = rng.random(200) < p
        _result(task, "lora", n, 0, right)
        path = task / f"lora--default--n{n}--seed0.json"
        data = json.loads(path.read_text())
        data["grid"]["variant"] = variant
        (task / f"lora--{variant}--n{n}--seed0.json").write_text(json.dumps(data))
        path.unlink()
    drawn = {}

    def heatmap(rows, cols, values, *args, intervals=None, **kwargs):
        drawn.update(rows=rows, cols=cols, values=values, intervals=intervals)
        return None

    monkeypatch.setattr(plots, "heatmap", heatmap)
    write_report(tmp_path, tmp_path / "out")
    assert drawn["rows"] == ["d0", "d1"] and drawn["cols"] == ["16", "64"]
    for values, intervals in zip(drawn["values"], drawn["intervals"], strict=True):
        for value, (low, high) in zip(values, intervals, strict=True):
            assert low < value < high and high - low < 20  # a 95% interval over 200 examples of one seed


def test_significance_blocks_leave_out_old_cells_and_name_them(tmp_path):
    root = _results(tmp_path)
    _result(root / "classification", "ia3", 16, 0, None)  # one old cell among new ones
    groups = group_runs(load_runs(root))["classification"]
    blocks = significance_blocks(groups, "test", ["accuracy", "macro_f1"], resamples=200)
    texts = [getattr(b, "text", "") for b in blocks]
    assert any("Left out of the comparisons: ia3 N=16 (no per-example scores" in t for t in texts)
    tables = [b for b in blocks if hasattr(b, "rows")]
    versus_best, pairwise = tables
    assert [row[0] for row in versus_best.rows][0] == "lora" and versus_best.rows[0][3] == "best"
    # McNemar needs two single-seed cells; only zero-shot has one seed here.
    assert len(pairwise.rows) == math.comb(4, 2) and "p (McNemar)" not in pairwise.headers


# ------------------------------------------------------------------------------------------------- real runs


def test_compare_writes_per_example_records_and_lead3_keeps_them(tiny_llama_dir, tmp_path):
    import gzip

    from peftlab.lab.compare import plan, run_grid
    from peftlab.lab.compare_grid import parse_grid

    data = tmp_path / "news"
    data.mkdir()
    rows = [{"id": f"n{i}", "article": f"Story {i} begins here. It goes on. Then it ends. A fourth line follows.",
             "summary": f"Story {i} begins. It ends."} for i in range(3)]
    for split in ("train", "validation", "test"):
        with gzip.open(data / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    grid = {"model": {"name": str(tiny_llama_dir)}, "task": {"name": "summarization"}, "methods": [],
            "data": {"path": str(data), "max_validation": 2, "max_test": 3}, "eval": {"max_new_tokens": 4},
            "results": str(tmp_path / "results"), "name": "t"}
    zero_shot, lead3 = run_grid(plan(parse_grid(grid, "grid.yaml")))
    records = zero_shot.records_of("test")
    assert records.ids == ["n0", "n1", "n2"] and set(records.records) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert lead3.records_of("test").flat() == {"ids": records.ids, **records.baselines["lead-3"]}
    saved = json.loads((tmp_path / "results" / "t" / "lead-3--default--n0--seed0.json").read_text())
    cell = make_cell("lead-3", [saved["per_example"]["test"]])
    assert cell_interval(cell, "rouge1", resamples=50).value == pytest.approx(
        lead3.metric("test", "rouge1"), abs=1e-4)


def test_demo_data_zero_shot_records_bleu_statistics_that_reproduce_its_bleu(tiny_llama_dir, tmp_path):
    from peftlab.lab.compare import plan, run_grid
    from peftlab.lab.compare_grid import parse_grid

    grid = {"model": {"name": str(tiny_llama_dir)}, "task": {"name": "table-to-text"}, "methods": [],
            "data": {"path": "demo", "max_validation": 2, "max_test": 4}, "eval": {"max_new_tokens": 6},
            "results": str(tmp_path / "results"), "name": "t"}
    (zero_shot,) = run_grid(plan(parse_grid(grid, "grid.yaml")))
    saved = json.loads((tmp_path / "results" / "t" / "zero-shot--default--n0--seed0.json").read_text())
    assert saved["per_example"] == zero_shot.to_dict()["per_example"] and len(saved["per_example"]["test"]["ids"]) == 4
    cell = make_cell("zero-shot", [saved["per_example"]["test"]])
    assert available_metrics(cell) == ["rougeL", "bleu"]
    summed = cell.seeds[0]["bleu_stats"].sum(axis=0).astype(int)
    assert bleu_from_statistics(summed) == pytest.approx(saved["metrics"]["test"]["bleu"], abs=1e-9)


def test_train_and_classification_eval_write_per_example_records(tiny_llama_dir, tmp_path):
    import gzip

    from peftlab.config import load_config
    from peftlab.lab.experiment import eval_run, train_run

    fast = ["data.max_validation=2", "data.max_test=3", "train.max_steps=1", "train.batch_size=2",
            "train.eval_examples=0", "eval.max_new_tokens=4"]
    trained = train_run(load_config(None, [f"model={tiny_llama_dir}", "task=table-to-text", "data=demo",
                                           f"out={tmp_path / 'lora'}", "method=lora", *fast]))
    records = json.loads((tmp_path / "lora" / "result.json").read_text())["per_example"]["test"]
    assert records == trained.records_of("test").to_dict() and len(records["ids"]) == 3
    data = tmp_path / "reviews"
    data.mkdir()
    rows = [{"id": f"r{i}", "text": f"review {i}", "label": "positive" if i % 2 else "negative"} for i in range(6)]
    for split in ("train", "validation", "test"):
        with gzip.open(data / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    result = eval_run(load_config(None, [f"model={tiny_llama_dir}", "task=classification", f"data={data}",
                                         f"out={tmp_path / 'zs'}"]))
    cell = make_cell("zero-shot", [result.records_of("test")])
    assert cell.ids == [f"r{i}" for i in range(6)] and cell.n_labels == 2
    assert list(cell.seeds[0]["gold"]) == [0, 1, 0, 1, 0, 1]  # labels sorted: negative, positive
    assert cell_interval(cell, "accuracy", resamples=50).value == pytest.approx(result.metric("test", "accuracy"))


def test_a_baseline_read_from_another_runs_metrics_is_compared_with_its_records(tmp_path):
    from peftlab.lab.report_runs import add_embedded_baselines

    folder = tmp_path / "summarization"
    folder.mkdir()
    ids, rng = _ids(50), np.random.default_rng(4)
    for method, n, level in (("zero-shot", 0, 20.0), ("lora", 16, 30.0)):
        records = {"ids": ids, **pack_records({"rougeL": np.round(rng.normal(level, 5, 50), 4).tolist()})}
        metrics = {"rougeL": level, "n_examples": 50}
        if method == "zero-shot":  # lead-3 scored inside the zero-shot run, no lead-3 file of its own
            records["baselines"] = {"lead-3": pack_records({"rougeL": np.round(rng.normal(25, 5, 50), 4).tolist()})}
            metrics["baselines"] = {"lead-3": {"rougeL": 25.0}}
        data = {"metrics": {"test": metrics}, "per_example": {"test": records},
                "grid": {"method": method, "variant": "default", "n_train": n, "seed": 0}}
        (folder / f"{method}--default--n{n}--seed0.json").write_text(json.dumps(data))
    groups = group_runs(load_runs(tmp_path))["summarization"]
    add_embedded_baselines(groups, "test")
    blocks = significance_blocks(groups, "test", ["rougeL"], resamples=200)
    versus_best = next(b for b in blocks if hasattr(b, "rows"))
    assert [row[0] for row in versus_best.rows] == ["lora", "lead-3", "zero-shot"]


def test_a_large_table_gets_resamples_enough_to_pass_holms_correction():
    """With 1,000 resamples the bootstrap's p floor is 1/1001; over 153 pairs (18 cells, the E2E grid) Holm's
    correction multiplies it past 0.05, and no pair, however different, could be significant."""
    from peftlab.lab.significance import resamples_for

    assert resamples_for(9) == 1000  # 36 pairs: 36/1001 < 0.05, the default suffices (IMDB's tables)
    assert resamples_for(18) == 6120  # 153 pairs
    for cells in (2, 9, 18, 40):
        pairs = cells * (cells - 1) // 2
        assert pairs / (resamples_for(cells) + 1) <= 0.05


def test_the_summarys_interval_uses_its_significance_tables_resamples(tmp_path):
    """A table large enough for more resamples (11 cells, 55 pairs: 2,200) shows each cell's interval in the
    summary's column exactly as in its significance table; with the default 1,000 they differed."""
    from peftlab.lab.significance import example_intervals, resamples_for

    rng = np.random.default_rng(11)
    for i in range(10):
        _result(tmp_path / "classification", f"m{i}", 16, 0, rng.random(200) < 0.5 + 0.04 * i)
    _result(tmp_path / "classification", "zero-shot", 0, 0, rng.random(200) < 0.5)
    groups = group_runs(load_runs(tmp_path))["classification"]
    assert resamples_for(len(groups)) == 2200
    summary = {g.label: example_intervals(groups, "test", "accuracy")[id(g)] for g in groups}
    versus_best = next(b for b in significance_blocks(groups, "test", ["accuracy"]) if hasattr(b, "rows"))
    assert len(versus_best.rows) == 11
    for row in versus_best.rows:
        label = row[0].removesuffix(" N=16")
        iv = next(v for key, v in summary.items() if key.removesuffix(" N=16") == label)
        assert row[2] == f"[{iv.low:.2f}, {iv.high:.2f}]"
