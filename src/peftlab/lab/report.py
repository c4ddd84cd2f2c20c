"""`peftlab report RESULTS_DIR`: one Markdown and one self-contained HTML report built only from result files.

Input: the result files under RESULTS_DIR, read and grouped by (task, method, variant, N) over seeds in
:mod:`peftlab.lab.report_runs`; every number is a mean over seeds with a 95% Student-t confidence interval.
``RESULTS_DIR/analysis/*.png|*.json`` becomes its own section. Each task's section: the summary table
(:mod:`peftlab.lab.report_table`), paired significance tests, the learning rates the lr pilots chose, plots,
generated samples, and every run's command, commit and predicted vs actual time.

Output (``--out``, default RESULTS_DIR): ``report.md`` (images linked from ``report_files/``) and ``report.html``
(images embedded as data URIs, inline CSS, no script and no external resource: it opens offline).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.durable import atomic_write_bytes, atomic_write_text
from peftlab.lab.report_render import Block, Heading, Image, Para, Pre, Table, slug, to_html, to_markdown
from peftlab.lab.report_runs import (
    Group,
    ReportError,
    add_embedded_baselines,
    choose_split,
    group_runs,
    load_runs,
    natural_key,
    read_json,
)
from peftlab.lab.report_table import (
    format_seconds,
    info_getter,
    metric_getter,
    metric_names,
    shared_process_note,
    summary_table,
)
from peftlab.lab.result_record import RESULT_NAME, LrPilot, TrainInfo, number
from peftlab.lab.significance import example_intervals, significance_blocks, with_example_intervals

MAX_SAMPLE_EXAMPLES = 3
MAX_CURVES = 10


# ----------------------------------------------------------------------------------------------- sections


def plot_blocks(task: str, groups: list[Group], split: str, metrics: list[str]) -> list[Block]:
    """The task's figures: loss curves, metric bars, metric vs parameters / time, memory, N sweeps, heatmaps."""
    from peftlab.lab import plots

    if not metrics:
        return []
    primary, colors, figures = metrics[0], plots.palette([g.label for g in groups]), []
    scored = [(g, s) for g in groups if (s := g.stat(metric_getter(split, primary))) is not None]
    trained = [g for g in groups if g.runs[0].info.loss_curve or g.runs[0].info.val_curve]
    if len(trained) > MAX_CURVES:  # only the largest N of each variant (groups are sorted by N within a variant)
        trained = list({(g.method, g.variant): g for g in trained}.values())[:MAX_CURVES]
    curves = [plots.CurveSeries.from_train_info(g.label, g.runs[0].info) for g in trained]
    figures.append(("loss", plots.loss_curves(curves, colors), "Train (solid) and validation (dashed) loss of the "
                    "first seed of each group; star: best validation step (weights kept), X: early stop."))
    for name in metrics[:4]:
        stats = [(g.label, s) for g in groups if (s := g.stat(metric_getter(split, name))) is not None]
        figures.append((f"bars-{slug(name)}", plots.metric_bars([lb for lb, _ in stats], [s.mean for _, s in stats],
                        [s.half for _, s in stats], name, colors), f"{name} on {split}: mean over seeds, 95% CI."))
    # Cost plots compare methods on equal data: at the largest N when the grid sweeps N.
    largest = max(g.n_train for g, _ in scored)
    at_n = [(g, s) for g, s in scored if g.n_train == largest]
    where = f" at N={largest}" if len({g.n_train for g, _ in scored if g.n_train}) > 1 else ""
    labels, means, halves = [g.label for g, _ in at_n], [s.mean for _, s in at_n], [s.half for _, s in at_n]

    def cost(field_of: Callable[[TrainInfo], Any]) -> list[float | None]:
        return [st.mean if (st := g.stat(info_getter(field_of))) else None for g, _ in at_n]

    figures.append(("params", plots.metric_vs_cost(labels, cost(lambda i: i.trainable_params), means, halves,
                                                   "trainable parameters", primary, log_x=True, pareto=True,
                                                   colors=colors),
                    f"{primary} vs trainable parameters (log scale){where}; dotted: the Pareto front."))
    figures.append(("time", plots.metric_vs_cost(labels, cost(lambda i: i.train_seconds), means, halves,
                                                 "training time (s)", primary, colors=colors),
                    f"{primary} vs total training time{where}."))
    memory = [(g.label, s.mean) for g in groups
              if (s := g.stat(info_getter(lambda i: i.peak_memory_bytes))) is not None]
    figures.append(("memory", plots.memory_bars([lb for lb, _ in memory], [m for _, m in memory], colors),
                    "Peak memory (CUDA max allocated on GPU, peak RSS of the process on CPU)."))
    sweeps: dict[str, list[tuple[float, float, float | None]]] = {}
    for g, s in scored:
        if g.n_train > 0:
            sweeps.setdefault(g.label.rsplit(" N=", 1)[0], []).append((g.n_train, s.mean, s.half))
    figures.append(("n-sweep", plots.metric_vs_n(sweeps, primary), f"{primary} vs number of training examples."))
    intervals = example_intervals([g for g, _ in scored], split, primary)
    for method in dict.fromkeys(g.method for g, _ in scored if g.n_train > 0):
        sweep = {(g.variant, g.n_train): (s.mean, intervals.get(id(g))) for g, s in scored
                 if g.method == method and g.n_train > 0}
        if len(sweep) < 2:  # one cell is not a sweep
            continue
        rows, cols = sorted({v for v, _ in sweep}, key=natural_key), sorted({n for _, n in sweep})
        cells = [[sweep.get((r, c), (None, None)) for c in cols] for r in rows]
        png = plots.heatmap(rows, [str(n) for n in cols], [[mean for mean, _ in row] for row in cells],
                            f"{method}: {primary}", "variant", "N",
                            intervals=[[(iv.low, iv.high) if iv else None for _, iv in row] for row in cells])
        figures.append((f"heatmap-{slug(method)}", png, f"{method}: {primary} (mean over seeds), variant x N; "
                        "under each mean its 95% bootstrap interval over test examples (seeds pooled)."))
    return [Image(f"{slug(task)}-{name}.png", png, caption) for name, png, caption in figures if png is not None]


def lr_pilot_blocks(groups: list[Group]) -> list[Block]:
    """The learning rate each (method, variant) trained at, when a grid's ``lr_pilot`` chose it: every candidate's
    pilot validation loss, the untuned rate and the chosen one."""
    records: dict[tuple[str, str], LrPilot] = {}
    for g in groups:
        for run in g.runs:
            grid = run.record.grid
            if grid is not None and grid.lr_pilot is not None:
                records.setdefault((g.method, g.variant), grid.lr_pilot)
    if not records:
        return []

    def loss(value: Any) -> str:
        return "diverged" if value is None else f"{value:.4f}"

    table = Table(["method", "variant", "untuned lr", "pilots: lr (validation loss)", "chosen lr",
                   "validation loss untuned -> chosen"], [])
    for (method, variant), r in records.items():
        tried = ", ".join(f"{c.lr:.3g} ({loss(c.val_loss)})" for c in r.candidates or [])
        untuned = f"{r.default_lr:.3g}" if r.default_lr is not None else "-"
        table.rows.append([method, variant, untuned, tried, f"{r.chosen_lr:.3g}",
                           f"{loss(r.default_val_loss)} -> {loss(r.chosen_val_loss)}"])
    first = next(iter(records.values()))
    return [Heading(3, "Learning rate per method (lr pilot)"), Para(
        f"Each method trained at the rate whose {first.steps}-step pilot (N={first.n_train}, first "
        f"seed) had the lowest loss on {first.validation_examples} validation examples; the untuned rate is "
        "the grid's own (train.lr or the method's default). The difference between the two losses is what tuning "
        "bought in the pilot."), table]


def sample_blocks(groups: list[Group], split: str) -> list[Block]:
    """A few test examples with each method's output side by side (first seed, largest N per variant)."""
    shown = {(g.method, g.variant): g for g in groups if g.runs[0].record.samples_of(split)}
    if not shown:
        return []
    by_group = {g.label: {str(i if s.id is None else s.id): s
                          for i, s in enumerate(g.runs[0].record.samples_of(split))} for g in shown.values()}
    first = next(iter(by_group.values()))
    blocks: list[Block] = [Heading(3, f"Generated outputs ({split})")]
    for example_id in list(first)[:MAX_SAMPLE_EXAMPLES]:
        sample = first[example_id]
        refs = "\n".join(f"- {ref}" for ref in sample.references or [])
        source = "" if sample.source is None else sample.source
        blocks += [Para(f"Example {example_id}"), Pre(f"SOURCE:\n{source}\n\nREFERENCE:\n{refs}")]
        rows = [[label, str("" if samples[example_id].prediction is None else samples[example_id].prediction)]
                for label, samples in by_group.items() if example_id in samples]
        blocks.append(Table(["method", "prediction"], rows, css="samples"))
    return blocks


def run_blocks(groups: list[Group], root: Path) -> list[Block]:
    """Every run's exact command, seed and commit; versions and machine once per distinct environment."""
    rows, envs = [], {}
    for g in groups:
        for run in g.runs:
            info = run.record.run_info
            if run.embedded_in is not None:
                rows.append([g.label, "-", f"computed inside {run.embedded_in.relative_to(root)}", "-", "-", "-"])
                continue
            env = json.dumps({"versions": info.versions, "machine": info.machine}, indent=1)
            env_number = envs.setdefault(env, len(envs) + 1) if not info.empty else None
            finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.finished)) if info.finished is not None \
                else "-"
            rows.append([g.label, str(run.seed), str(run.path.relative_to(root)), info.command or "-",
                         str(info.git_commit or "-"), f"{finished}, env {env_number}" if env_number else finished])
    blocks: list[Block] = [Heading(3, "Runs"),
                           Table(["group", "seed", "file", "command", "git commit", "finished, environment"], rows)]
    for env, env_number in envs.items():
        blocks += [Para(f"Environment {env_number}: versions and machine"), Pre(env)]
    # Predicted (compare's estimate, <task>/estimate/predicted.json) vs actual wall time (finished - started).
    predictions: dict[Path, dict[str, Any]] = {}
    timed = []
    for g in groups:
        for run in g.runs:
            info = run.record.run_info
            if run.path.name != RESULT_NAME:  # <task>/<stem>.json
                folder, stem = run.path.parent, run.path.stem
            elif run.path.parent.parent.name == "runs":  # <task>/runs/<stem>/result.json
                folder, stem = run.path.parents[2], run.path.parent.name
            else:
                continue
            if folder not in predictions:
                file = folder / "estimate" / "predicted.json"
                predictions[folder] = read_json(file) if file.is_file() else {}
            record = predictions[folder].get(stem)
            p = number(record.get("predicted_seconds")) if isinstance(record, dict) else None
            wall = info.wall_seconds()
            if p is not None and run.embedded_in is None and not info.derived_from and wall is not None:
                timed.append((g.label, run.seed, p, wall, info.cpu_share()))
    if timed:
        table = Table(["group", "seed", "predicted", "actual", "actual / predicted", "CPU share"],
                      [[label, str(seed), format_seconds(p), format_seconds(a), f"{a / p:.2f}" if p > 0 else "-",
                        f"{share:.0%}" if share is not None else "-"] for label, seed, p, a, share in timed])
        total_p, total_a = sum(t[2] for t in timed), sum(t[3] for t in timed)
        table.rows.append(["total", "", format_seconds(total_p), format_seconds(total_a),
                           f"{total_a / total_p:.2f}" if total_p > 0 else "-", ""])
        blocks += [Heading(3, "Predicted vs actual time"), Para(
            "Predicted: `peftlab compare`'s estimate before the grid started (calibrated rates x counted tokens); "
            "actual: the run's wall time from its start to its result; CPU share: the CPU time the run's process "
            "used over its wall time times its torch threads (well under 100%: the run shared its cores, so its "
            "times and tokens/s are slower than the machine's own; '-' for results written before it was "
            "recorded)."), table]
    return blocks


def analysis_blocks(root: Path) -> list[Block]:
    """``RESULTS_DIR/analysis/*.png`` and ``*.json`` (written by `peftlab analyze`), when that folder exists."""
    folder = root / "analysis"
    if not folder.is_dir():
        return []
    blocks: list[Block] = [Heading(2, "Analysis")]
    for path in sorted(folder.iterdir()):
        if path.suffix == ".png":
            data = path.read_bytes()
            if not data.startswith(b"\x89PNG\r\n\x1a\n"):
                raise ReportError(f"{path}: not a PNG image (bad signature)")
            blocks.append(Image(f"analysis-{path.name}", data, path.stem))
        elif path.suffix == ".json":
            text = json.dumps(read_json(path), indent=1)
            blocks += [Para(path.name), Pre(text if len(text) < 6000 else text[:6000] + "\n... (truncated)")]
    return blocks


def build_blocks(root: Path, split: str = "test") -> list[Block]:
    """The whole report as a list of blocks (rendered to Markdown and to HTML)."""
    tasks = group_runs(load_runs(root))
    blocks: list[Block] = [Heading(1, "peftlab report"), Para(
        f"{sum(len(g.runs) for gs in tasks.values() for g in gs)} runs from {root}. Metrics: mean ± 95% confidence "
        "interval (Student t) over seeds; '(1 seed)' = a single run, no interval. Costs: mean over seeds. Bold: "
        "best in its column (costs: among trained groups only).")]
    for task, groups in tasks.items():
        task_split = choose_split(groups, split)
        add_embedded_baselines(groups, task_split)
        metrics = metric_names(groups, task_split)
        summary = with_example_intervals(summary_table(groups, task_split, metrics), groups, task_split, metrics)
        blocks += [Heading(2, f"Task: {task} ({task_split} split)"), summary, *shared_process_note(groups)]
        blocks += significance_blocks(groups, task_split, metrics)  # paired tests over the test examples
        blocks += lr_pilot_blocks(groups)
        blocks += plot_blocks(task, groups, task_split, metrics)
        blocks += sample_blocks(groups, task_split) + run_blocks(groups, root)
    return blocks + analysis_blocks(root)


# ---------------------------------------------------------------------------------------------- output + CLI


def write_report(results_dir: str | Path, out: str | Path | None = None, split: str = "test") -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``report_files/*.png``) and the self-contained ``report.html``.

    Args:
        results_dir: the folder of result files (see the module docstring for the layout).
        out: where to write; default ``results_dir``.
        split: the evaluation split the tables and plots use (a task without it uses the first split it has).

    Returns:
        The paths of report.md and report.html.
    """
    root = Path(results_dir)
    blocks = build_blocks(root, split)
    out_dir = Path(out) if out is not None else root
    files = out_dir / "report_files"
    # Durable writes, the plots first: a report.md/html that exists is complete and its images are there.
    for block in blocks:
        if isinstance(block, Image):
            atomic_write_bytes(files / block.name, block.png)
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md, to_markdown(blocks, files.name))
    atomic_write_text(page, to_html(blocks, f"peftlab report: {root.name}"))
    return md, page


def _cmd_report(ns: argparse.Namespace) -> int:
    md, page = write_report(ns.results_dir, ns.out, ns.split)
    print(f"report: {md}\n        {page}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``peftlab report RESULTS_DIR [--out DIR] [--split SPLIT]`` to the CLI's subparsers."""
    text = "build report.md and a self-contained report.html (tables, plots, samples) from a results folder"
    p = subparsers.add_parser("report", help=text, description=text)
    p.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="folder of <task>/<method>--<variant>--n<N>--seed<k>.json files and/or run folders")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RESULTS_DIR)")
    p.add_argument("--split", default="test", help="evaluation split to report (default: test)")
    p.set_defaults(func=_cmd_report)
    return p
