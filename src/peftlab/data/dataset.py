"""Turn one configured split into task :class:`~peftlab.tasks.base.Example` objects, with counts of what was kept."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from peftlab.config import ConfigError, DataConfig
from peftlab.data.readers import open_split
from peftlab.tasks.base import DataError, Example, Task

SPLIT_ROLES = ("train", "validation", "test")


def split_name(data_cfg: DataConfig, which: str) -> str:
    """The configured split name for a role: ``split_name(cfg, "validation")`` is ``cfg.validation_split``.

    Raises:
        ConfigError: ``which`` is not one of train, validation, test.
    """
    if which not in SPLIT_ROLES:
        raise ConfigError(f"split role {which!r} is not one of {', '.join(SPLIT_ROLES)}")
    return getattr(data_cfg, f"{which}_split")


def load_examples(data_cfg: DataConfig, task: Task, split: str, limit: int | None = None,
                  sample_seed: int | None = None) -> tuple[list[Example], dict[str, Any]]:
    """Read ``split`` and map each row through ``task.example_from_row``.

    Rows whose target is empty (the task returns None) are skipped and counted, or rejected with
    ``data.strict``. ``limit`` caps the number of examples: with ``sample_seed`` a seeded random subset of all
    examples (kept in file order; for training, and for the other splits when ``data.eval_sample_seed`` is set),
    without it the first ``limit`` (reading stops there, so ``rows`` counts only the rows read).

    A ``data.path`` that is a single file may be read for any split except the training split
    (``data.train_split``): training needs separate train and validation data.

    Args:
        data_cfg: the data section of the run config.
        task: the task that builds examples from rows.
        split: the split name as stored (see :func:`split_name`).
        limit: at most this many examples; None: all.
        sample_seed: seed of the random subset when ``limit`` applies; None: take the first ``limit``.

    Returns:
        The examples, and stats ``{"rows", "skipped_empty_target", "examples", "source"}``.

    Raises:
        DataError: a bad row (naming ``file:line``), an empty target under ``data.strict``, a single file asked to
            serve as training data, or a split with no usable example.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0 or None, got {limit}")
    if data_cfg.path != "demo" and Path(data_cfg.path).expanduser().is_file() and split == data_cfg.train_split:
        raise DataError(f"data.path {data_cfg.path!r} is a single file; training needs a folder holding "
                        f"{data_cfg.train_split} and {data_cfg.validation_split} split files. A single file can only "
                        "be evaluated on (peftlab eval; classification then needs task.labels, since it cannot read "
                        "its label set from a training split)")
    if sample_seed is None and split != data_cfg.train_split:
        sample_seed = data_cfg.eval_sample_seed  # None: the first ``limit`` examples of an evaluation split
    rows, source = open_split(data_cfg.path, split, data_cfg.hub_config)
    examples: list[Example] = []
    n_rows = skipped = 0
    take_first = limit is not None and sample_seed is None
    for index, (row, where) in enumerate(rows):
        n_rows += 1
        example = task.example_from_row(row, index, where)
        if example is None:
            if data_cfg.strict:
                raise DataError(f"{where}: empty target (field {task.target_field!r}); data.strict=true rejects "
                                "rows with an empty target (data.strict=false skips and counts them)")
            skipped += 1
            continue
        examples.append(example)
        if take_first and len(examples) >= limit:  # type: ignore[operator]
            break
    if limit is not None and sample_seed is not None and len(examples) > limit:
        keep = sorted(random.Random(sample_seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    if not examples:
        raise DataError(f"{source}: no usable examples in split {split!r} ({n_rows} rows read, {skipped} with an "
                        f"empty target field {task.target_field!r})")
    stats = {"rows": n_rows, "skipped_empty_target": skipped, "examples": len(examples), "source": source}
    return examples, stats
