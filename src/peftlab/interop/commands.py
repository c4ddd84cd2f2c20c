"""Command-line entry points: ``peftlab export``, ``peftlab import`` and ``peftlab merge``.

    peftlab export --adapter DIR [--to peft] OUT [--model NAME]    peftlab adapter -> Hugging Face PEFT folder
    peftlab import PEFT_DIR OUT [--model NAME]                      Hugging Face PEFT folder -> peftlab adapter
    peftlab merge --adapter DIR OUT [--model NAME] [--dtype D]      base + adapter -> plain Hugging Face model folder

``cli.build_parser`` calls :func:`add_parsers` with its sub-parsers; each command sets ``func`` (returns the exit
code). Errors are ``ValueError``/``FileNotFoundError`` subclasses with a message, which ``cli.main`` prints.
"""

from __future__ import annotations

import argparse

MODEL_HELP = ("base model (a hub id, a local Hugging Face folder, a .gguf file or smollm2-135m); default: the one "
              "the adapter records")


def _cmd_export(ns: argparse.Namespace) -> int:
    from peftlab.interop.export_peft import export_adapter

    out = export_adapter(ns.adapter, ns.out, model_name=ns.model)
    print(f"PEFT adapter written to {out} (load it with peft.PeftModel.from_pretrained(base_model, {str(out)!r}))")
    return 0


def _cmd_import(ns: argparse.Namespace) -> int:
    from peftlab.interop.import_peft import import_adapter

    out = import_adapter(ns.peft_dir, ns.out, model_name=ns.model)
    print(f"peftlab adapter written to {out} (evaluate it with: peftlab eval adapter={out})")
    return 0


def _cmd_merge(ns: argparse.Namespace) -> int:
    from peftlab.interop.merge import merge_adapter

    out = merge_adapter(ns.adapter, ns.out, model_name=ns.model, dtype=ns.dtype)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export``, ``import`` and ``merge`` sub-commands to ``peftlab``'s sub-parsers."""
    text = "write a peftlab adapter as a Hugging Face PEFT adapter folder (LoRA, IA3, prompt/prefix tuning)"
    p = subparsers.add_parser("export", help=text, description=text)
    p.add_argument("--adapter", required=True, metavar="DIR", help="peftlab adapter folder (<run>/adapter)")
    p.add_argument("--to", choices=["peft"], default="peft", help="target format (default: peft)")
    p.add_argument("out", metavar="OUT", help="folder to create (must not exist or be empty)")
    p.add_argument("--model", default=None, metavar="NAME", help=MODEL_HELP)
    p.set_defaults(func=_cmd_export)

    text = "convert a Hugging Face PEFT adapter folder (LoRA, IA3, prompt/prefix tuning) into a peftlab adapter"
    p = subparsers.add_parser("import", help=text, description=text + "; `peftlab eval adapter=PEFT_DIR` also reads "
                              "a PEFT folder directly")
    p.add_argument("peft_dir", metavar="PEFT_DIR", help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("out", metavar="OUT", help="folder to create (must not exist or be empty)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="base model; default: the PEFT config's base_model_name_or_path")
    p.set_defaults(func=_cmd_import)

    text = "merge a LoRA/IA3 adapter into its base model and save a plain Hugging Face model folder + tokenizer"
    p = subparsers.add_parser("merge", help=text, description=text)
    p.add_argument("--adapter", required=True, metavar="DIR", help="peftlab or PEFT adapter folder")
    p.add_argument("out", metavar="OUT", help="folder to create (must not exist or be empty)")
    p.add_argument("--model", default=None, metavar="NAME", help=MODEL_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights (default: float32)")
    p.set_defaults(func=_cmd_merge)
