"""`ponder export --format hf|onnx CHECKPOINT OUT`."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write a checkpoint as a Hugging Face directory or as ONNX graphs")
    e.add_argument("checkpoint", help="Ponder checkpoint directory")
    e.add_argument("out", help="output directory (created)")
    e.add_argument("--format", choices=("hf", "onnx"), required=True,
                   help="hf: AutoModelForCausalLM with trust_remote_code; onnx: component graphs for onnxruntime")
    e.add_argument("--exit-price", type=float, help="hf: the default exit price in config.json (default: full depth)")
    e.add_argument("--compute-budget", type=float, help="hf: the default compute budget, mapped by calibration.json")
    e.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> None:
    from runtime.checkpoint import load_checkpoint

    if args.format == "onnx" and (args.exit_price is not None or args.compute_budget is not None):
        raise ValueError("--exit-price and --compute-budget apply to --format hf; the onnx engine takes them per request")
    ckpt = load_checkpoint(args.checkpoint)
    if args.format == "hf":
        from exporters.hf import export_hf

        out = export_hf(ckpt, args.out, exit_price=args.exit_price, compute_budget=args.compute_budget)
        print(f"wrote {out}: load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    else:
        from exporters.onnx_export import export_onnx

        out = export_onnx(ckpt, args.out)
        print(f"wrote {out}: serve with LLM({args.checkpoint!r}, backend='onnx', onnx_dir={str(out)!r})")
