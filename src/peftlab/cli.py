"""Command line: thin wrappers that parse, build a config and call one function.

    peftlab train [CONFIG.yaml] [key=value ...]     train a method, evaluate it, save adapter + result.json
    peftlab eval  [CONFIG.yaml] [key=value ...]     evaluate the base model (zero-shot) or adapter=DIR
    peftlab methods                                 list methods with their options, defaults and help
    peftlab methods --budget 0.1% [model=...]       size every method to a trainable-parameter budget
    peftlab compare GRID.yaml [key=value ...]       run a grid (methods x variants x N x seeds) with baselines
    peftlab export --adapter DIR --to peft OUT      write an adapter in Hugging Face PEFT's format
    peftlab import PEFT_DIR OUT                     convert a PEFT adapter (LoRA, IA3, prompt/prefix tuning)
    peftlab merge --adapter DIR OUT                 a plain HF model folder with LoRA / IA3 folded in
    peftlab report RESULTS_DIR                      report.md + self-contained report.html with plots
    peftlab analyze {subspace,amplification,prompt-tokens,intrinsic-dim} ...   LoRA/prompt analyses, d90 sweep
    peftlab demo  [key=value ...]                   the built-in comparison on generated data: compare + report
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

from peftlab.config import ConfigError, RunConfig, describe_fields, load_config, split_args

OVERRIDE_HELP = """overrides are dotted keys, e.g.:
  task=summarization data=../shared/data/cnn_dailymail method=lora method.r=16 train.max_steps=200 out=runs/x
sections: model.*, task.*, data.*, method.*, train.*, eval.*; top level: out, resume, adapter.
`peftlab train --help-config` lists every key with its default and help."""



def config_help() -> str:
    """Every config key with its default and help text."""
    lines = []
    for section in ("model", "task", "data", "train", "eval"):
        cls = type(getattr(RunConfig(), section))
        for name, _type, default, text in describe_fields(cls):
            lines.append(f"  {section}.{name:<22} {default!r:<16} {text}")
    lines.append("  method.<option>           (per method)     see `peftlab methods`")
    for name, _type, default, text in describe_fields(RunConfig):
        if name in ("out", "resume", "adapter"):
            lines.append(f"  {name:<30} {default!r:<16} {text}")
    return "\n".join(lines)


def _checked_config(args: Sequence[str]) -> RunConfig:
    """The run's config, with ``data.path`` resolved too: a typo there is reported before the model loads. (Not in
    ``RunConfig.validate``: whether a folder exists is this machine's state, not the config's.)"""
    from peftlab.data.readers import check_data_path

    cfg = load_config(*split_args(args))
    check_data_path(cfg.data.path)
    return cfg


def _cmd_train(ns: argparse.Namespace) -> int:
    from peftlab.lab.experiment import train_run
    from peftlab.lab.table import format_table

    cfg = _checked_config(ns.args)
    result = train_run(cfg, command=_command_line())
    if result is None:  # a helper rank of a multi-process launch: rank 0 reports
        return 0
    print(format_table([result]))
    print(f"\nresult: {cfg.out}/result.json   adapter: {cfg.out}/adapter")
    return 0


def _cmd_eval(ns: argparse.Namespace) -> int:
    from peftlab.lab.experiment import eval_run
    from peftlab.lab.table import format_table

    cfg = _checked_config(ns.args)
    result = eval_run(cfg, command=_command_line())
    if result is None:
        return 0
    print(format_table([result]))
    print(f"\nresult: {cfg.out}/result.json")
    return 0


def _cmd_methods(ns: argparse.Namespace) -> int:
    if ns.budget is not None or ns.overrides:
        from peftlab.methods.budget import print_budget

        return print_budget(ns)
    from peftlab.methods import all_methods

    for spec in all_methods():
        print(f"{spec.name}: {spec.summary}")
        if spec.paper:
            print(f"  paper: {spec.paper}")
        print(f"  default lr: {spec.default_lr:g}")
        for name, _type, default, text in describe_fields(spec.config_cls):
            print(f"  method.{name:<18} {default!r:<14} {text}")
        print()
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from peftlab.lab.demo import run_demo

    _, overrides = split_args(ns.args)
    run_demo(overrides)
    return 0


def _command_line() -> str:
    return "peftlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class OneLineParser(argparse.ArgumentParser):
    """argparse with each usage error as one line naming the argument; the usage is one ``--help`` away.
    Subcommand parsers inherit the class (``add_subparsers`` uses the parent's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="peftlab", description="Parameter-efficient fine-tuning lab.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("train", _cmd_train, "train a method on a task, evaluate it, save the adapter and result.json"),
        ("eval", _cmd_eval, "evaluate the base model zero-shot, or a saved adapter (adapter=DIR)"),
        ("demo", _cmd_demo, "run the built-in comparison grid (generated data, SmolLM2-135M) and write its report"),
    ):
        p = sub.add_parser(name, help=text, description=text, epilog=OVERRIDE_HELP + "\n\nkeys:\n" + config_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value", help="config file and overrides")
        p.set_defaults(func=func)
    from peftlab.lab.compare import add_parser as add_compare_parser

    add_compare_parser(sub)
    from peftlab.interop.commands import add_parsers as add_interop_parsers

    add_interop_parsers(sub)
    from peftlab.analysis.commands import add_parser as add_analyze_parser

    add_analyze_parser(sub)
    from peftlab.lab.report import add_parser as add_report_parser

    add_report_parser(sub)
    p = sub.add_parser("methods", help="list methods with options, defaults and help; --budget sizes them",
                       description="List every registered method with its options, defaults and help.")
    from peftlab.methods.budget import add_budget_argument

    add_budget_argument(p)
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except ConfigError as exc:
        print(f"peftlab: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        # User errors: bad values, files or paths; the message names the key or file and what is expected.
        print(f"peftlab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
