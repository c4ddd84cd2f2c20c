"""`peftlab demo`: the built-in end-to-end example, offline, on the real SmolLM2-135M and generated data.

It evaluates the base model zero-shot, trains LoRA, prompt tuning and last-layer tuning on the generated
table-to-text data, evaluates each on the demo test split, and prints one comparison table. Runs finished earlier
(a ``result.json`` in their folder) are reused, so an interrupted demo continues where it stopped.
Sized to finish in well under 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftlab.config import load_config
from peftlab.lab.experiment import RESULT_NAME, eval_run, train_run
from peftlab.lab.table import format_table

COMMON = ["task=table-to-text", "data=demo", "data.max_validation=40", "data.max_test=50", "eval.batch_size=25",
          "eval.max_new_tokens=48", "train.batch_size=8", "train.max_steps=40", "train.eval_every=20",
          "train.eval_examples=0", "train.log_every=10", "train.warmup_steps=4"]
# (run name, method overrides)
RUNS = [
    ("lora", ["method=lora", "method.r=8", "method.target_modules=[q,v]"]),
    ("prompt-tuning", ["method=prompt-tuning", "method.n_tokens=16", "method.init=vocab"]),
    ("last-layer", ["method=last-layer"]),
]


def run_demo(overrides: list[str], root: str = "runs/demo") -> list[dict]:
    """Run (or reuse) the demo runs under ``root`` and print the comparison table; returns the results."""
    results = []
    zero_dir = Path(root) / "zero-shot"
    results.append(_reuse(zero_dir) or eval_run(load_config(None, COMMON + overrides + [f"out={zero_dir}"]),
                                                 command="peftlab demo (zero-shot)"))
    for name, method in RUNS:
        out = Path(root) / name
        cfg = load_config(None, COMMON + method + overrides + [f"out={out}", "resume=true"])
        results.append(_reuse(out) or train_run(cfg, command=f"peftlab demo ({name})"))
    print("\nDemo: SmolLM2-135M on the built-in table-to-text data (test split, generated text scored)\n")
    print(format_table(results))
    print(f"\nPer-run results, adapters and metrics.jsonl are under {root}/")
    return results


def _reuse(out: Path) -> dict | None:
    path = out / RESULT_NAME
    if path.exists():
        print(f"[demo] reusing {path}")
        return json.loads(path.read_text())
    return None
