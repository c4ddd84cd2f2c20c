"""``peftlab analyze {subspace,amplification,prompt-tokens,intrinsic-dim}``: parse, call one function, print a summary.

Each writes ``<out>/<name>.json`` and ``<out>/<name>.png`` (``--out`` defaults to ``results/analysis``, ``--name``
to the analysis' own name). Heavy imports happen inside the handlers, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftlab.config import ConfigError, split_args

DEFAULT_OUT = "results/analysis"

EPILOG = """examples:
  peftlab analyze subspace runs/lora-r8/adapter runs/lora-r64/adapter
  peftlab analyze amplification runs/lora-r8/adapter
  peftlab analyze prompt-tokens runs/prompt/adapter --top-k 5
  peftlab analyze intrinsic-dim task=table-to-text data=../shared/data/e2e_nlg data.max_train=3000 \
      train.max_steps=200 --d 100,1000,10000 --scale-lr-at 1000
  peftlab analyze intrinsic-dim --from results/analysis/intrinsic-dim"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``analyze`` and its four sub-commands to the CLI's sub-parsers; returns the ``analyze`` parser."""
    text = "analyse adapters and sweeps: LoRA subspaces, amplification, soft-prompt tokens, intrinsic-dim d90"
    parser = subparsers.add_parser("analyze", help=text, description=text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="analysis", required=True)
    p = _sub(sub, "subspace", "normalized subspace similarity phi(i, j) of two LoRA adapters (Hu et al. 2021, Fig. 3)")
    p.add_argument("adapter_a", help="first LoRA adapter folder (peftlab or PEFT format), e.g. the r=8 run")
    p.add_argument("adapter_b", help="second LoRA adapter folder, e.g. the r=64 run or another seed")
    p.add_argument("--matrix", choices=("A", "B"), default="A",
                   help="A: right-singular vectors of A (input directions, as the paper); B: left-singular of B")
    p.add_argument("--layers", default=None,
                   help="layers drawn in the figure: 'all' or e.g. '0,15,29' (default: up to 6 evenly spaced; "
                        "the JSON always has every layer)")
    p.set_defaults(func=_cmd_subspace)
    p = _sub(sub, "amplification", "||U^T W V||_F for delta W / W / random directions and the amplification "
                                   "factor (Hu et al. 2021, Table 7)")
    p.add_argument("adapter", help="LoRA adapter folder (peftlab or PEFT format)")
    p.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter config)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random comparison matrix")
    p.add_argument("--device", default="cpu", help="where the base model is loaded (cpu | cuda | auto)")
    p.set_defaults(func=_cmd_amplification)
    p = _sub(sub, "prompt-tokens", "nearest vocabulary tokens (cosine) of each virtual token of a soft prompt")
    p.add_argument("adapter", help="prompt-tuning adapter folder (peftlab or PEFT format)")
    p.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter config)")
    p.add_argument("--top-k", type=int, default=5, help="nearest tokens listed per virtual token")
    p.set_defaults(func=_cmd_prompt_tokens)
    p = _sub(sub, "intrinsic-dim", "d90 sweep: train intrinsic-dim for several d (and full fine-tuning as the "
                                   "reference), report the smallest d reaching 90 percent of full fine-tuning")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="base config shared by every run (as for peftlab train); the sweep sets method and out")
    p.add_argument("--d", "--dims", dest="dims", default=None, help="comma-separated d values, e.g. 10,100,1000")
    p.add_argument("--from", dest="from_dir", default=None,
                   help="no training: summarize the finished runs in this sweep folder (holding d<d>/ and full/)")
    p.add_argument("--reference-metric", type=float, default=None,
                   help="full fine-tuning metric to compare with (skips the reference run)")
    p.add_argument("--reference", default=None, help="result.json of a full fine-tuning run to compare with")
    p.add_argument("--reference-lr", type=float, default=None,
                   help="learning rate of the full fine-tuning reference run (default: full's own default)")
    p.add_argument("--scale-lr-at", type=int, default=None, metavar="D0",
                   help="train.lr is the rate at d=D0; each d gets lr * sqrt(D0 / d) (default: one lr for all d)")
    p.add_argument("--metric", default=None, help="metric compared (default: the task's primary metric)")
    p.add_argument("--split", default=None, help="split whose metric is compared (default: test)")
    p.set_defaults(func=_cmd_intrinsic_dim)
    return parser


def _sub(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, description=text)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--name", default=name.replace("-", "_"),
                   help="file stem of the JSON and PNG (default: %(default)s)")
    return p


def _parse_layers(text: str | None) -> list[int] | str | None:
    if text is None or text == "all":
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--layers: expected 'all' or comma-separated integers (e.g. 0,15,29), "
                          f"got {text!r}") from None



def _report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    print(f"\nwrote {path} and {path.with_name(data['figure'])}")
    return data


def _cmd_subspace(ns: argparse.Namespace) -> int:
    from peftlab.analysis.subspace import run_subspace

    path = run_subspace(ns.adapter_a, ns.adapter_b, ns.out, ns.name, ns.matrix, _parse_layers(ns.layers))
    data = json.loads(path.read_text())
    print(f"phi per module kind, mean over layers (chance level in brackets), r={data['r_a']} vs r={data['r_b']}:")
    for kind, mean in data["summary"].items():
        print(f"  {kind:<14} phi(1,1) = {mean['phi_1_1']:.3f} [{mean['random_1_1']:.3f}]   "
              f"phi(1,{data['r_b']}) = {mean['phi_1_all']:.3f} [{mean['random_1_all']:.3f}]   "
              f"({mean['n_layers']} layers)")
    _report(path)
    return 0


def _cmd_amplification(ns: argparse.Namespace) -> int:
    from peftlab.analysis.amplification import run_amplification

    path = run_amplification(ns.adapter, ns.out, ns.name, ns.model, ns.seed, ns.device)
    data = json.loads(path.read_text())
    print(f"mean over layers, r={data['r']}:  ||U^T W V||_F with U, V from delta W / W / random; norms; factor")
    for kind, s in data["summary"].items():
        factor = f"{s['amplification']:.2f}" if s["amplification"] is not None else "-"
        print(f"  {kind:<14} {s['proj_delta']:.3f} / {s['proj_weight']:.3f} / {s['proj_random']:.3f}   "
              f"||W||_F {s['norm_weight']:.2f}  ||delta W||_F {s['norm_delta']:.3f}  amplification {factor}")
    _report(path)
    return 0


def _cmd_prompt_tokens(ns: argparse.Namespace) -> int:
    from peftlab.analysis.prompt_tokens import run_prompt_tokens

    path = run_prompt_tokens(ns.adapter, ns.out, ns.name, ns.model, ns.top_k)
    data = json.loads(path.read_text())
    for entry in data["tokens"]:
        near = ", ".join(f"{t.get('token', t['id'])!r} {t['cosine']:.2f}" for t in entry["nearest"][:3])
        init = f"   (init {entry['init'].get('token', entry['init']['id'])!r}, rank {entry['init']['rank']})" \
            if "init" in entry else ""
        print(f"  p{entry['index']:<3} {near}{init}")
    _report(path)
    return 0


def _cmd_intrinsic_dim(ns: argparse.Namespace) -> int:
    from peftlab.analysis.intrinsic_dim import parse_dims, run_from_results, run_sweep

    common = {"reference_metric": ns.reference_metric, "reference_result": ns.reference, "metric": ns.metric,
              "split": ns.split, "stem": ns.name}
    if ns.from_dir is not None:
        if ns.args or ns.dims:
            raise ConfigError("--from summarizes finished runs; it takes no config, overrides or --d")
        path = run_from_results(ns.from_dir, ns.out, **common)
    else:
        if not ns.dims:
            raise ConfigError("--d is required (e.g. --d 10,100,1000), or --from DIR to summarize finished runs")
        path = run_sweep(*split_args(ns.args), parse_dims(ns.dims), ns.out, reference_lr=ns.reference_lr,
                         scale_lr_at=ns.scale_lr_at, **common)
    data = json.loads(path.read_text())
    print(f"{data['metric']} ({data['split']}) vs d; full fine-tuning {data['reference']['metric']:.2f}, "
          f"90% = {data['threshold']:.2f}")
    for p in data["points"]:
        print(f"  d={p['d']:<10} {data['metric']} {p['metric']:.2f}")
    interp = f" (interpolated ~{data['d90_interpolated']:.0f})" if data["d90_interpolated"] is not None else ""
    print(f"d90 = {data['d90'] if data['d90'] is not None else 'not reached in this sweep'}{interp}")
    _report(path)
    return 0
