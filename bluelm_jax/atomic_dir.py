"""Output directories written atomically: into a temporary directory beside them, renamed at the end.

    with atomic_directory(out_dir, force, exists_error=ExportError) as tmp:
        ...  # write into tmp

On success tmp becomes out_dir (an existing out_dir, allowed by `force`, is replaced only
then); on any exception tmp is removed and out_dir is left as it was. tmp, hence out_dir,
gets the mode of any directory the user makes (0777 less the umask), not mkdtemp's 0700.

tmp is named `.<name of out_dir>.tmp-XXXX` and holds, while it is written, a file
`.writer-pid` with the id of the writing process. A process killed outright (SIGKILL, a
crash) cannot remove its tmp, so before writing, `atomic_directory` removes every such
sibling whose writer is no longer running (one line on stderr for each); the tmp of a
conversion still running is kept. The tmp directories of the blocks still open are listed
for `remove_unfinished`, which the signal watcher (interrupts.py) calls before it ends the
process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional

WRITER_FILE = ".writer-pid"  # inside a tmp directory: the id of the process writing it
OWNERLESS_AGE_S = 60.0  # a tmp without WRITER_FILE (killed before writing it) is stale after this

_unfinished: set[str] = set()  # tmp directories of the atomic_directory blocks now open


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
    remove_stale_temporaries(out_dir)
    refuse_existing(out_dir, force, exists_error)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = make_unique_dir(parent, _tmp_prefix(out_dir))
    _unfinished.add(tmp)
    try:
        with open(os.path.join(tmp, WRITER_FILE), "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        yield tmp
        os.remove(os.path.join(tmp, WRITER_FILE))
        _replace(tmp, out_dir)
    except BaseException:
        remove_tree(tmp)
        raise
    finally:
        _unfinished.discard(tmp)


def _tmp_prefix(out_dir: str) -> str:
    return f".{os.path.basename(out_dir)}.tmp-"


def remove_unfinished() -> None:
    """Removes the tmp directories of the atomic_directory blocks still open (the process is ending)."""
    for tmp in list(_unfinished):
        remove_tree(tmp)


def writer_pid(tmp: str) -> Optional[int]:
    """The process id recorded in a tmp directory, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(tmp, WRITER_FILE), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def is_running(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_stale(tmp: str) -> bool:
    pid = writer_pid(tmp)
    if pid is None:
        try:
            return time.time() - os.path.getmtime(tmp) > OWNERLESS_AGE_S
        except OSError:
            return False
    return pid != os.getpid() and not is_running(pid)


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Removes the tmp siblings of out_dir left by writers no longer running; returns their paths.

    Each removal is reported on stderr in one line."""
    parent, prefix = os.path.dirname(out_dir), _tmp_prefix(out_dir)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        tmp = os.path.join(parent, name)
        if not name.startswith(prefix) or os.path.islink(tmp) or not os.path.isdir(tmp) or not _is_stale(tmp):
            continue
        pid = writer_pid(tmp)
        remove_tree(tmp)
        if not os.path.lexists(tmp):
            removed.append(tmp)
            who = f"process {pid}, no longer running" if pid is not None else "a process that ended early"
            print(f"removed the unfinished temporary directory {tmp} (left by {who})", file=sys.stderr)
    return removed


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
