"""Reading a JSON file, bad input reported as one line in the caller's error type."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional


def read_json(path: str | os.PathLike, error: Callable[[str], Exception], missing: Optional[str] = None) -> Any:
    """The parsed contents of `path`. A missing file raises error(missing), by default
    "<path>: no such file"; a file that is not UTF-8 JSON raises error("<path>: not valid JSON (...)")."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(missing or f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
