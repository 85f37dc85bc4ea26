"""Output directories written atomically: into a temporary directory beside them, renamed at the end.

    with atomic_directory(out_dir, force, exists_error=ExportError) as tmp:
        ...  # write into tmp

On success tmp becomes out_dir (an existing out_dir, allowed by `force`, is replaced only
then); on any exception tmp is removed and out_dir is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Callable, Iterator


def refuse_existing(out_dir: str, force: bool, exists_error: Callable[[str], Exception] = FileExistsError) -> None:
    """Raises exists_error when out_dir exists and `force` is not given."""
    if os.path.lexists(out_dir) and not force:
        raise exists_error(f"{out_dir}: already exists (use --force to replace it)")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, force: bool = False,
                     exists_error: Callable[[str], Exception] = FileExistsError) -> Iterator[str]:
    """Yields a new temporary directory beside out_dir that replaces out_dir when the block succeeds."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    refuse_existing(out_dir, force, exists_error)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        _replace(tmp, out_dir)
    except BaseException:
        remove_tree(tmp)
        raise


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
