"""`peftlab report`: aggregation over seeds (Student-t CI), tables with the best cell marked, plots, samples, run
provenance, the analysis section, escaping, and clear errors, all from synthetic result files (no training)."""

from __future__ import annotations

import argparse
import base64
import json
import math
import random
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from peftlab.lab import plots
from peftlab.lab.report import add_parser, analysis_blocks, run_blocks, write_report
from peftlab.lab.report_render import Table
from peftlab.lab.report_runs import ReportError, add_embedded_baselines, group_runs, load_runs, mean_ci, t_quantile_975
from peftlab.lab.report_table import metric_names, summary_table

TASK = "summarization"
TOTAL_PARAMS = 134_515_008
# method -> (variants, trainable params, base rougeL, seconds per step, peak memory MiB, adapter bytes)
METHODS = {
    "lora": (["default"], 921_600, 24.0, 0.9, 1400, 3_700_000),
    "prompt-tuning": (["n_tokens=10", "n_tokens=20"], 5_760, 18.0, 0.7, 1300, 24_000),
    "last-layer": (["default"], 3_540_096, 21.0, 0.5, 1250, 14_200_000),
}
N_VALUES = (100, 1000)
SEEDS = (0, 1)
HOSTILE = '<script>alert("x")</script> & | `a` **b**'  # text that must come out escaped


def _quality(method: str, variant: str, n: int, seed: int) -> float:
    base = METHODS[method][2] + (2.0 if variant.endswith("20") else 0.0)
    return base + 3.0 * math.log10(n / 100) + 0.7 * seed + 0.1 * len(variant) % 3


def _curves(rng: random.Random, steps: int, early: bool) -> tuple[list, list, int, int | None]:
    """A falling train loss with noise; validation every 10 steps, turning up at the end when stopped early."""
    train = [[s, 3.2 * math.exp(-s / 40) + 1.1 + rng.uniform(-0.05, 0.05)] for s in range(5, steps + 1, 5)]
    val = [{"step": s, "loss": 3.3 * math.exp(-s / 45) + 1.3 + (0.02 * (s - steps + 20) if early and s > steps - 20
                                                                else 0.0), "rougeL": 10 + s / 10}
           for s in range(10, steps + 1, 10)]
    best = min(val, key=lambda r: r["loss"])["step"]
    return train, val, best, steps if early else None


def make_result(method: str, variant: str, n: int, seed: int) -> dict:
    """A schema-valid train result (as `train_run` writes it) plus the grid record `peftlab compare` adds."""
    rng = random.Random(f"{method}{variant}{n}{seed}")
    trainable, steps = METHODS[method][1] * (2 if variant.endswith("20") else 1), 40 if n == 100 else 80
    train, val, best, early = _curves(rng, steps, early=method == "last-layer")
    rouge_l = _quality(method, variant, n, seed)
    seconds = steps * METHODS[method][3]
    stem = f"{method}--{variant}--n{n}--seed{seed}"
    samples = [{"id": f"ex{i}", "source": f"Article {i}: the council met on Monday. {HOSTILE if i == 0 else ''}",
                "prediction": f"{method} summary {i}" + (f" {HOSTILE}" if method == "lora" and i == 0 else ""),
                "references": [f"Reference summary {i}."]} for i in range(4)]
    options = {"n_tokens": int(variant.split("=")[1])} if "=" in variant else {}
    return {
        "schema_version": 1, "kind": "train",
        "run_info": {"command": f"peftlab compare grid.yaml  # {stem}",
                     "config": {"task": {"name": TASK}, "method": {"name": method, "options": options},
                                "data": {"max_train": n}, "train": {"seed": seed}},
                     "versions": {"python": "3.11.2", "torch": "2.13.0", "peftlab": "0.1.0"},
                     "machine": {"cpu": "Test CPU", "cpu_count": 2, "device": "cpu"},
                     "seed": seed, "git_commit": "abc123", "started": 1.7e9 + rng.uniform(0, 1e6),
                     "finished": 1.7e9 + 2e6, "process": "own"},
        "train_info": {"method": {"name": method}, "trainable_params": trainable, "total_params": TOTAL_PARAMS,
                       "trainable_percent": 100 * trainable / TOTAL_PARAMS, "lr": 1e-3, "steps": steps,
                       "epochs_completed": 2.0, "train_examples": n, "train_seconds": seconds,
                       "epoch_seconds": [seconds / 2, seconds / 2], "train_input_tokens": steps * 4000,
                       "train_target_tokens": steps * 400, "train_tokens_per_s": steps * 4000 / seconds,
                       "eval": {"test": {"eval_seconds": 30.0, "eval_examples_per_s": 2.0}},
                       "peak_memory_bytes": METHODS[method][4] * 2**20, "peak_memory_kind": "cpu_peak_rss",
                       "train_flops_estimate": steps * 4000 * 6 * 1.3e8, "adapter_bytes": METHODS[method][5],
                       "loss_curve": train, "val_curve": val, "best_step": best, "early_stop_step": early},
        "metrics": {"test": {"rouge1": rouge_l + 8, "rouge2": rouge_l - 10, "rougeL": rouge_l,
                             "rougeLsum": rouge_l + 1, "n_examples": 50,
                             "baselines": {"lead-3": {"rouge1": 30.0, "rouge2": 11.0, "rougeL": 19.5}}}},
        "samples": {"test": samples},
        "grid": {"method": method, "variant": variant, "n_train": n, "seed": seed, "budget": None, "stem": stem},
    }


def write_synthetic_results(root: Path) -> Path:
    """RESULTS_DIR/summarization/: 3 methods (one with 2 variants) x 2 N x 2 seeds, zero-shot and lead-3."""
    folder = root / TASK
    folder.mkdir(parents=True)
    for method, (variants, *_rest) in METHODS.items():
        for variant in variants:
            for n in N_VALUES:
                for seed in SEEDS:
                    result = make_result(method, variant, n, seed)
                    (folder / f"{result['grid']['stem']}.json").write_text(json.dumps(result))
    zero = make_result("lora", "default", 100, 0)
    zero.update(kind="eval", grid={"method": "zero-shot", "variant": "default", "n_train": 0, "seed": 0})
    zero["run_info"].update(command="peftlab eval task=summarization", started=1.6e9)
    zero["train_info"] = {"method": {"name": "zero-shot"}, "trainable_params": 0, "trainable_percent": 0.0,
                          "total_params": TOTAL_PARAMS, "peak_memory_bytes": 1100 * 2**20}
    zero["metrics"]["test"].update(rougeL=12.0, rouge1=20.0)
    for i, sample in enumerate(zero["samples"]["test"]):
        sample["prediction"] = f"zero-shot says {i}"
    (folder / "zero-shot--default--n0--seed0.json").write_text(json.dumps(zero))
    lead = {"metrics": {"test": {"rouge1": 30.0, "rouge2": 11.0, "rougeL": 19.5, "n_examples": 50}},
            "grid": {"method": "lead-3", "variant": "default", "n_train": 0, "seed": 0}}
    (folder / "lead-3--default--n0--seed0.json").write_text(json.dumps(lead))
    return root


class DocumentChecker(HTMLParser):
    """Collects tags, attributes and unclosed/mismatched elements of an HTML document."""

    VOID = {"meta", "link", "img", "br", "hr", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:]} at {self.getpos()}")
        else:
            self.stack.pop()


def check_document(text: str) -> DocumentChecker:
    checker = DocumentChecker()
    checker.feed(text)
    checker.close()
    return checker


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = write_synthetic_results(tmp_path_factory.mktemp("results"))
    md, page = write_report(root, root / "out")
    return root, md, page


def test_student_t_confidence_interval():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert t_quantile_975(100) == pytest.approx(1.98397, abs=2e-4)  # expansion beyond the table
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=2e-4)
    stat = mean_ci([10.0, 12.0])  # s = sqrt(2), half = 12.706 * sqrt(2) / sqrt(2)
    assert (stat.mean, stat.n) == (11.0, 2) and stat.half == pytest.approx(12.706)
    stat = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stat.half == pytest.approx(2.776 * statistics.stdev([1, 2, 3, 4, 5]) / math.sqrt(5))
    single = mean_ci([7.5])
    assert single.half is None and single.text() == "7.50 (1 seed)"
    assert stat.text() == f"3.00 ± {stat.half:.2f}"
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_pareto_front_keeps_only_undominated_points():
    xs, ys = [10, 100, 1000, 50, 5000], [20.0, 25.0, 24.0, 19.0, 30.0]
    assert plots.pareto_front(xs, ys) == [0, 1, 4]  # 1000 loses to 100; 50 loses to 10


def test_grouping_by_method_variant_n_over_seeds(report):
    root, _, _ = report
    groups = group_runs(load_runs(root))[TASK]
    cells = [(g.method, g.variant, g.n_train, len(g.runs)) for g in groups]
    assert cells[:2] == [("lead-3", "default", 0, 1), ("zero-shot", "default", 0, 1)]
    assert ("prompt-tuning", "n_tokens=10", 1000, 2) in cells and len(cells) == 2 + 4 * len(N_VALUES)
    assert [r.seed for g in groups for r in g.runs if g.n_train] == [0, 1] * 4 * len(N_VALUES)


def _table_row(md: str, method: str, variant: str, n: int) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if cells[:3] == [method, variant, str(n)]:
            return cells
    raise AssertionError(f"no row for {method}/{variant}/{n}")


def test_summary_table_means_cis_and_best_marks(report):
    md = report[1].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split(" | ")]
    rouge_l = columns.index("rougeL")
    values = [_quality("lora", "default", 1000, s) for s in SEEDS]
    stat = mean_ci(values)
    best = _table_row(md, "lora", "default", 1000)
    assert best[rouge_l] == f"**{stat.mean:.2f} ± {stat.half:.2f}**"  # the highest mean of the column, marked
    worse = _table_row(md, "lora", "default", 100)[rouge_l]
    assert "±" in worse and not worse.startswith("**")
    assert _table_row(md, "lead-3", "default", 0)[rouge_l] == "19.50 (1 seed)"
    # cheapest trainable count is marked; the zero-shot's 0 never wins
    trainable = columns.index("trainable (%)")
    assert _table_row(md, "prompt-tuning", "n_tokens=10", 100)[trainable].startswith("**5.8K")
    assert not _table_row(md, "zero-shot", "default", 0)[trainable].startswith("**")
    assert _table_row(md, "lora", "default", 100)[columns.index("time/epoch")] == "18.0 s"
    peak = columns.index("peak mem")
    assert _table_row(md, "lead-3", "default", 0)[peak] == "-"
    assert _table_row(md, "zero-shot", "default", 0)[peak] == "1.1GB"  # lowest, but an untrained baseline
    assert _table_row(md, "last-layer", "default", 100)[peak] == "**1.2GB**"


def test_markdown_links_every_png_and_escapes_text(report):
    root, md, _ = report
    text = md.read_text()
    links = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+)\)", text)
    names = {Path(link).name for link in links}
    expected = {"loss", "bars-rougel", "bars-rouge1", "bars-rouge2", "bars-rougelsum", "params", "time", "memory",
                "n-sweep", "heatmap-prompt-tuning"}
    assert names == {f"summarization-{name}.png" for name in expected}
    for link in links:
        assert (md.parent / link).read_bytes().startswith(b"\x89PNG")
    outside_code = re.sub(r"(`{3,})\n.*?\n\1\n", "", text, flags=re.S)  # fenced blocks show text verbatim
    assert "<script>" not in outside_code and "&lt;script&gt;alert" in outside_code and "\\|" in outside_code
    assert '<script>alert("x")</script>' in text  # the source, verbatim inside a fence
    assert "peftlab compare grid.yaml  # lora--default--n1000--seed1" in text  # exact commands
    assert "2.13.0" in text and "Test CPU" in text  # versions and machine


def test_html_is_one_valid_self_contained_document(report):
    _, _, page = report
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    doc = check_document(text)
    assert doc.problems == [] and doc.stack == []
    images = [attrs for tag, attrs in doc.tags if tag == "img"]
    assert len(images) == 10
    for attrs in images:
        assert attrs["src"].startswith("data:image/png;base64,") and attrs.get("alt")
        assert base64.b64decode(attrs["src"].split(",", 1)[1]).startswith(b"\x89PNG")
    for tag, attrs in doc.tags:
        assert tag != "script"
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert value == "" or value.startswith(("data:", "#")), (tag, key, value)
    assert "<script>alert" not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in text
    samples = text.split("Generated outputs", 1)[1].split("<h3", 1)[0]  # the side-by-side outputs, then Runs
    for label in ("zero-shot", "lora N=1000", "prompt-tuning/n_tokens=20 N=1000", "last-layer N=1000"):
        assert f"<td>{label}</td>" in samples
    assert "Reference summary 0." in samples and "lead-3" not in samples  # lead-3 has no samples


def test_a_column_where_all_rows_tie_has_no_best(tmp_path):
    for method in ("lora", "last-layer"):
        result = make_result(method, "default", 100, 0)
        result["metrics"]["test"]["rougeL"] = 20.0
        _write(tmp_path / TASK / f"{result['grid']['stem']}.json", result)
    groups = group_runs(load_runs(tmp_path))[TASK]
    table = summary_table(groups, "test", ["rougeL", "rouge1"])
    assert {c for _, c in table.best} == {5, 6, 7, 8, 9, 10}  # not 4 (rougeL) nor 11 (FLOPs): both tie
    assert table.rows[0][4] == table.rows[1][4] == "20.00 (1 seed)"


def test_peak_memory_of_runs_that_shared_a_grid_process_is_marked(tmp_path):
    """A grid run that shared its process with earlier runs (or did not record that it had its own) has a peak
    that includes their leftovers: its cell gets a mark and the table a footnote; runs in their own process none."""
    for method, process in (("lora", "own"), ("last-layer", "shared"), ("prompt-tuning", None)):
        result = make_result(method, "default", 100, 0)
        if process is None:
            del result["run_info"]["process"]
        else:
            result["run_info"]["process"] = process
        _write(tmp_path / TASK / f"{result['grid']['stem']}.json", result)
    groups = group_runs(load_runs(tmp_path))[TASK]
    peak = summary_table(groups, "test", ["rougeL"]).headers.index("peak mem")
    cells = {row[0]: row[peak] for row in summary_table(groups, "test", ["rougeL"]).rows}
    assert not cells["lora"].endswith("†") and cells["last-layer"].endswith(" †")
    assert cells["prompt-tuning"].endswith(" †")
    md = write_report(tmp_path)[0].read_text()
    assert "† Peak memory measured in a grid process that had run other runs before" in md
    (tmp_path / TASK / "last-layer--default--n100--seed0.json").unlink()
    (tmp_path / TASK / "prompt-tuning--default--n100--seed0.json").unlink()
    assert "† Peak memory" not in write_report(tmp_path)[0].read_text()


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_plain_run_folders_and_duplicates(tmp_path):
    lora = make_result("prompt-tuning", "n_tokens=20", 100, 3)
    del lora["grid"]
    _write(tmp_path / "my-run" / "result.json", lora)
    zero = make_result("lora", "default", 100, 0)
    del zero["grid"]
    zero["train_info"] = {"method": {"name": "zero-shot"}, "trainable_params": 0}
    _write(tmp_path / "zs" / "result.json", zero)
    # a compare result and its run folder copy count once
    copy = make_result("lora", "default", 1000, 1)
    _write(tmp_path / "cnn" / "lora--default--n1000--seed1.json", copy)
    _write(tmp_path / "cnn" / "runs" / "lora--default--n1000--seed1" / "result.json", {**copy, "grid": None})
    # a folder a killed writer left under a temporary name is not a run
    hidden = make_result("lora", "default", 1000, 2)
    del hidden["grid"]
    _write(tmp_path / "cnn" / "runs" / ".lora--default--n1000--seed2.abc.tmp" / "result.json", hidden)
    cells = sorted((r.task, r.method, r.variant, r.n_train, r.seed) for r in load_runs(tmp_path))
    assert cells == [("cnn", "lora", "default", 1000, 1), (TASK, "prompt-tuning", "n_tokens=20", 100, 3),
                     (TASK, "zero-shot", "default", 0, 0)]
    groups = group_runs(load_runs(tmp_path))[TASK]
    add_embedded_baselines(groups, "test")  # no lead-3 file: the lead-3 scored inside the runs becomes a row
    table = summary_table(groups, "test", metric_names(groups, "test"))
    assert table.rows[0][:6] == ["lead-3", "default", "0", "1", "19.50 (1 seed)", "30.00 (1 seed)"]
    provenance = [b for b in run_blocks(groups, tmp_path) if isinstance(b, Table)][0]
    assert provenance.rows[0][2].startswith("computed inside ") and provenance.rows[0][2].endswith("result.json")


def test_analysis_folder_becomes_a_section(tmp_path):
    root = tmp_path / "results"
    _write(root / TASK / "lead-3--default--n0--seed0.json", {"metrics": {"test": {"rougeL": 19.5, "rouge1": 30.0}}})
    (root / "analysis").mkdir()
    (root / "analysis" / "rank_spectrum.png").write_bytes(plots.metric_bars(["a", "b"], [1.0, 2.0], [None, 0.1], "m"))
    (root / "analysis" / "rank_spectrum.json").write_text(json.dumps({"effective_rank": [3.5, 4.0]}))
    md, page = write_report(root)
    text = md.read_text()
    assert "## Analysis" in text and "(report_files/analysis-rank_spectrum.png)" in text
    assert '"effective_rank"' in text
    assert page.read_text().count("<img ") == len(re.findall(r"!\[", text)) == 3  # 2 metric bars + 1
    assert (root / "report_files" / "analysis-rank_spectrum.png").exists()


def test_cli_parser(tmp_path, capsys):
    root = tmp_path / "results"
    _write(root / TASK / "lead-3--default--n0--seed0.json", {"metrics": {"validation": {"rougeL": 19.5}},
                                                             "grid": {"method": "lead-3", "variant": "default",
                                                                      "n_train": 0, "seed": 0}})
    parser = argparse.ArgumentParser(prog="peftlab")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["report", str(root), "--out", str(tmp_path / "out")])
    assert ns.func(ns) == 0
    assert "report.html" in capsys.readouterr().out
    text = (tmp_path / "out" / "report.md").read_text()
    assert "(validation split)" in text and "19.50 (1 seed)" in text  # no test split: falls back to validation


def test_bad_inputs_name_the_file_and_key(tmp_path):
    with pytest.raises(ReportError, match="results folder not found"):
        load_runs(tmp_path / "missing")
    with pytest.raises(ReportError, match="no results found"):
        load_runs(tmp_path)
    bad = tmp_path / TASK / "lora--default--n10--seed0.json"
    bad.parent.mkdir()
    bad.write_text('{"metrics": {"test": {}},\n "grid": }')
    with pytest.raises(ReportError, match=r"lora--default--n10--seed0\.json: invalid JSON at line 2"):
        load_runs(tmp_path)
    _write(bad, {"metrics": {"test": {}}, "grid": {"method": "lora", "variant": "default"}})
    with pytest.raises(ReportError, match=r"grid record lacks \['n_train', 'seed'\]"):
        load_runs(tmp_path)
    _write(bad, {"train_info": {}})
    with pytest.raises(ReportError, match="missing key 'metrics'"):
        load_runs(tmp_path)
    bad.unlink()
    _write(tmp_path / "run" / "result.json", {"metrics": {"test": {"bleu": 1.0}}})
    with pytest.raises(ReportError, match="needs run_info.config"):
        load_runs(tmp_path)
    (tmp_path / "run" / "result.json").unlink()
    (tmp_path / "ok" / "analysis").mkdir(parents=True)
    (tmp_path / "ok" / "analysis" / "x.png").write_bytes(b"GIF89a")
    with pytest.raises(ReportError, match=r"x\.png: not a PNG"):
        analysis_blocks(tmp_path / "ok")


def test_report_from_real_train_and_eval_runs(tiny_llama_dir, tmp_path):
    """The result files `peftlab train` / `peftlab eval` really write (plain run folders, no grid record)."""
    from peftlab.config import load_config
    from peftlab.lab.experiment import eval_run, train_run

    common = [f"model={tiny_llama_dir}", "task=table-to-text", "data=demo", "data.max_train=16",
              "data.max_validation=4", "data.max_test=4", "eval.max_new_tokens=4", "eval.show_examples=2"]
    train_run(load_config(None, [*common, "method=lora", "train.max_steps=4", "train.batch_size=4",
                                 "train.eval_every=2", "train.eval_examples=0", "train.log_every=1",
                                 f"out={tmp_path / 'runs' / 'lora'}"]), command="peftlab train method=lora")
    eval_run(load_config(None, [*common, f"out={tmp_path / 'runs' / 'zero'}"]), command="peftlab eval")
    md, page = write_report(tmp_path / "runs", tmp_path / "report")
    text = md.read_text()
    assert "## Task: table-to-text (test split)" in text
    lora = _table_row(text, "lora", next(r.variant for r in load_runs(tmp_path / "runs") if r.method == "lora"), 16)
    assert lora[3] == "1" and "(1 seed)" in lora[4]
    assert _table_row(text, "zero-shot", "default", 0)[3] == "1"
    assert "table-to-text-loss.png" in text and "peftlab train method=lora" in text
    assert check_document(page.read_text()).problems == []
