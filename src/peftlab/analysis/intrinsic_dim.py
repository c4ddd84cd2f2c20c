"""The d90 sweep (Aghajanyan et al. 2020, https://arxiv.org/abs/2012.13255, section 4).

Train ``method=intrinsic-dim`` for several subspace sizes d with one shared base config, and compare each run's
task metric with full fine-tuning's (the reference):

    d90 = min { d in the sweep : metric(d) >= 0.9 * metric(full fine-tuning) }

(None when no d reaches it). Also recorded: a log-linear interpolation between the last d below and d90 (an
estimate between sweep points) and, per d, the learning rate used. Layout under the sweep folder::

    <sweep>/d<d>/result.json ...   one train run per d (a finished d, i.e. one with result.json, is reused)
    <sweep>/full/result.json ...   the full fine-tuning reference (unless a reference metric or result is given)

A reused run must have been trained with the same config as the one the sweep would run now (``out`` and
``resume`` aside); otherwise the sweep stops and names the differing keys instead of mixing two experiments.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from peftlab.analysis.output import finite, plt, write_analysis
from peftlab.config import ConfigError, RunConfig, TaskConfig, config_from_dict, load_config
from peftlab.lab.experiment import train_run
from peftlab.lab.result_record import RESULT_NAME, ResultRecord, read_result
from peftlab.methods import get_method
from peftlab.tasks import get_task

METHOD = "intrinsic-dim"
FRACTION = 0.9
REFERENCE_DIR = "full"
_RUN_DIR = re.compile(r"^d(\d+)$")


def d90(points: dict[int, float], reference: float, fraction: float = FRACTION) -> int | None:
    """The smallest d whose metric reaches ``fraction`` of ``reference`` (None when none does).

    Args:
        points: d -> metric (higher is better).
        reference: the full fine-tuning metric.
        fraction: 0.9 for d90.
    """
    threshold = fraction * reference
    reached = [d for d, value in points.items() if value >= threshold]
    return min(reached) if reached else None


def d90_interpolated(points: dict[int, float], reference: float, fraction: float = FRACTION) -> float | None:
    """d90 between sweep points: linear in the metric, logarithmic in d, between the largest d below d90 (which
    must miss the threshold) and d90 itself. None when d90 is None or the first point already reaches it."""
    hit = d90(points, reference, fraction)
    below = [d for d in points if hit is not None and d < hit]
    if hit is None or not below:
        return None
    prev, threshold = max(below), fraction * reference
    lo, hi = points[prev], points[hit]
    if hi <= lo:
        return float(hit)
    t = (threshold - lo) / (hi - lo)
    return 10 ** (math.log10(prev) + t * (math.log10(hit) - math.log10(prev)))


def parse_dims(text: str) -> list[int]:
    """``"10,100,1e3"`` -> [10, 100, 1000] (sorted, unique); every d must be a positive integer."""
    dims = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--d: {item.strip()!r} is not a number (expected e.g. --d 10,100,1000)") from None
        if value < 1 or not value.is_integer():
            raise ConfigError(f"--d: {item.strip()!r} must be an integer >= 1")
        dims.append(int(value))
    return sorted(set(dims))


def sweep_config(yaml_path: str | None, overrides: list[str], d: int, sweep_dir: Path,
                 scale_lr_at: int | None = None) -> RunConfig:
    """The run config of one d: the base config with ``method=intrinsic-dim method.d=<d>`` into ``<sweep>/d<d>``.

    With ``scale_lr_at = d0`` the learning rate is lr * sqrt(d0 / d), lr being ``train.lr`` or the method's default
    (one Adam step moves the weights by ~lr * sqrt(d), so this keeps the step size of d0 at every d).
    """
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key == "method.d" or (key in ("method", "method.name") and text.split("=", 1)[1].strip() != METHOD):
            raise ConfigError(f"{text!r}: the sweep sets method={METHOD} and method.d itself; give d values with --d")
    declared = _yaml_method(yaml_path)
    if declared not in (None, METHOD):
        raise ConfigError(f"{yaml_path}: sets method {declared!r}, but the sweep trains {METHOD}; use a config "
                          f"without a method section (its options and train.lr belong to {declared}) or with "
                          f"method: {METHOD}")
    cfg = load_config(yaml_path, [*overrides, f"method={METHOD}", f"method.d={d}", f"out={sweep_dir / f'd{d}'}",
                                  "resume=true"])
    if scale_lr_at is not None:
        base = cfg.train.lr or get_method(METHOD).default_lr
        cfg.train.lr = base * math.sqrt(scale_lr_at / d)
    return cfg


def _yaml_method(yaml_path: str | None) -> str | None:
    """The method name a YAML config sets explicitly (``method: lora`` or ``method: {name: lora}``), else None."""
    if yaml_path is None:
        return None
    try:
        data = yaml.safe_load(Path(yaml_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None  # load_config reports the problem with its own message
    method = data.get("method") if isinstance(data, dict) else None
    if isinstance(method, dict):
        return method.get("name")
    return method if isinstance(method, str) else None


def reference_config(cfg: RunConfig, sweep_dir: Path, lr: float | None = None) -> RunConfig:
    """Full fine-tuning with everything else of ``cfg``; ``train.lr`` is ``lr`` or full's own default (the sweep's
    learning rate is for theta_d and far too large for the weights themselves)."""
    data = cfg.to_dict()
    data["method"] = {"name": "full", "options": {}}
    data["train"] = {**data["train"], "lr": lr}
    data["out"] = str(sweep_dir / REFERENCE_DIR)
    ref = config_from_dict(data)
    ref.validate()
    return ref


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def config_differences(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Dotted keys whose value differs between a stored run config and ``cfg`` (``out`` and ``resume`` ignored)."""
    want = _flatten(json.loads(json.dumps(cfg.to_dict(), default=str)))
    have = _flatten(stored)
    keys = sorted((set(want) | set(have)) - {"out", "resume"})
    return [f"{k}: stored {have.get(k)!r} vs now {want.get(k)!r}" for k in keys if have.get(k) != want.get(k)]


def run_or_reuse(cfg: RunConfig, label: str) -> ResultRecord:
    """``train_run(cfg)`` (continuing an interrupted run), or the finished result in ``cfg.out``; either must have
    been started with the same config."""
    path, started = Path(cfg.out) / RESULT_NAME, Path(cfg.out) / "config.json"
    result = read_result(path) if path.exists() else None
    stored = result.run_info.config if result else json.loads(started.read_text()) if started.exists() else None
    if stored is not None:
        diffs = config_differences(stored, cfg)
        if diffs:
            raise ConfigError(f"{path if result else started} was trained with a different config "
                              f"({'; '.join(diffs[:5])}); use another --out or remove that run")
    if result is not None:
        print(f"[intrinsic-dim] reusing {path}", file=sys.stderr)
        return result
    print(f"[intrinsic-dim] training {label} -> {cfg.out}", file=sys.stderr)
    result = train_run(cfg, command=f"peftlab analyze intrinsic-dim ({label})")
    assert result is not None  # a sweep runs in one process
    return result


def metric_of(result: ResultRecord, where: str, metric: str | None = None, split: str | None = None
              ) -> tuple[float, str, str]:
    """(value, metric name, split) of a result: by default the task's primary metric on the test split (or the
    first evaluated split). ``where`` names the file in errors."""
    metrics = result.metrics
    if not metrics:
        raise ValueError(f"{where}: the result has no evaluated splits")
    split = split or ("test" if "test" in metrics else next(iter(metrics)))
    if split not in metrics:
        raise ValueError(f"{where}: no metrics for split {split!r}; evaluated: {', '.join(metrics)}")
    if metric is None:
        task = result.run_info.config_value("task", "name")
        metric = get_task(TaskConfig(name=task)).primary_metric
    values = result.scores_of(split)
    if not isinstance(values.get(metric), (int, float)):
        names = [k for k, v in values.items() if isinstance(v, (int, float))]
        raise ValueError(f"{where}: no metric {metric!r} in split {split!r}; available: {', '.join(names)}")
    return float(values[metric]), metric, split


def summarize_sweep(results: dict[int, tuple[ResultRecord, str]], reference: float, reference_source: str,
                    metric: str | None = None, split: str | None = None) -> dict[str, Any]:
    """The sweep's JSON: one point per d (metric, lr, trainable params, result path), the reference and d90."""
    if not results:
        raise ValueError("no intrinsic-dim results to summarize")
    points = []
    for d in sorted(results):
        result, where = results[d]
        value, metric, split = metric_of(result, where, metric, split)
        info = result.train_info
        points.append({"d": d, "metric": value, "lr": info.lr, "trainable_params": info.trainable_params,
                       "D": info.method.facts.get("D") if info.method else None, "steps": info.steps,
                       "result": where})
    values = {p["d"]: p["metric"] for p in points}
    return {"metric": metric, "split": split, "fraction": FRACTION,
            "reference": {"metric": reference, "source": reference_source}, "threshold": FRACTION * reference,
            "d90": d90(values, reference), "d90_interpolated": finite(d90_interpolated(values, reference)),
            "points": points}


def plot_sweep(data: dict[str, Any]) -> plt.Figure:
    """Metric vs d (log x) with the full fine-tuning metric, the 90% line and d90 marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ds = [p["d"] for p in data["points"]]
    ax.plot(ds, [p["metric"] for p in data["points"]], "o-", color="C0", label=f"intrinsic-dim ({data['split']})")
    ax.axhline(data["reference"]["metric"], color="0.4", linestyle="--", label="full fine-tuning")
    ax.axhline(data["threshold"], color="C3", linestyle=":", label=f"{data['fraction']:.0%} of full fine-tuning")
    if data["d90"] is not None:
        ax.axvline(data["d90"], color="C3", alpha=0.5, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("intrinsic dimension d")
    ax.set_ylabel(data["metric"])
    interp = f" (interpolated ~{data['d90_interpolated']:.0f})" if data["d90_interpolated"] is not None else ""
    ax.set_title(f"d90 = {data['d90'] if data['d90'] is not None else 'not reached'}{interp}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _given_reference(reference_metric: float | None, reference_result: str | None, metric: str | None,
                     split: str | None) -> tuple[float, str] | None:
    if reference_metric is not None and reference_result is not None:
        raise ConfigError("give either --reference-metric or --reference, not both")
    if reference_metric is not None:
        return float(reference_metric), "given"
    if reference_result is not None:
        value, _, _ = metric_of(read_result(reference_result), reference_result, metric, split)
        return value, str(reference_result)
    return None


def run_sweep(yaml_path: str | None, overrides: list[str], dims: list[int], out: str | Path, *,
              reference_metric: float | None = None, reference_result: str | None = None,
              reference_lr: float | None = None, scale_lr_at: int | None = None, metric: str | None = None,
              split: str | None = None, stem: str = "intrinsic_dim") -> Path:
    """Train (or reuse) every d under ``<out>/intrinsic-dim/`` and the full reference, then write JSON + PNG."""
    if not dims:
        raise ConfigError("--d: give at least one intrinsic dimension")
    sweep_dir = Path(out) / "intrinsic-dim"
    configs = {d: sweep_config(yaml_path, overrides, d, sweep_dir, scale_lr_at) for d in dims}  # all checked first
    reference = _given_reference(reference_metric, reference_result, metric, split)
    results = {d: (run_or_reuse(cfg, f"d={d}"), str(Path(cfg.out) / RESULT_NAME)) for d, cfg in configs.items()}
    if reference is None:
        ref_cfg = reference_config(configs[dims[0]], sweep_dir, reference_lr)
        where = str(Path(ref_cfg.out) / RESULT_NAME)
        reference = (metric_of(run_or_reuse(ref_cfg, "full fine-tuning"), where, metric, split)[0], where)
    data = summarize_sweep(results, *reference, metric, split)
    data["sweep_dir"] = str(sweep_dir)
    return write_analysis(out, stem, "intrinsic-dim", data, plot_sweep(data))


def collect_results(sweep_dir: str | Path) -> dict[int, tuple[ResultRecord, str]]:
    """d -> (result, path) for every finished ``<sweep_dir>/d<d>/result.json`` (d read from the run's config)."""
    folder = Path(sweep_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--from {folder}: no such folder (expected the sweep folder holding d<d>/)")
    found: dict[int, tuple[ResultRecord, str]] = {}
    for run in sorted(p for p in folder.iterdir() if _RUN_DIR.match(p.name)):
        path = run / RESULT_NAME
        if not path.exists():
            print(f"[intrinsic-dim] {run}: unfinished (no {RESULT_NAME}), left out", file=sys.stderr)
            continue
        result = read_result(path)
        name = result.run_info.config_value("method", "name")
        if name != METHOD:
            raise ValueError(f"{path}: method {name!r}, expected {METHOD!r}")
        options = result.run_info.config_value("method", "options")
        d = get_method(METHOD).build_config(options).d  # the d it was trained with, or the default
        if d in found:
            raise ValueError(f"{path} and {found[d][1]} are both runs with d={d}; keep one")
        found[d] = (result, str(path))
    if not found:
        raise FileNotFoundError(f"--from {folder}: no finished d<d>/{RESULT_NAME} runs here")
    return found


def run_from_results(sweep_dir: str | Path, out: str | Path, *, reference_metric: float | None = None,
                     reference_result: str | None = None, metric: str | None = None, split: str | None = None,
                     stem: str = "intrinsic_dim") -> Path:
    """Build the JSON + PNG from finished runs only (no training); the reference defaults to
    ``<sweep_dir>/full/result.json``."""
    results = collect_results(sweep_dir)
    reference = _given_reference(reference_metric, reference_result, metric, split)
    if reference is None:
        path = Path(sweep_dir) / REFERENCE_DIR / RESULT_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no full fine-tuning result; pass --reference RESULT.json or "
                                    f"--reference-metric VALUE")
        reference = (metric_of(read_result(path), str(path), metric, split)[0], str(path))
    data = summarize_sweep(results, *reference, metric, split)
    data["sweep_dir"] = str(sweep_dir)
    return write_analysis(out, stem, "intrinsic-dim", data, plot_sweep(data))
