"""`python -m bluelm_jax eval`: run lm-evaluation-harness tasks on a model and print the harness's table.

The model is lm_eval_model.BlueLMJax; tasks are the harness's names (or, with --include-path,
YAML task files in a directory). The model options are the other commands' (cli._add_model_args);
--kv-cache-dtype is the KV cache of generate_until tasks. Bad input (an unknown task, a bad model
path, a bad mesh)
exits non-zero with one line on stderr. --output-path writes the results as JSON, complete or
not at all. Needs the `eval` extra (lm_eval).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Optional

from bluelm_jax.command_line import run_reporting_errors


def build_parser(prog: str = "python -m bluelm_jax eval") -> argparse.ArgumentParser:
    from bluelm_jax.cli import _add_model_args, _non_negative_int, _Parser, _positive_int

    p = _Parser(prog=prog, description="Evaluate a model with lm-evaluation-harness tasks and print its table.")
    _add_model_args(p)  # --model --dtype --mesh --quantize --kv-cache-dtype, as the other commands take them
    p.add_argument("--tasks", required=True, metavar="A,B", help="comma-separated task (or group) names")
    p.add_argument("--num-fewshot", type=_non_negative_int, default=None, metavar="N",
                   help="examples in each prompt (default: the task's own)")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="at most N documents per task")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="rows per batch (default 8)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a directory of extra YAML task files")
    p.add_argument("--output-path", default=None, metavar="FILE", help="write the results as JSON to FILE")
    return p


def main(argv: Optional[list[str]] = None, prog: str = "python -m bluelm_jax eval") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_reporting_errors(lambda: _run(args), (ValueError, OSError), prog=prog)


def _task_names(text: str, task_manager) -> list[str]:
    """The comma-separated names, each one the harness knows (else ValueError)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--tasks names no task")
    unknown = [name for name in names if name not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(unknown)} (see `lm_eval ls tasks`, or give --include-path)")
    return names


def _run(args) -> str:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from bluelm_jax.lm_eval_model import BlueLMJax

    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise ValueError(f"--include-path {args.include_path}: not a directory")
    task_manager = TaskManager(include_path=args.include_path)
    tasks = _task_names(args.tasks, task_manager)
    lm = BlueLMJax(pretrained=args.model, batch_size=args.batch_size, mesh=args.mesh, quantize=args.quantize,
                   dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=task_manager, log_samples=False)
    if args.output_path is not None:
        _write_atomically(args.output_path, json.dumps(results, indent=2, default=handle_non_serializable))
    table = make_table(results)
    if "groups" in results:
        table += "\n" + make_table(results, "groups")
    return table


def _write_atomically(path: str, text: str) -> None:
    """text in path, through a temporary file renamed over it (no half-written file)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".eval-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
