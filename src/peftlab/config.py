"""Run configuration: dataclass defaults <- YAML file <- dotted command-line overrides, merged strictly.

A run is described by one :class:`RunConfig`. Sections (``model``, ``task``, ``data``, ``method``, ``train``,
``eval``) are dataclasses; each field carries its help text in ``metadata["help"]`` so ``--help`` and
``peftlab methods`` can print it. Rules:

* ``section=value`` sets the section's primary field (``method=lora`` is ``method.name=lora``,
  ``data=path`` is ``data.path=path``).
* ``section.key=value`` sets one field; the value is parsed as YAML (``1e-4``, ``true``, ``[q, v]``).
* An unknown key is an error that lists the valid keys. Out-of-range values raise ``ConfigError`` from
  ``validate()`` before any model is loaded.
* ``method.*`` options belong to the chosen method's own config dataclass and are checked against it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The option helpers live in a leaf module (the method folders use them too); re-exported here, where callers
# have always found them.
from peftlab.options import (  # noqa: F401
    ConfigError,
    MethodOptions,
    check,
    check_choice,
    coerce_fields,
    coerce_value,
    field_types,
    opt,
)

CACHE_FROZEN_TRUNK_MODES = ("auto", "on", "off")


def cache_frozen_trunk_mode(value: str | bool, key: str = "train.cache_frozen_trunk") -> str:
    """``train.cache_frozen_trunk`` as one of auto | on | off; YAML 1.1 reads a bare on/off as true/false, so
    booleans are taken as on/off. ``ConfigError`` names ``key`` and the choices otherwise."""
    if isinstance(value, bool):
        value = "on" if value else "off"
    check_choice(value, key, CACHE_FROZEN_TRUNK_MODES)
    return value


@dataclass
class ModelConfig:
    name: str = opt("smollm2-135m", "base model: hub id, local HF folder, .gguf file, or alias 'smollm2-135m'")
    dtype: str = opt("float32", "dtype of the frozen base weights: float32 | bfloat16 | float16")
    trust_remote_code: bool = opt(
        False, "let transformers run the Python code a hub model ships (modeling_*.py); off: only the architectures "
        "installed with transformers load. Turn on only for a model whose author you trust")

    def validate(self, prefix: str = "model") -> None:
        check_choice(self.dtype, f"{prefix}.dtype", ("float32", "bfloat16", "float16"))


@dataclass
class TaskConfig:
    name: str = opt("table-to-text", "task: summarization | classification | table-to-text")
    template: str | None = opt(None, "prompt template with a {source} slot; default: the task's own")
    source_field: str | None = opt(None, "input field of each example; default: the task's own")
    target_field: str | None = opt(None, "target field of each example; default: the task's own")
    labels: list[str] | None = opt(None, "classification label set; default: the labels found in the train split")
    max_source_tokens: int = opt(512, "prompt length cap in tokens; the source is truncated, never the target")
    max_target_tokens: int = opt(128, "target length cap in tokens (training)")
    chat_template: bool = opt(False, "wrap the prompt in the tokenizer's chat template when it has one")

    def validate(self, prefix: str = "task") -> None:
        check(self.max_source_tokens > 0, f"{prefix}.max_source_tokens", "must be > 0")
        check(self.max_target_tokens > 0, f"{prefix}.max_target_tokens", "must be > 0")
        if self.template is not None:
            check("{source}" in self.template, f"{prefix}.template", "must contain the {source} slot")
        if self.labels is not None:
            check(len(set(self.labels)) >= 2, f"{prefix}.labels", "needs at least two distinct labels")


@dataclass
class DataConfig:
    path: str = opt("demo", "dataset: 'demo' (built in), a local folder of split files, or a hub dataset name")
    hub_config: str | None = opt(None, "hub dataset configuration name (e.g. '3.0.0' for cnn_dailymail)")
    train_split: str = opt("train", "name of the training split")
    validation_split: str = opt("validation", "name of the validation split")
    test_split: str = opt("test", "name of the test split")
    max_train: int | None = opt(None, "use at most this many training examples (random, seeded)")
    max_validation: int | None = opt(200, "use at most this many validation examples")
    max_test: int | None = opt(None, "evaluate on at most this many test examples (the first ones)")
    strict: bool = opt(False, "fail on an empty target instead of skipping and counting it")
    seed: int = opt(0, "seed of the training-subset sample")
    eval_sample_seed: int | None = opt(None, "validation/test subsets (max_validation/max_test) are a random sample "
                                             "with this seed (null: the first ones, in file order)")

    def validate(self, prefix: str = "data") -> None:
        for key in ("max_train", "max_validation", "max_test"):
            value = getattr(self, key)
            check(value is None or value > 0, f"{prefix}.{key}", "must be > 0 or null")


@dataclass
class MethodConfig:
    """The method's name plus its options; the options are validated by the method's own config class."""

    name: str = opt("lora", "PEFT method; `peftlab methods` lists them")
    options: dict[str, Any] = opt({}, "method options (method.<key>=value)")


@dataclass
class TrainConfig:
    lr: float | None = opt(None, "peak learning rate; default: the method's own")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    schedule: str = opt("linear", "learning-rate schedule after warmup: linear | cosine | constant")
    warmup_steps: int = opt(0, "linear warmup steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = opt(0.0, "warmup as a fraction of all optimizer steps")
    epochs: float = opt(1.0, "passes over the training set (ignored when max_steps is set)")
    max_steps: int | None = opt(None, "optimizer steps; default: from epochs")
    min_steps: int | None = opt(None, "at least this many optimizer steps when they come from epochs (small training "
                                      "sets then take more passes; a grid's N sweep keeps its small N trainable)")
    batch_size: int = opt(8, "examples per micro-batch, over all processes (torchrun splits each across ranks)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float | None = opt(1.0, "gradient clipping norm; null: no clipping")
    bf16: bool = opt(False, "bfloat16 autocast for the forward/backward (CPU and GPU)")
    gradient_checkpointing: bool = opt(
        False, "recompute each block's activations in the backward pass: less memory for long sequences, "
        "~30% more compute")
    recompute_elementwise: bool = opt(
        False, "keep only the inputs of each block's elementwise parts (MLP activation and gate product, norms) and "
        "recompute them in the backward pass: the same gradients, less activation memory, no matmul recomputed "
        "(Llama family and GPT-2); see models/recompute.py and BENCHMARKS.md")
    release_freed_memory: bool = opt(
        False, "CPU training on glibc: fix the malloc mmap threshold at 128 KiB so freed activations return to the "
        "OS at once instead of fragmenting the heap; on SmolLM2 (LoRA, 4 x 512 tokens) 0.60x the training peak "
        "RSS for 1.48x the step time (page faults); see training/host_memory.py")
    cache_frozen_trunk: str | bool = opt(  # YAML 1.1 reads a bare on/off as a boolean: normalised below
        "auto", "auto | on | off: when only the output head trains (last-layer, untied head), compute each training "
        "example's trunk hidden states once and reuse them in later epochs; when only the top blocks train "
        "(last-blocks), the hidden states entering the first trained block; auto = on when the trunk has no "
        "dropout and the cache fits in 2 GiB on the training device")
    compile: bool = opt(
        False, "torch.compile (inductor, dynamic shapes) each transformer block for the training forward and "
        "backward; the same results within float rounding; on a 2-core Xeon 1.24x (LoRA) and 1.10x (prompt "
        "tuning) faster steps and ~0.8x the training peak, after a warm-up of 16-92 s: worth it for runs of "
        "hundreds of steps or when memory limits (BENCHMARKS.md); see models/compiled_blocks.py")
    seed: int = opt(0, "random seed")
    eval_every: int = opt(0, "validate every N optimizer steps (0: only at the end)")
    eval_examples: int = opt(32, "validation examples scored with the task metric at each validation")
    patience: int = opt(0, "early stopping: validations without a new best loss before stopping (0: off)")
    log_every: int = opt(10, "log the training loss every N optimizer steps")
    save_every: int = opt(0, "write a checkpoint every N optimizer steps (0: only at validations and the end)")
    length_bucketing: bool = opt(True, "group examples of similar length into batches (less padding)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    skip_nonfinite: bool = opt(
        False, "a step whose loss or gradient is NaN/inf: false stops the run with an error naming the step and the "
        "last good checkpoint; true skips that update (counted as skipped_nonfinite_steps in result.json)")

    def validate(self, prefix: str = "train") -> None:
        check(self.lr is None or self.lr > 0, f"{prefix}.lr", "must be > 0")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        check_choice(self.schedule, f"{prefix}.schedule", ("linear", "cosine", "constant"))
        check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        check(0 <= self.warmup_ratio < 1, f"{prefix}.warmup_ratio", "must be in [0, 1)")
        check(self.epochs > 0, f"{prefix}.epochs", "must be > 0")
        check(self.max_steps is None or self.max_steps > 0, f"{prefix}.max_steps", "must be > 0 or null")
        check(self.min_steps is None or self.min_steps > 0, f"{prefix}.min_steps", "must be > 0 or null")
        check(self.batch_size > 0, f"{prefix}.batch_size", "must be > 0")
        check(self.grad_accum > 0, f"{prefix}.grad_accum", "must be > 0")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, f"{prefix}.max_grad_norm", "must be > 0 or null")
        check(self.eval_every >= 0, f"{prefix}.eval_every", "must be >= 0")
        check(self.eval_examples >= 0, f"{prefix}.eval_examples", "must be >= 0")
        check(self.patience >= 0, f"{prefix}.patience", "must be >= 0")
        check(self.log_every > 0, f"{prefix}.log_every", "must be > 0")
        check(self.save_every >= 0, f"{prefix}.save_every", "must be >= 0")
        for other in ("gradient_checkpointing", "recompute_elementwise"):  # not traced and tested together yet
            check(not (self.compile and getattr(self, other)), f"{prefix}.compile",
                  f"is not supported together with {prefix}.{other} (not tested together); set one of them to false")
        self.cache_frozen_trunk = cache_frozen_trunk_mode(self.cache_frozen_trunk, f"{prefix}.cache_frozen_trunk")


@dataclass
class EvalConfig:
    batch_size: int = opt(16, "prompts per generation batch")
    num_beams: int = opt(1, "1: greedy decoding; >1: beam search")
    max_new_tokens: int | None = opt(None, "generation length cap; default: the task's own")
    continuous_batching: bool = opt(True, "greedy decoding refills a batch's finished rows with waiting prompts, so "
                                          "the batch stays full (false: one length-sorted batch after another)")
    compile: bool = opt(False, "torch.compile (inductor) the greedy decode step (needs continuous_batching); off "
                               "until measured to pay on the machine at hand (BENCHMARKS.md)")
    refill_rows: int = opt(1, "continuous batching prefills waiting prompts once this many rows are free (a prompt "
                              "pass over several rows costs less per row than over one); the same tokens in fp32, "
                              "while under bf16 another grouping can change some, as eval.batch_size can")
    splits: list[str] = opt(["test"], "splits to evaluate after training")
    show_examples: int = opt(5, "generated examples stored in the result and printed")
    forgetting_data: str | None = opt(None, "out-of-task text for the forgetting cross-entropy before/after training "
                                            "(a dataset folder, file, 'demo' or hub name; null: not measured)")
    forgetting_split: str = opt("test", "split of forgetting_data to read")
    forgetting_field: str = opt("text", "field of forgetting_data holding the text (e.g. text, article)")
    forgetting_examples: int = opt(32, "texts in the forgetting sample (seeded, the same for every run)")
    forgetting_tokens: int = opt(256, "each forgetting text is cut to this many tokens")

    def validate(self, prefix: str = "eval") -> None:
        check(self.batch_size > 0, f"{prefix}.batch_size", "must be > 0")
        check(self.num_beams > 0, f"{prefix}.num_beams", "must be > 0")
        check(self.max_new_tokens is None or self.max_new_tokens > 0, f"{prefix}.max_new_tokens", "must be > 0")
        check(not self.compile or (self.continuous_batching and self.num_beams == 1), f"{prefix}.compile",
              "compiles the greedy decode step of continuous batching: needs eval.continuous_batching=true and "
              "eval.num_beams=1")
        check(self.refill_rows > 0, f"{prefix}.refill_rows", "must be > 0")
        check(self.show_examples >= 0, f"{prefix}.show_examples", "must be >= 0")
        check(self.forgetting_examples > 0, f"{prefix}.forgetting_examples", "must be > 0")
        check(self.forgetting_tokens >= 2, f"{prefix}.forgetting_tokens", "must be >= 2")
        if self.forgetting_data is not None:
            from peftlab.data.readers import check_data_path

            check_data_path(self.forgetting_data, f"{prefix}.forgetting_data")


@dataclass
class RunConfig:
    model: ModelConfig = opt(ModelConfig(), "base model")
    task: TaskConfig = opt(TaskConfig(), "task")
    data: DataConfig = opt(DataConfig(), "data")
    method: MethodConfig = opt(MethodConfig(), "method")
    train: TrainConfig = opt(TrainConfig(), "training")
    eval: EvalConfig = opt(EvalConfig(), "evaluation")
    out: str = opt("runs/latest", "output folder (checkpoints, adapter, metrics.jsonl, result.json)")
    resume: bool = opt(False, "continue an interrupted run from the checkpoint in `out`")
    adapter: str | None = opt(None, "eval: adapter folder to load onto the base model (none: zero-shot)")

    def validate(self) -> None:
        """Check every section (and the method options) before anything expensive happens."""
        for section in (self.model, self.task, self.data, self.train, self.eval):
            section.validate()
        # The task registry lives above config: imported here, checked before any model loads. The method registry
        # is a leaf module (peftlab.registry) that finds the method folders on first use.
        from peftlab.registry import get_method
        from peftlab.tasks import task_names

        check_choice(self.task.name, "task.name", task_names())
        get_method(self.method.name).build_config(self.method.options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that a bare ``section=value`` sets.
PRIMARY_FIELD = {"model": "name", "task": "name", "data": "path", "method": "name"}


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    by_name = {v.split(".")[-1]: v for v in valid}  # compare the last parts: 'lrr' is near 'lr', not 'train.lr'
    near = difflib.get_close_matches(key.split(".")[-1], list(by_name), n=1)
    hint = f" (did you mean {by_name[near[0]]!r}?)" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(sorted(valid))}")


def _set(cfg: RunConfig, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    top = {f.name for f in dataclasses.fields(RunConfig)}
    head = parts[0]
    if head not in top:
        raise _unknown_key(dotted, sorted(top))
    if len(parts) == 1:
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, head)):
            for k, v in value.items():
                _set(cfg, f"{head}.{k}", v)
            return
        if head in PRIMARY_FIELD:
            parts = [head, PRIMARY_FIELD[head]]
        elif dataclasses.is_dataclass(getattr(cfg, head)):
            raise ConfigError(f"{head}: expected a mapping of {head}.* keys (e.g. {head}: {{key: value}}), got "
                              f"{value!r}")
        else:
            setattr(cfg, head, coerce_value(value, field_types(RunConfig)[head], head))
            return
    section = getattr(cfg, head)
    if not dataclasses.is_dataclass(section):
        raise ConfigError(f"{head!r} is a plain value, not a section; use {head}=...")
    key = parts[1]
    if head == "method" and key not in ("name", "options"):
        if len(parts) != 2:
            raise ConfigError(f"{dotted}: method options are one level deep (method.<key>=value)")
        section.options[key] = value
        return
    valid = [f.name for f in dataclasses.fields(section)]
    if key not in valid or len(parts) != 2:
        raise _unknown_key(dotted, [f"{head}.{k}" for k in valid])
    if head == "method" and key == "options":
        if not isinstance(value, dict):
            raise ConfigError("method.options must be a mapping")
        section.options.update(value)
        return
    setattr(section, key, coerce_value(value, field_types(type(section))[key], dotted))


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value`` and parse the value as YAML (``'1e-4'`` -> 0.0001, ``'[q, v]'`` -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. method.r=16)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-4" as a string; accept scientific notation as a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key, value


def split_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Command-line arguments -> the optional YAML file (the first ``*.yaml``) and the key=value overrides."""
    yaml_path, overrides = None, []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif yaml_path is None and arg.endswith((".yaml", ".yml")):
            yaml_path = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: give a .yaml config file and/or key=value overrides")
    return yaml_path, overrides


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and its line and column (1-based, as editors show)."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def read_yaml_mapping(path: Path, what: str, expected: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ``ConfigError`` naming the file when it is unreadable, not YAML, or not
    a mapping (``what`` names the kind of file, ``expected`` what its top level should hold)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be {expected}")
    return data


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from defaults, an optional YAML file and dotted overrides."""
    cfg = RunConfig()
    if yaml_path is not None:
        path = Path(yaml_path)
        data = read_yaml_mapping(path, "config file", "a mapping of sections")
        try:
            for key, value in data.items():
                _set(cfg, str(key), value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for text in overrides or []:
        key, value = parse_override(text)
        _set(cfg, key, value)
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from ``RunConfig.to_dict()`` output (e.g. a result or checkpoint)."""
    cfg = RunConfig()
    for key, value in data.items():
        _set(cfg, key, value)
    return cfg


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field of a config dataclass, for help screens."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, type_name, default, f.metadata.get("help", "")))
    return rows
