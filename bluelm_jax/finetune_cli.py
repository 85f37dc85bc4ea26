"""`python -m bluelm_jax finetune`: fine-tune a BlueLM (full or LoRA) on a JSON / JSON-lines file.

Every option maps onto one field of train.TrainConfig. Bad input (a missing file, bad data,
bad settings) exits 1 with one line on stderr and leaves no output directory behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional

from bluelm_jax import interrupts
from bluelm_jax.command_line import run_reporting_errors


def build_parser(prog: str = "python -m bluelm_jax finetune") -> argparse.ArgumentParser:
    from bluelm_jax.train import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a BlueLM model (full or LoRA) with optax on prompt/response or chat-message data "
                    "(JSON lines or a JSON array); writes checkpoints, a log and the result to --out.")
    p.add_argument("--model", default=None, help="converted bluelm-jax dir, Hugging Face dir or Hub repo id "
                                                 "(default: the bundled default model)")
    p.add_argument("--train-file", required=True, help="training data (.jsonl or .json)")
    p.add_argument("--eval-file", default=None, help="held-out data: its loss is reported")
    p.add_argument("--out", default="finetune-out", help="output directory (default finetune-out)")
    g = p.add_argument_group("data")
    g.add_argument("--prompt-field", default="prompt")
    g.add_argument("--response-field", default="response")
    g.add_argument("--messages-field", default="messages")
    g.add_argument("--prompt-template", default="{prompt}",
                   help="how a prompt is written, e.g. '[|Human|]:{prompt}[|AI|]:' (default: as it is)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help=f"longest sample in tokens (default {d.seq_len})")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad records instead of stopping")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch, all devices")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.learning_rate, help=f"peak learning rate (default {d.learning_rate})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0: no clipping")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--remat", action="store_true", help="recompute activations in the backward pass")
    g.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the matrix products (default float32 on CPU, bfloat16 on GPU/TPU)")
    g.add_argument("--mesh", default=d.mesh, metavar="SPEC",
                   help="device mesh, e.g. data=8, data=2,fsdp=4 or fsdp=2,tensor=4 (one size may be -1: the "
                        "rest): batch rows split over data and fsdp, weights and optimizer state sharded "
                        "(hidden dim on fsdp, heads/features/vocabulary on tensor); default: data over as "
                        "many devices as divide --batch-size")
    g.add_argument("--data-parallel", type=int, default=None, metavar="N", help="shorthand for --mesh data=N")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps (0: none)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--eval-steps", type=int, default=d.eval_steps, help="evaluate every N steps (0: at the end)")
    g.add_argument("--log-steps", type=int, default=d.log_steps)
    g.add_argument("--no-resume", action="store_true",
                   help="start over: delete the checkpoints in --out (default: resume from the latest)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("LoRA (without --lora-rank: full fine-tuning)")
    g.add_argument("--lora-rank", type=int, default=None)
    g.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="q,k,v,o", help="of q,k,v,o,gate,up,down or all (default q,k,v,o)")
    g.add_argument("--merge", action="store_true", help="also write <out>/model with the adapters merged")
    return p


def config_from_args(args):
    from bluelm_jax.data import DataFormat
    from bluelm_jax.lora import LoraConfig
    from bluelm_jax.train import TrainConfig

    lora = None
    if args.lora_rank is not None:
        alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
        lora = LoraConfig(args.lora_rank, alpha, args.lora_dropout, args.lora_targets)
    elif args.lora_alpha is not None or args.merge:
        raise ValueError("--lora-alpha and --merge need --lora-rank")
    mesh = args.mesh
    if args.data_parallel is not None:
        if mesh is not None:
            raise ValueError("give --mesh or --data-parallel, not both")
        mesh = f"data={args.data_parallel}" if args.data_parallel else None  # 0: the default
    if "{prompt}" not in args.prompt_template:
        raise ValueError("--prompt-template must contain {prompt}")
    fmt = DataFormat(args.prompt_field, args.response_field, args.messages_field, args.prompt_template)
    return TrainConfig(
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        max_steps=args.max_steps, save_steps=args.save_steps, keep_checkpoints=args.keep_checkpoints,
        eval_steps=args.eval_steps, log_steps=args.log_steps, seed=args.seed, remat=args.remat,
        compute_dtype=args.compute_dtype, lora=lora, merge_lora=args.merge, data=fmt,
        skip_bad_lines=args.skip_bad_lines, mesh=mesh)


def latest_checkpoint_step(out: str) -> Optional[int]:
    """The step of the newest finished checkpoint under <out>/checkpoints, or None."""
    try:
        names = os.listdir(os.path.join(out, "checkpoints"))
    except OSError:
        return None
    steps = [int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(out, "checkpoints", n))]
    return max(steps, default=None)


def resume_hint(out: str, resume: bool) -> str:
    """Where an interrupted run of this command continues: the latest checkpoint's step, or step 0."""
    step = latest_checkpoint_step(out)
    if step is None:
        return "no checkpoint was saved yet: the same command starts again from step 0"
    if not resume:
        return f"run it without --no-resume to resume from step {step} ({os.path.join(out, 'checkpoints', str(step))})"
    return f"run the same command again to resume from step {step} ({os.path.join(out, 'checkpoints', str(step))})"


def main(argv: Optional[list[str]] = None, prog: str = "python -m bluelm_jax finetune") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    existed = os.path.exists(out)
    interrupts.set_prefix(parser.prog)
    interrupts.set_hint(lambda: resume_hint(out, not args.no_resume))

    def discard_new_output() -> None:
        if not existed and os.path.isdir(out) and not os.path.isdir(os.path.join(out, "checkpoints")):
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping

    return run_reporting_errors(lambda: _run(args, out), (ValueError, OSError), on_error=discard_new_output)


def _run(args, out: str) -> str:
    from bluelm_jax.data import check_data_file

    tc = config_from_args(args)
    for f in (args.train_file, args.eval_file):
        if f is not None:
            check_data_file(f)  # before the model loads: missing, a directory, a device, empty
    import jax

    import bluelm_jax
    from bluelm_jax import train as T

    if args.model is None:
        from bluelm_jax import default_model

        args.model = default_model.path()
    from bluelm_jax import hub

    args.model = hub.resolve(args.model)  # a Hub repo id -> its cached snapshot
    if not os.path.isdir(args.model):
        raise ValueError(f"{args.model}: no such model directory")
    model = bluelm_jax.load(args.model, layout="kernel")  # training's layout, also for bfloat16 on CPU
    log = print
    log(f"fine-tuning {model!r} on {jax.device_count()} {jax.default_backend()} device(s), "
        f"{'LoRA rank ' + str(tc.lora.rank) if tc.lora else 'all parameters'}")
    result = T.train(model, args.train_file, tc, out_dir=out, eval_file=args.eval_file,
                     progress=not args.no_progress, resume=not args.no_resume, log=log)
    outputs = "".join(f"; {name}: {d}" for name, d in (("adapter", result.adapter_dir), ("model", result.model_dir))
                      if d)
    if not result.history:  # resumed at or past --max-steps: nothing left to train
        return (f"already complete at step {result.resumed_from} (--max-steps {tc.max_steps}), nothing trained; "
                f"to start over use --no-resume or another --out{outputs}")
    last = result.history[-1]
    summary = f"done: {len(result.history)} steps, loss {last['loss']:.4f}"
    if result.eval_loss is not None:
        summary += f", eval loss {result.eval_loss:.4f}"
    if result.skipped:
        summary += f", {len(result.skipped)} bad record(s) skipped"
    return summary + outputs


if __name__ == "__main__":
    interrupts.install()  # before jax is imported: see interrupts.py
    sys.exit(main())
