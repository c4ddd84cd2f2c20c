"""The grid's lr_pilot: parsing, the planned pilots, the choice rule, and a real pilot -> train grid on a tiny Llama
(resumable, shard-safe, recorded in every run and shown in the report)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from peftlab.config import ConfigError
from peftlab.lab import compare as compare_mod
from peftlab.lab.compare import compare, plan
from peftlab.lab.compare_grid import PILOT, load_grid
from peftlab.lab.lr_pilot import choose, pilot_loss
from peftlab.lab.result_record import ResultRecord, RunInfo, TrainInfo, ValPoint, read_result

FAST = {"data": {"path": "demo", "max_validation": 4, "max_test": 2},
        "train": {"max_steps": 2, "batch_size": 4, "log_every": 1, "eval_examples": 0},
        "eval": {"max_new_tokens": 4, "show_examples": 1}}


def _write(tmp_path, model="tiny", **keys):
    grid = {"model": {"name": str(model)}, "task": {"name": "table-to-text"}, **FAST,
            "results": str(tmp_path / "results"), "name": "t", **keys}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


PILOT_GRID = {"methods": [{"name": "lora", "overrides": {"train.lr": 1e-3}}, "ia3"], "n_train": [4, 8],
              "seeds": [0, 1], "lr_pilot": {"factors": [0.1, 1, 10], "steps": 2, "validation": 3}}


def test_pilots_are_planned_once_per_method_on_the_largest_n_and_first_seed(tmp_path):
    runs = plan(load_grid(_write(tmp_path, **PILOT_GRID)))
    pilots = [r for r in runs if r.kind == PILOT]
    assert [r.stem for r in pilots] == ["pilot--lora--lr0.0001", "pilot--lora--lr0.001", "pilot--lora--lr0.01",
                                        "pilot--ia3--lr0.0003", "pilot--ia3--lr0.003", "pilot--ia3--lr0.03"]
    assert runs.index(pilots[0]) == 1  # after the zero-shot baseline, before every training run
    assert all(r.cfg.data.max_train == 8 and r.cfg.train.seed == 0 for r in pilots)
    assert all(r.cfg.train.max_steps == 2 and r.cfg.data.max_validation == 3 and r.cfg.eval.splits == []
               for r in pilots)
    assert all(r.result_path.parent.name == "pilots" for r in pilots)
    trains = [r for r in runs if r.kind == "train"]
    assert len(trains) == 8 and {r.pilot_group for r in trains} == {"lora", "ia3"}


def test_per_variant_pilots_and_per_method_sizes(tmp_path):
    grid = {"methods": [{"name": "lora", "variants": {"dropout": [0, 0.1]}},
                        {"name": "ia3", "n_train": [8]}, {"name": "lora", "options": {"r": 2}, "n_train": [4]}],
            "n_train": [4, 16], "seeds": [0], "lr_pilot": {"factors": [1, 3], "steps": 2}}
    runs = plan(load_grid(_write(tmp_path, **grid)))
    trains = [(r.stem, r.pilot_group) for r in runs if r.kind == "train"]
    assert trains == [("lora--dropout=0--n4--seed0", "lora.1"), ("lora--dropout=0.1--n4--seed0", "lora.1"),
                      ("lora--default--n4--seed0", "lora.3"), ("lora--dropout=0--n16--seed0", "lora.1"),
                      ("lora--dropout=0.1--n16--seed0", "lora.1"), ("ia3--default--n8--seed0", "ia3")]
    pilots = {r.stem: r for r in runs if r.kind == PILOT}
    # per method: one set of pilots per entry, on its first variant and its own largest N
    assert sorted({r.pilot_group for r in pilots.values()}) == ["ia3", "lora.1", "lora.3"]
    assert {r.pilot_group: r.cfg.data.max_train for r in pilots.values()} == {"lora.1": 16, "lora.3": 4, "ia3": 8}
    assert all(r.cfg.method.options.get("dropout", 0) == 0 for r in pilots.values())
    per_variant = {**grid, "lr_pilot": {"factors": [1, 3], "per": "variant"}, "methods": grid["methods"][:1]}
    groups = {r.pilot_group for r in plan(load_grid(_write(tmp_path, **per_variant))) if r.kind == PILOT}
    assert groups == {"lora--dropout=0", "lora--dropout=0.1"}


def test_min_steps_lengthens_small_training_sets(tiny_llama_dir, tmp_path):
    from peftlab.config import load_config
    from peftlab.lab.experiment import train_run

    result = train_run(load_config(None, [f"model={tiny_llama_dir}", "data=demo", "data.max_train=8",
                                          "train.batch_size=4", "train.min_steps=5", "data.max_validation=2",
                                          "eval.splits=[]", f"out={tmp_path / 'r'}"]))
    assert result.train_info.steps == 5 and result.train_info.epochs_completed == 2.5


@pytest.mark.parametrize(("value", "fragment"), [
    ({"factors": []}, "lr_pilot.factors: must be a non-empty list"),
    ({"factors": [1, -3]}, "numbers > 0"),
    ({"factors": [1, 1]}, "repeats a value"),
    ({"steps": 0}, "lr_pilot.steps: must be an integer > 0"),
    ({"step": 3}, "unknown key 'step' (did you mean 'steps'?)"),
    ("yes", "must be null or a mapping"),
    ({"per": "seed"}, "lr_pilot.per: 'seed' is not one of 'method', 'variant'"),
])
def test_bad_lr_pilot_names_the_key(tmp_path, value, fragment):
    with pytest.raises(ConfigError, match=r"grid\.yaml: lr_pilot") as err:
        load_grid(_write(tmp_path, methods=["lora"], lr_pilot=value))
    assert fragment in str(err.value)


def test_choice_rule():
    cands = [{"factor": 0.3, "lr": 3e-5, "val_loss": 2.0}, {"factor": 1.0, "lr": 1e-4, "val_loss": 1.5},
             {"factor": 3.0, "lr": 3e-4, "val_loss": 1.2}]
    record = choose(cands)
    assert record["chosen_lr"] == 3e-4 and record["default_lr"] == 1e-4 and record["default_val_loss"] == 1.5
    tie = choose([{**cands[0], "val_loss": 1.5}, cands[1], {**cands[2], "val_loss": 1.5}])
    assert tie["chosen_factor"] == 1.0  # ties go to the untuned rate
    diverged = choose([{**c, "val_loss": math.inf} for c in cands])
    assert diverged["chosen_factor"] == 1.0
    assert pilot_loss(ResultRecord(diverged="nan")) == math.inf
    curve = [ValPoint(step=s, loss=v) for s, v in [(1, 2.0), (2, float("nan")), (3, 1.0)]]
    assert pilot_loss(ResultRecord(train_info=TrainInfo(val_curve=curve))) == 1.0


def test_pilot_grid_trains_at_the_chosen_rate_and_resumes(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    grid = {**PILOT_GRID, "methods": [{"name": "lora", "overrides": {"train.lr": 1e-3}}], "n_train": [8],
            "seeds": [0], "lr_pilot": {**PILOT_GRID["lr_pilot"], "extend": 0}}  # extension: tested below
    path = _write(tmp_path, tiny_llama_dir, **grid)
    results = compare(path)
    root = tmp_path / "results" / "t"
    pilots = sorted((root / "pilots").glob("*.json"))
    assert len(pilots) == 3 and len(results) == 2  # zero-shot + one run; pilots are not results
    losses = {read_result(p).grid.lr: pilot_loss(read_result(p)) for p in pilots}
    best_lr = min(losses, key=losses.get)
    run = json.loads((root / "lora--default--n8--seed0.json").read_text())
    record = run["grid"]["lr_pilot"]
    assert record["chosen_lr"] == pytest.approx(best_lr) and record["default_lr"] == pytest.approx(1e-3)
    assert run["train_info"]["lr"] == pytest.approx(best_lr)
    assert run["run_info"]["config"]["train"]["lr"] == pytest.approx(best_lr)
    out = capsys.readouterr().out
    assert "lr pilot of lora: lr" in out and "chosen" in out

    # A second invocation skips pilots and runs, and knows the chosen rate without rerunning anything.
    monkeypatch.setattr(compare_mod, "_execute", lambda *a, **k: pytest.fail("nothing should run"))
    again = compare(path)
    assert [r.grid.stem for r in again] == [r.grid.stem for r in results]
    dry = compare(path, dry_run=True)
    assert dry == [] and f"lr: {best_lr:.3g} (pilot)" in capsys.readouterr().out

    # The report does not mistake pilots for runs, and shows what was picked.
    from peftlab.lab.report_runs import load_runs

    assert len(load_runs(tmp_path / "results")) == 2


def test_shards_need_finished_pilots_and_pilots_only_runs_them(tiny_llama_dir, tmp_path):
    path = _write(tmp_path, tiny_llama_dir, methods=["lora"], n_train=[8], seeds=[0],
                  lr_pilot={"factors": [1, 10], "steps": 1, "validation": 2, "extend": 0})
    with pytest.raises(ConfigError, match=r"--shard: the lr pilots of lora have not finished.*--pilots-only"):
        compare(path, shard="1/2")
    assert compare(path, pilots_only=True) == []
    assert len(list((tmp_path / "results" / "t" / "pilots").glob("*.json"))) == 2
    assert not list((tmp_path / "results" / "t").glob("*.json"))  # no run trained yet
    done = compare(path, shard="1/2") + compare(path, shard="2/2")
    assert sorted(r.grid.stem for r in done) == ["lora--default--n8--seed0", "zero-shot--default--n0--seed0"]


def test_a_diverged_pilot_is_recorded_and_loses(tiny_llama_dir, tmp_path, monkeypatch):
    from peftlab.lab import experiment
    from peftlab.training.trainer import NonFiniteError

    real = experiment.train_run

    def explode_at_high_lr(cfg, command="", on_step=None):
        if cfg.train.lr > 1e-2:
            raise NonFiniteError("train: step 1: the loss (nan) ...")
        return real(cfg, command=command, on_step=on_step)

    monkeypatch.setattr(experiment, "train_run", explode_at_high_lr)
    path = _write(tmp_path, tiny_llama_dir, methods=[{"name": "lora", "overrides": {"train.lr": 1e-3}}],
                  n_train=[8], seeds=[0], baselines=False,
                  lr_pilot={"factors": [1, 100], "steps": 1, "validation": 2, "extend": 0})
    [result] = compare(path)
    record = result.grid.lr_pilot
    assert record.chosen_factor == 1.0
    assert [c.val_loss is None for c in record.candidates] == [False, True]
    diverged = read_result(tmp_path / "results" / "t" / "pilots" / "pilot--lora--lr0.1.json")
    assert diverged.kind == "pilot" and "step 1" in diverged.diverged and diverged.train_info.val_curve == []


def test_report_shows_the_chosen_rates_and_forgetting(tiny_llama_dir, tmp_path):
    from peftlab.lab.report import write_report

    path = _write(tmp_path, tiny_llama_dir, methods=[{"name": "lora", "overrides": {"train.lr": 1e-3}}],
                  n_train=[8], seeds=[0], lr_pilot={"factors": [1, 3], "steps": 1, "validation": 2},
                  eval={**FAST["eval"], "forgetting_data": "demo", "forgetting_field": "references",
                        "forgetting_examples": 2, "forgetting_tokens": 8})
    compare(path)
    markdown, _html = write_report(tmp_path / "results")
    text = markdown.read_text()
    assert "Learning rate per method (lr pilot)" in text and "| lora | default | 0.001 |" in text
    assert "forgetting ΔCE" in text


def _fake_pilot_losses(monkeypatch, best_lr: float) -> list[float]:
    """Pilots 'train' instantly, with a validation loss that is lowest at ``best_lr``; returns the rates tried."""
    from peftlab.lab import experiment

    tried: list[float] = []

    def fake_train(cfg, command="", on_step=None):
        tried.append(cfg.train.lr)
        loss = 1.0 + (math.log10(cfg.train.lr) - math.log10(best_lr)) ** 2
        return ResultRecord(kind="train", run_info=RunInfo(config=cfg.to_dict()),
                            train_info=TrainInfo(val_curve=[ValPoint(step=1, loss=loss)]))

    monkeypatch.setattr(experiment, "train_run", fake_train)
    return tried


@pytest.mark.parametrize(("best", "extend", "chosen"), [(3e-2, 2, 2.7e-2), (3e-2, 1, 9e-3), (2e-3, 2, 3e-3),
                                                        (1e-5, 2, 2.7e-5)])
def test_a_best_rate_at_the_edge_gets_pilots_further_out(tmp_path, tiny_llama_dir, monkeypatch, best, extend, chosen):
    tried = _fake_pilot_losses(monkeypatch, best)
    # A local model: compare's estimate loads its tokenizer (a hub name would wait on the network offline).
    path = _write(tmp_path, tiny_llama_dir, methods=[{"name": "lora", "overrides": {"train.lr": 1e-3}}],
                  n_train=[8], seeds=[0],
                  lr_pilot={"factors": [0.3, 1, 3], "steps": 1, "validation": 2, "extend": extend})
    compare(path, pilots_only=True)
    runs = plan(load_grid(path))
    compare_mod.pilot_results(runs)
    [train] = [r for r in runs if r.kind == "train"]
    assert train.cfg.train.lr == pytest.approx(chosen)
    assert len(tried) == 3 + len(train.grid["lr_pilot"]["candidates"]) - 3
    # Nothing reruns, and a second invocation finds the extra pilots on disk (no new pilot past them).
    again = _fake_pilot_losses(monkeypatch, best)
    compare(path, pilots_only=True)
    assert again == []


def test_a_pilot_another_invocation_finished_meanwhile_is_skipped_and_counted(tmp_path, tiny_llama_dir, monkeypatch,
                                                                             capsys):
    """A grid plans every run's status at its start; a --pilots-only job beside it (the E2E budget grid's pilots
    were split that way) may finish a run before the grid reaches it. The grid then skipped nothing: it failed on
    the run folder it had planned as new, or ran the pilot twice. It now looks again before each run."""
    tried = _fake_pilot_losses(monkeypatch, 1e-2)
    path = _write(tmp_path, tiny_llama_dir, methods=[{"name": "lora", "overrides": {"train.lr": 1e-3}}],
                  n_train=[8], seeds=[0], lr_pilot={"factors": [1, 10], "steps": 1, "validation": 2, "extend": 0})
    pilots = [r for r in plan(load_grid(path)) if r.kind == PILOT]
    from peftlab.lab import experiment

    fake = experiment.train_run

    def beside(cfg, command="", on_step=None):
        if not tried:  # while this grid's first pilot trains, another invocation runs them all
            monkeypatch.setattr(experiment, "train_run", fake)
            compare(path, pilots_only=True)
        return fake(cfg, command=command, on_step=on_step)

    monkeypatch.setattr(experiment, "train_run", beside)
    compare_mod.run_grid(pilots)
    assert sorted(tried) == [1e-3, 1e-3, 1e-2]  # the second pilot ran once, in the other invocation
    out = capsys.readouterr().out
    assert "[2/2] pilot--lora--lr0.01 done by another invocation meanwhile, skipped" in out
    assert "[2/2] pilot--lora--lr0.01: lr pilot of lora: lr 0.01 chosen (x10" in out
