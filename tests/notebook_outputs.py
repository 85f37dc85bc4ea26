"""Executes the notebooks in notebooks/ and compares or rewrites their committed outputs.

The notebooks are committed with their outputs, so that a reader on GitHub or Colab sees what each
cell prints before running it. After a change to what a notebook prints, refresh them all from the
repository root with one command:

    python -m tests.notebook_outputs --write

(`--write quickstart` refreshes one; without `--write` the command only lists the stale cells and
exits 1 if there are any). tests/test_notebooks.py runs the same `execute` and `stale_cells`.

Every run is made the same way, whoever starts it: a fresh IPython kernel with this checkout first
on PYTHONPATH (so it imports this tree's `bluelm_jax`, not another installed copy),
JAX on CPU, no inherited XLA_FLAGS or BLUELM_MODEL_DIR, and TMPDIR set to a directory of the
caller's, which the notebooks must leave empty (`--write` refuses to save a notebook that does not).

What is compared, cell by cell: the standard output and the text/plain form of results and displays,
after `normalise` has replaced what differs between two correct runs (timings, rates, memory
addresses, the directories of absolute paths). Standard error (warnings about the packages of the
machine that ran them) is neither compared nor written. Rewriting keeps the committed outputs of the
cells whose compared text did not change, so the files change only where a notebook prints something
new.
"""

import argparse
import copy
import os
import re
import sys
import tempfile

import nbformat
from nbclient import NotebookClient

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOKS = ("quickstart", "finetune_lora", "sharded_generation")
CELL_TIMEOUT_S = 300

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_RATE = re.compile(r"\d+(?:\.\d+)?\s?(?:it|items|tok|tokens|steps?|samples)/s\b")
_DURATION = re.compile(r"\d+(?:\.\d+)?\s?(?:ns|us|µs|ms|s|sec|min)\b")
# The directory part of an absolute path: "/tmp/tmpab12/bluelm-orbax" -> "…/bluelm-orbax".
_PATH_DIRS = re.compile(r"(?<![\w.~/])/(?:[^\s'\"/:,()\[\]{}]+/)+")


def notebook_path(name: str) -> str:
    """notebooks/<name>.ipynb."""
    return os.path.join(NOTEBOOKS_DIR, name + ".ipynb")


def kernel_env(tmpdir: str) -> dict:
    """The kernel's environment: this checkout first on the path, CPU JAX, TMPDIR=`tmpdir`."""
    env = dict(os.environ)
    for name in ("XLA_FLAGS", "BLUELM_MODEL_DIR"):  # each notebook decides its devices and model
        env.pop(name, None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env["TMPDIR"] = tmpdir
    return env


def without_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of `nb` with every code cell's outputs and execution count cleared."""
    clean = copy.deepcopy(nb)
    for cell in clean.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return clean


def execute_notebook(nb: nbformat.NotebookNode, tmpdir: str) -> nbformat.NotebookNode:
    """Runs `nb` in place in a fresh kernel (cwd notebooks/, `kernel_env(tmpdir)`) and returns it.

    Raises nbclient's CellExecutionError when a cell fails.
    """
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                            coalesce_streams=True, resources={"metadata": {"path": NOTEBOOKS_DIR}})
    client.execute(env=kernel_env(tmpdir))
    return nb


def execute(name: str, tmpdir: str) -> nbformat.NotebookNode:
    """notebooks/<name>.ipynb run from scratch, with fresh outputs (the file is not changed)."""
    return execute_notebook(without_outputs(nbformat.read(notebook_path(name), as_version=4)), tmpdir)


def normalise(text: str) -> str:
    """`text` without what legitimately differs between runs: addresses, timings, rates, directories."""
    text = _ADDRESS.sub("0x…", text)
    text = _RATE.sub("<rate>", text)
    text = _DURATION.sub("<time>", text)
    return _PATH_DIRS.sub("…/", text)


def compared_text(cell: nbformat.NotebookNode) -> str:
    """The normalised standard output and text/plain results/displays of a code cell, in order."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data") and "text/plain" in output.data:
            parts.append(output.data["text/plain"] + "\n")
    return normalise("".join(parts))


def stale_cells(committed: nbformat.NotebookNode, executed: nbformat.NotebookNode) -> list[str]:
    """One line per code cell whose committed outputs are missing or differ from a fresh run's."""
    committed_code = [c for c in committed.cells if c.cell_type == "code"]
    executed_code = [c for c in executed.cells if c.cell_type == "code"]
    if [c.source for c in committed_code] != [c.source for c in executed_code]:
        return ["the code cells differ from the executed notebook's"]
    problems = []
    for number, (old, new) in enumerate(zip(committed_code, executed_code), start=1):
        first_line = (old.source.splitlines() or ["(empty)"])[0]
        where = f"code cell {number} ({first_line[:50]})"
        if old.execution_count is None:
            problems.append(f"{where}: not executed in the committed notebook")
        elif compared_text(old) != compared_text(new):
            problems.append(f"{where}: committed output {compared_text(old)!r} != fresh {compared_text(new)!r}")
    return problems


def drop_stderr(nb: nbformat.NotebookNode) -> None:
    """Removes the standard error streams (warnings about this machine's packages, with its paths)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]


def keep_unchanged_outputs(committed: nbformat.NotebookNode, executed: nbformat.NotebookNode) -> None:
    """Puts the committed outputs back into `executed` for every code cell whose compared text is the
    same, so that rewriting a notebook changes only the cells that print something new (not timings
    or temporary paths)."""
    committed_code = [c for c in committed.cells if c.cell_type == "code"]
    executed_code = [c for c in executed.cells if c.cell_type == "code"]
    for old, new in zip(committed_code, executed_code):
        if (old.source == new.source and old.execution_count == new.execution_count
                and compared_text(old) == compared_text(new)):
            new.outputs = old.outputs


def write(name: str) -> None:
    """Re-executes notebooks/<name>.ipynb and saves it in place with its outputs."""
    committed = nbformat.read(notebook_path(name), as_version=4)
    with tempfile.TemporaryDirectory(prefix="bluelm-notebook-") as tmpdir:
        nb = execute(name, tmpdir)
        left = os.listdir(tmpdir)
    if left:
        raise RuntimeError(f"{name}: the notebook left {sorted(left)} in its TMPDIR")
    drop_stderr(nb)
    keep_unchanged_outputs(committed, nb)
    nbformat.write(nb, notebook_path(name))


def check(name: str) -> list[str]:
    """The stale cells of notebooks/<name>.ipynb, from one fresh run."""
    with tempfile.TemporaryDirectory(prefix="bluelm-notebook-") as tmpdir:
        return stale_cells(nbformat.read(notebook_path(name), as_version=4), execute(name, tmpdir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.notebook_outputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="re-execute and save the notebooks with their outputs")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"notebooks to process (default: all of {', '.join(NOTEBOOKS)})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NOTEBOOKS))
    if unknown:
        parser.error(f"no notebook named {', '.join(unknown)} (choose from {', '.join(NOTEBOOKS)})")
    stale = 0
    for name in args.names or NOTEBOOKS:
        if args.write:
            write(name)
            print(f"wrote {os.path.relpath(notebook_path(name), REPO_ROOT)}")
            continue
        for line in check(name):
            print(f"{name}: {line}", file=sys.stderr)
            stale += 1
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
