"""Output directories written atomically: into a temporary directory beside them, renamed at the end.

    with atomic_directory(out_dir, force, exists_error=ExportError) as tmp:
        ...  # write into tmp

On success tmp becomes out_dir (an existing out_dir, allowed by `force`, is replaced only
then); on any exception tmp is removed and out_dir is left as it was. tmp, hence out_dir,
gets the mode of any directory the user makes (0777 less the umask), not mkdtemp's 0700.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from typing import Callable, Iterator


def refuse_existing(out_dir: str, force: bool, exists_error: Callable[[str], Exception] = FileExistsError) -> None:
    """Raises exists_error when out_dir exists and `force` is not given."""
    if os.path.lexists(out_dir) and not force:
        raise exists_error(f"{out_dir}: already exists (use --force to replace it)")


def refuse_overlap(out_dir: str, source: str, what: str, error: Callable[[str], Exception]) -> None:
    """Raises `error` when out_dir is `source` (`what` names it), contains it or lies inside it.

    Real paths are compared (symlinks resolved), whole components only: /x/model-orbax is
    neither inside nor above /x/model. Replacing such an out_dir would delete the input.
    """
    out, src = os.path.realpath(out_dir), os.path.realpath(source)
    if out == src:
        raise error(f"{out_dir}: the output must not be the {what}")
    common = os.path.commonpath([out, src])
    if common == out:
        raise error(f"{out_dir}: the output must not contain the {what} {source}")
    if common == src:
        raise error(f"{out_dir}: the output must not be inside the {what} {source}")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, force: bool = False,
                     exists_error: Callable[[str], Exception] = FileExistsError) -> Iterator[str]:
    """Yields a new temporary directory beside out_dir that replaces out_dir when the block succeeds."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    refuse_existing(out_dir, force, exists_error)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = make_unique_dir(parent, f".{os.path.basename(out_dir)}.tmp-")
    try:
        yield tmp
        _replace(tmp, out_dir)
    except BaseException:
        remove_tree(tmp)
        raise


def make_unique_dir(parent: str, prefix: str, attempts: int = 100) -> str:
    """Creates and returns a new directory parent/<prefix><random hex>, with the umask's mode."""
    for _ in range(attempts):
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)  # mode 0o777 & ~umask (tempfile.mkdtemp would force 0o700)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no unused temporary name {prefix}* after {attempts} attempts")


def remove_tree(path: str, attempts: int = 5) -> None:
    """Removes a directory, retrying in case a writer thread (Orbax) was still finishing a file in it."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.2)


def _replace(tmp: str, out_dir: str) -> None:
    """Renames tmp to out_dir; an existing out_dir is first renamed aside, then removed."""
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)
