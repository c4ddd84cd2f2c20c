"""`peftlab compare GRID.yaml [key=value ...]`: run a grid of methods x variants x seeds x training-set sizes.

Each run writes ``<results>/<name>/<method>--<variant>--n<N>--seed<k>.json`` (the run's result record, see
:mod:`peftlab.lab.result_record`, with its ``grid`` cell) once it has finished; its run folder (checkpoints, adapter,
metrics.jsonl) is ``<results>/<name>/runs/<stem>/``. The grid is safe to interrupt and to run again:

* a run whose result file exists is skipped (after checking it was made with the same settings);
* a run folder holding a finished ``result.json`` is recorded without running again;
* a run folder holding a checkpoint is resumed from it (``resume=true``);
* anything else starts fresh.

Result files are written durably (:mod:`peftlab.durable`): one that exists is complete. One invocation at a time
holds ``<results>/<name>/.lock``; a second is refused at once (a killed one's lock is released by the kernel).
``--shard k/n`` runs a deterministic k-th of the runs (:mod:`peftlab.lab.shard`) and holds
``.lock-shard-k-of-n`` instead, so the n shards can share one results folder.

Baselines come first: the base model zero-shot, and lead-3 for summarization (taken from the zero-shot run's
``metrics[split]["baselines"]``, which scores it on the same examples). The grid format is described in
:mod:`peftlab.lab.compare_grid`; ``configs/compare/`` holds examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.config import ConfigError
from peftlab.lab.compare_grid import (
    LEAD_3,
    PILOT,
    ZERO_SHOT,
    GridSpec,
    PlannedRun,
    config_differences,
    expand_grid,
    load_grid,
)
from peftlab.lab.result_record import (
    RESULT_NAME,
    GridCell,
    MethodFacts,
    ResultError,
    ResultRecord,
    RunInfo,
    SplitMetrics,
    TrainInfo,
    read_result,
)

GRID_HELP = """A grid file holds the shared RunConfig sections (model, task, data, train, eval, as in configs/*.yaml)
and the grid keys:
  name: demo                      results go to <results>/<name>/ (default: task.name)
  methods:                        a list of method names, or mappings with
    - name: lora                    name (required)
      options: {r: 8}               fixed method options
      variants: {dropout: [0, 0.1]} every combination is a run; dotted keys (train.lr) set RunConfig keys
      overrides: {train.lr: 3e-4}   RunConfig keys for this method only
  n_train: [50, 500]              data.max_train per run (null or all: every example)
  seeds: [0, 1]                   train.seed and data.seed
  budget: null                    or '0.1%' / 150000: size every method to this many trainable parameters
  baselines: true                 zero-shot base model, + lead-3 for summarization
  lr_pilot: {factors: [0.3, 1, 3], steps: 30, validation: 100}
                                  pick each method's learning rate by short pilots first (null: off)
  results: results                root folder

Overrides: grid keys (seeds=[0] n_train=[50]) replace the file's value; section keys (train.max_steps=20) set the
shared sections (a method's own options/overrides/variants still win). Example:
  peftlab compare configs/compare/imdb.yaml train.max_steps=10 seeds=[0]"""

Status = str  # "done" (result file exists) | "finished" (run folder holds result.json) | "resume" | "new"


# ---------------------------------------------------------------------------------------------------- planning


def _budget_tools() -> tuple[Callable[[str, int], int], Callable[..., Any]]:
    """(parse_budget, solve) of :mod:`peftlab.methods.budget` (a seam for tests)."""
    from peftlab.methods.budget import parse_budget, solve

    return parse_budget, solve


def _model_shape(spec: GridSpec) -> Any:
    """The base model's :class:`~peftlab.models.shape.ModelShape`, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from peftlab.config import config_from_dict
    from peftlab.models.loading import pretrained_source
    from peftlab.models.shape import model_shape

    model = config_from_dict(spec.shared).model
    return model_shape(AutoConfig.from_pretrained(pretrained_source(model.name),
                                                  trust_remote_code=model.trust_remote_code))


def plan(spec: GridSpec, log: Callable[[str], None] = print) -> list[PlannedRun]:
    """Every run of the grid with its config validated (budget mode: each method sized to the budget first).

    In budget mode a method whose size is fixed by the model (last-layer, bitfit, ...) or whose smallest size is
    over the budget still runs; a note says so, and its ``grid`` record carries ``budget_fits: false``.
    """
    if spec.budget is None:
        return expand_grid(spec)
    parse_budget, solve = _budget_tools()
    shape = _model_shape(spec)
    try:
        budget_params = parse_budget(spec.budget, shape.total_params)
    except ConfigError as exc:
        raise ConfigError(f"{spec.source}: {exc}") from exc
    notes: dict[str, str] = {}

    def sized(method: str, shape: Any, budget: int, options: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        sol = solve(method, shape, budget, options)
        if not sol.fits:
            notes[method] = f"{method} trains {sol.count:,} parameters, over the budget of {budget:,}"
        elif sol.at_maximum:
            notes[method] = f"{method} reaches only {sol.count:,} parameters at its largest {sol.knob}={sol.value}"
        return sol.options, {"planned_trainable_params": sol.count, "budget_knob": sol.knob,
                             "budget_fits": sol.fits}

    runs = expand_grid(spec, sized, shape, budget_params)
    for note in notes.values():
        log(f"[compare] budget note: {note}")
    return runs


def check_models(runs: list[PlannedRun]) -> None:
    """Fail early (``ModelNotFoundError``) when a run's base model cannot be found; loads nothing."""
    from peftlab.models.loading import resolve_model

    for name in dict.fromkeys(r.cfg.model.name for r in runs):
        resolve_model(name)


def _read_result(path: Path) -> ResultRecord:
    """The result record at ``path``; one that cannot be read stops the grid with a hint."""
    try:
        return read_result(path)
    except ResultError as exc:
        raise ConfigError(f"{exc}; delete it to run this again") from exc


def _read_config(path: Path) -> dict[str, Any]:
    """A run folder's ``config.json`` (what an interrupted run was started with)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable config ({exc}); delete the run folder to run this again") from exc


def _check_same(run: PlannedRun, path: Path, recorded: dict[str, Any] | None) -> None:
    """A file of an earlier invocation counts only if it was made with this run's settings (a run whose learning
    rate a pilot has not set yet is compared on everything else)."""
    if recorded is None:
        return
    pending_lr = ("train.lr",) if run.pilot_group is not None and "lr_pilot" not in run.grid else ()
    diffs = config_differences(recorded, run.cfg, evaluation_only=run.kind not in ("train", PILOT),
                               ignore=pending_lr)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 6 else "")
        raise ConfigError(f"{path} was made with other settings than grid run {run.stem} ({shown}); delete it "
                          f"(and {run.run_dir}) to run it again, or give another results folder (results=...)")


def run_status(run: PlannedRun) -> Status:
    """What an invocation does with ``run``, from the files already there (raises on a settings mismatch)."""
    from peftlab.training.checkpoint import latest_checkpoint

    if run.result_path.exists():
        _check_same(run, run.result_path, _read_result(run.result_path).run_info.config)
        return "done"
    if run.kind == LEAD_3:
        return "new"
    if (run.run_dir / RESULT_NAME).exists():
        path = run.run_dir / RESULT_NAME
        _check_same(run, path, _read_result(path).run_info.config)
        return "finished"
    if latest_checkpoint(run.run_dir) is not None:
        _check_same(run, run.run_dir / "config.json", _read_config(run.run_dir / "config.json"))
        return "resume"
    return "new"


# ---------------------------------------------------------------------------------------------------- running


def lead3_result(zero_shot: ResultRecord, command: str = "") -> ResultRecord:
    """The lead-3 baseline as its own result, from the zero-shot run that scored it on the same examples.

    Its ``run_info`` is the zero-shot run's (config, machine, versions), with its own command and a
    ``derived_from`` note, so that readers that de-duplicate copies of one run keep both. Its per-example
    records are the zero-shot run's lead-3 records, with the same example ids.
    """
    metrics = {split: SplitMetrics(scores=dict(values.baselines[LEAD_3]), n_examples=values.n_examples)
               for split, values in zero_shot.metrics.items() if LEAD_3 in (values.baselines or {})}
    if not metrics:
        raise ValueError("the zero-shot result holds no lead-3 baseline (only summarization computes one)")
    train_info = TrainInfo(method=MethodFacts(name=LEAD_3), trainable_params=0, total_params=0, trainable_percent=0.0)
    run_info = dataclasses.replace(zero_shot.run_info, command=command,
                                   derived_from=zero_shot.grid.stem if zero_shot.grid else None)
    per_example = {split: lead3 for split, records in (zero_shot.per_example or {}).items()
                   if (lead3 := records.baseline(LEAD_3)) is not None}
    return ResultRecord(kind="baseline", run_info=run_info, train_info=train_info, metrics=metrics, samples={},
                        per_example=per_example)


def _train_pilot(cfg: Any, command: str, on_step: Callable[[Any], None] | None) -> ResultRecord | None:
    """A pilot's result; a pilot whose loss went non-finite is a result too (``diverged``: it loses the choice)."""
    from peftlab.lab.experiment import train_run
    from peftlab.training.trainer import NonFiniteError

    try:
        return train_run(cfg, command=command, on_step=on_step)
    except NonFiniteError as exc:
        return ResultRecord(kind=PILOT, diverged=str(exc), run_info=RunInfo(config=cfg.to_dict(), command=command),
                            train_info=TrainInfo(val_curve=[]), metrics={})


def _execute(run: PlannedRun, status: Status, done: dict[str, ResultRecord], command: str,
             on_step: Callable[[Any], None] | None) -> ResultRecord | None:
    """Run (or record, or derive) one planned run; None on a helper rank of a multi-process launch."""
    from peftlab.lab.experiment import eval_run, train_run

    if run.kind == "train" and run.pilot_group is not None and "lr_pilot" not in run.grid:
        raise ConfigError(f"{run.stem}: its learning rate comes from the pilots of {run.pilot_group}, which have "
                          "not all finished (with --shard, run `peftlab compare GRID --pilots-only` first, in one "
                          "process)")
    if run.kind == LEAD_3:
        zero_shot = next(r for r in done.values() if r.grid is not None and r.grid.method == ZERO_SHOT)
        return lead3_result(zero_shot, command=f"{command} ({run.stem})")
    if status == "finished":
        return _read_result(run.run_dir / RESULT_NAME)
    if run.kind == ZERO_SHOT:
        return eval_run(run.cfg, command=f"{command} ({run.stem})")
    cfg = dataclasses.replace(run.cfg, resume=status == "resume")
    if run.kind == PILOT:
        return _train_pilot(cfg, f"{command} ({run.stem})", on_step)
    return train_run(cfg, command=f"{command} ({run.stem})", on_step=on_step)


def _grid_cell(run: PlannedRun, result: ResultRecord) -> GridCell:
    """The result's ``grid`` record: the planned run's cell, N = "all" replaced by the count that was used."""
    cell = GridCell.from_dict(run.grid, run.stem)
    if cell.n_train is None:  # "all": record how many there were (reports read N as a number)
        cell.n_train = result.train_info.train_examples
        cell.n_train_requested = "all"
    return cell


def _fmt_duration(seconds: float) -> str:
    if 0 < seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def _eta(pending: list[str], finished: list[tuple[str, float]], predicted: dict[str, float]) -> float:
    """Seconds left: each pending run's predicted seconds, scaled by how this invocation's finished runs compared
    with their predictions (actual / predicted), so that short pilots do not make long runs look short; a run
    without a prediction counts as the mean finished run."""
    if not finished:
        return sum(predicted.get(stem, 0.0) for stem in pending)
    mean = statistics.mean(seconds for _, seconds in finished)
    pairs = [(seconds, predicted[stem]) for stem, seconds in finished if predicted.get(stem)]
    scale = sum(a for a, _ in pairs) / sum(p for _, p in pairs) if pairs else 1.0
    return sum(predicted[stem] * scale if predicted.get(stem) else mean for stem in pending)


def run_grid(runs: list[PlannedRun], command: str = "peftlab compare", on_step: Callable[[Any], None] | None = None,
             log: Callable[[str], None] = print, isolate: bool = False,
             predicted: dict[str, float] | None = None) -> list[ResultRecord]:
    """Run (or skip, record, resume) every planned run in order; returns every result, grid record included.

    Every run's status is decided before the first one starts, so a settings mismatch fails before any work, and
    checked again just before the run: one that another invocation finished meanwhile (a ``--pilots-only`` job or a
    shard beside this one) is skipped, not run twice.
    Under ``torchrun``/``accelerate launch`` every rank walks the same grid, but only rank 0 evaluates baselines,
    writes files and returns results; the other ranks join each training run and return ``[]``.

    Args:
        runs: from :func:`plan`.
        command: the command line, recorded in each result's ``run_info.command``.
        on_step: passed to :func:`~peftlab.lab.experiment.train_run` (tests interrupt a run with it).
        log: where progress lines go.
        isolate: run each training or evaluation in a child process of its own (:mod:`peftlab.lab.isolate`), so
            that its peak memory is its own and a run the kernel kills is named; single-process grids only.
        predicted: each run's predicted seconds (by stem, from the estimate), for the ETA after each run.
    """
    from peftlab.lab.isolate import run_isolated
    from peftlab.lab.lr_pilot import extend_pilots, resolve, unresolved
    from peftlab.lab.result_record import write_result
    from peftlab.training.distributed import is_main, launch_env

    if isolate and (on_step is not None or launch_env() is not None):
        raise ValueError("run_grid(isolate=True) runs each run in a child process: not with on_step (it does not "
                         "cross processes) nor under a multi-process launch (the ranks must join each run)")
    runs = list(runs)  # pilots past the edge of a learning-rate range are inserted as the grid goes
    pilots_done = pilot_results(runs)
    statuses = {r.stem: run_status(r) for r in runs}
    if not is_main():
        if unresolved(runs):
            raise ConfigError("lr_pilot under a multi-process launch: run the pilots first in one process "
                              "(peftlab compare GRID --pilots-only), then launch the grid")
        for run in runs:
            if run.kind == "train" and statuses[run.stem] in ("new", "resume"):
                _execute(run, statuses[run.stem], {}, command, on_step)
        return []
    counts = {s: list(statuses.values()).count(s) for s in ("done", "finished", "resume", "new")}
    log(f"[compare] {len(runs)} runs: {counts['done']} done earlier, {counts['resume']} to resume, "
        f"{counts['new'] + counts['finished']} to run -> {runs[0].result_path.parent}/")
    finished: list[tuple[str, float]] = []  # (stem, seconds) of the runs this invocation ran
    done: dict[str, ResultRecord] = {}

    def pilot_finished(run: PlannedRun, result: ResultRecord, tag: str) -> None:
        """Count a pilot's result: pilots past the edge of its range, and its group's rate once all are in."""
        pilots_done[run.stem] = result
        for extra in extend_pilots(runs, pilots_done, _read_result):
            statuses[extra.stem] = run_status(extra)
            log(f"{tag}: the best rate of {run.pilot_group} is at the edge of those tried: one more pilot at "
                f"lr {extra.cfg.train.lr:.3g}")
        record = resolve(runs, pilots_done).get(run.pilot_group or "")
        if record is not None:  # this pilot was its group's last one
            log(f"{tag}: lr pilot of {run.pilot_group}: lr {record['chosen_lr']:.3g} chosen "
                f"(x{record['chosen_factor']:g} the untuned rate), validation loss "
                f"{_loss(record['chosen_val_loss'])} against {_loss(record['default_val_loss'])} untuned")

    k = 0
    while k < len(runs):
        run, k = runs[k], k + 1
        status = statuses[run.stem]
        tag = f"[{k}/{len(runs)}] {run.stem}"
        meanwhile = False
        if status != "done":  # another invocation (a --pilots-only job, a shard) may have run it since the plan
            status = statuses[run.stem] = run_status(run)
            meanwhile = status == "done"
        if status == "done":
            done[run.stem] = _read_result(run.result_path)
            log(f"{tag} done {'by another invocation meanwhile' if meanwhile else 'earlier'}, skipped")
            if meanwhile and run.kind == PILOT:  # count it as if it had run here
                pilot_finished(run, done[run.stem], tag)
            continue
        log(f"{tag} ..." + {"resume": " (resuming from its checkpoint)", "finished": " (recording the finished run)"}
            .get(status, ""))
        t0 = time.perf_counter()
        ran = run.kind != LEAD_3 and status != "finished"  # a model ran here (not derived, not recorded)
        if isolate and ran:
            result = run_isolated(run.stem, _execute, run, status, {}, command, None)
        else:
            result = _execute(run, status, done, command, on_step)
        assert result is not None  # rank 0 (the helper ranks returned above)
        if ran:
            result = dataclasses.replace(result, run_info=dataclasses.replace(
                result.run_info, process="own" if isolate else "shared"))
        result = dataclasses.replace(result, grid=_grid_cell(run, result))
        write_result(run.result_path, result)
        done[run.stem] = result
        seconds = time.perf_counter() - t0
        if run.kind == PILOT:
            pilot_finished(run, result, tag)
        if status in ("new", "resume") and run.kind != LEAD_3:
            finished.append((run.stem, seconds))
        pending = [r.stem for r in runs[k:] if statuses[r.stem] in ("new", "resume") and r.kind != LEAD_3]
        eta = _eta(pending, finished, predicted or {})
        log(f"{tag} done in {seconds:.0f}s, ETA {_fmt_duration(eta)}")
        used = result.train_info.train_examples
        if run.kind == "train" and run.grid["n_train"] is not None and used is not None and used < run.grid["n_train"]:
            log(f"{tag}: note: N={run.grid['n_train']} asked for, but the training split has only {used} examples")
    return [done[r.stem] for r in runs if r.kind != PILOT]


def pilot_results(runs: list[PlannedRun]) -> dict[str, ResultRecord]:
    """The results of the pilots that earlier invocations finished (with those past an edge inserted into ``runs``),
    by stem; every train run whose pilots have all finished gets its learning rate (:mod:`peftlab.lab.lr_pilot`)."""
    from peftlab.lab.lr_pilot import extend_pilots, resolve

    finished = {r.stem: _read_result(r.result_path) for r in runs if r.kind == PILOT and r.result_path.exists()}
    extend_pilots(runs, finished, _read_result)
    resolve(runs, finished)
    return finished


def _loss(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------------------------------- output


def summary_table(results: list[ResultRecord], split: str = "test") -> str:
    """One row per (method, variant, N): each metric's mean (± sample sd over seeds), trainable params, time."""
    from peftlab.lab.table import METRIC_ORDER

    groups: dict[tuple[str, str, Any], list[ResultRecord]] = {}
    for r in results:
        g = r.grid
        assert g is not None  # every result of a grid carries its cell
        groups.setdefault((g.method, g.variant, g.n_train), []).append(r)
    metrics = [m for m in METRIC_ORDER if any(r.metric(split, m) is not None for r in results)]
    header = ["method", "variant", "N", "seeds", *metrics, "trainable", "train s"]
    rows = [header]
    for (method, variant, n), members in groups.items():
        row = [method, variant, str(n), str(len(members))]
        for m in metrics:
            values = [r.metric(split, m) for r in members if r.metric(split, m) is not None]
            sd = f"±{statistics.stdev(values):.2f}" if len(values) > 1 else ""
            row.append(f"{statistics.mean(values):.2f}{sd}" if values else "-")
        row.append(f"{members[0].train_info.trainable_params or 0:,}")
        times = [r.train_info.train_seconds for r in members if r.train_info.train_seconds is not None]
        row.append(f"{statistics.mean(times):.0f}" if times else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def describe_plan(runs: list[PlannedRun]) -> str:
    """One line per run: its number, stem, what an invocation would do with it, and its method options."""
    action = {"done": "skip (done)", "finished": "record (finished)", "resume": "resume", "new": "run"}
    lines = []
    runs = list(runs)
    pilot_results(runs)
    for k, run in enumerate(runs, 1):
        options = "" if run.kind != "train" else f"  {run.cfg.method.name} {json.dumps(run.cfg.method.options)}"
        if run.kind == PILOT:
            options = f"  lr {run.cfg.train.lr:.3g} for {run.cfg.train.max_steps} steps"
        elif run.pilot_group is not None:
            options += "  lr: " + (f"{run.cfg.train.lr:.3g} (pilot)" if "lr_pilot" in run.grid else "from its pilots")
        lines.append(f"[{k}/{len(runs)}] {run.stem:<48} {action[run_status(run)]:<18}{options}".rstrip())
    return "\n".join(lines)


def compare(grid_path: str | Path, overrides: list[str] | None = None, dry_run: bool = False,
            command: str = "peftlab compare", shard: str | None = None,
            pilots_only: bool = False, estimate: bool = False, isolate: bool = False) -> list[ResultRecord]:
    """Load, plan and run a grid (or shard ``k/n`` of it, :mod:`peftlab.lab.shard`; or only its learning-rate pilots);
    prints progress and a summary table. Returns the results (none on a dry run or for pilots only).

    ``isolate`` runs each run in a child process of its own (:func:`run_grid`), as the ``peftlab compare`` command
    does in a single process; it is ignored under a multi-process launch, whose ranks join each run."""
    from peftlab.lab.lr_pilot import unresolved
    from peftlab.lab.shard import parse_shard, select_shard

    spec = load_grid(grid_path, overrides)
    runs = plan(spec)
    lock: dict[str, str] = {}
    if pilots_only:
        runs = [r for r in runs if r.kind == PILOT]
        if not runs:
            raise ConfigError(f"--pilots-only: {grid_path} has no lr_pilot: (nothing to run)")
        lock["name"] = ".lock-pilots"
    elif shard is not None:
        k, n = parse_shard(shard)
        # Shards train at rates their pilots chose: every pilot must have finished (one process, --pilots-only).
        pilot_results(runs)
        runs = [r for r in runs if r.kind != PILOT]
        pending = unresolved(runs)
        if pending and not dry_run:
            raise ConfigError(f"--shard: the lr pilots of {', '.join(pending)} have not finished; run them first in "
                              f"one process: peftlab compare {grid_path} --pilots-only (same overrides), then the "
                              "shards")
        runs = select_shard(runs, [r.kind for r in runs], k, n)
        lock["name"] = f".lock-shard-{k}-of-{n}"  # shards share the results folder; each run's out has its own lock
        print(f"[compare] shard {k}/{n}: {len(runs)} of the grid's runs")
        if not runs:
            return []
    check_models(runs)
    if estimate:  # the predicted time of each run and in all (peftlab.lab.estimate); nothing runs
        if dry_run:
            raise ConfigError("--estimate and --dry-run: give one (--estimate also lists every run)")
        from peftlab.lab.estimate import print_estimate

        print_estimate(runs, Path(spec.results) / spec.name, run_status)
        return []
    if dry_run:
        print(describe_plan(runs))
        return []
    from peftlab.training.distributed import is_main, launch_env
    from peftlab.training.run_lock import folder_lock

    # One invocation per results folder: two would train the same runs into the same run folders.
    with folder_lock(Path(spec.results) / spec.name, "results", enabled=is_main(), **lock):
        predicted: dict[str, float] = {}
        if is_main():  # the predicted total and finish time; estimate/predicted.json keeps each run's prediction
            from peftlab.lab.estimate import predict_for_grid

            estimate = predict_for_grid(runs, Path(spec.results) / spec.name, run_status)
            predicted = {r.stem: r.seconds["total"] for r in estimate.runs} if estimate is not None else {}
        results = run_grid(runs, command=command, isolate=isolate and launch_env() is None, predicted=predicted)
    if pilots_only or not results:  # only pilots, or a helper rank of a multi-process launch
        return []
    root = Path(spec.results) / spec.name
    print(f"\n{spec.name}: {runs[0].cfg.task.name}, {runs[0].cfg.model.name} (test split)\n")
    print(summary_table(results))
    print(f"\nresults: {root}/   report: peftlab report {spec.results}")
    return results


def cmd_compare(ns: argparse.Namespace) -> int:
    """The ``peftlab compare`` handler; an interrupt exits 130 with a hint (finished runs are kept)."""
    command = "peftlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        compare(ns.grid, ns.overrides, ns.dry_run, command=command, shard=ns.shard, pilots_only=ns.pilots_only,
                estimate=ns.estimate, isolate=not ns.in_process)
    except KeyboardInterrupt:
        print("\npeftlab: interrupted; finished runs are kept and the interrupted run resumes from its last "
              "checkpoint: run the same command again", file=sys.stderr)
        return 130
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``compare`` to the ``peftlab`` command's subparsers."""
    text = "run a grid of methods x variants x seeds x training-set sizes, with baselines, and print a summary"
    p = subparsers.add_parser("compare", help=text, description=text, epilog=GRID_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", metavar="GRID.yaml", help="grid file (see configs/compare/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="grid keys or shared-section keys")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what would be done with each; run none")
    p.add_argument("--estimate", action="store_true",
                   help="predict each run's wall time on this machine and the total (a short calibration, cached in "
                        "<results>/<name>/estimate/cache.json) with the expected finish time; run none")
    p.add_argument("--shard", metavar="k/n", default=None,
                   help="run only shard k of n (1 <= k <= n): a deterministic split of the grid's runs for a job "
                        "array or n machines sharing the results folder; `peftlab report` merges them")
    p.add_argument("--pilots-only", action="store_true",
                   help="run only the grid's learning-rate pilots (lr_pilot:), e.g. before starting --shard jobs")
    p.add_argument("--in-process", action="store_true",
                   help="run every run in this process instead of a child process each (then memory one run leaves "
                        "behind counts in the next run's peak)")
    p.set_defaults(func=cmd_compare)
    return p
