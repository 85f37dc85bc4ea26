"""The `serve` command: load a model, start the engine, answer HTTP with uvicorn.

`add_arguments` imports nothing heavy, so bad flags are reported before jax loads. `run`
turns the JAX persistent compilation cache on (in the user's cache directory unless
--no-compile-cache), binds the socket itself (a port in use is one error line), loads the
model, starts the engine and serves until interrupted, then closes the engine.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
SERVE_PACKAGES = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")


class ServeSetupError(ValueError):
    """The server cannot start (a missing package, a bad flag value)."""


def add_arguments(p: argparse.ArgumentParser, positive_int) -> None:
    """The serve flags (the model flags are cli.py's)."""
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this host only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                   help="decode slots: requests generated at once (default 8)")
    p.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                   help="requests that may wait for a slot; more get HTTP 429 (default 64)")
    p.add_argument("--max-len", type=positive_int, default=None, metavar="N",
                   help="KV cache positions per slot, i.e. the most prompt + max_tokens of a request "
                        "(default: the model's context; less saves memory: the cache holds max-batch x N)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on the /v1 routes (default: no key)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (default: the model directory's name)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the JAX persistent compilation cache (default: on, in "
                        "$XDG_CACHE_HOME/bluelm-jax/jax-compile or ~/.cache/bluelm-jax/jax-compile)")


def compile_cache_dir() -> str:
    """Where compiled programs are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bluelm-jax", "jax-compile")


def enable_compile_cache(directory: str) -> None:
    """Turns the JAX persistent compilation cache on in `directory` (every compiled program is kept)."""
    import jax

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def served_name(args) -> str:
    """--served-model-name, else the last part of --model, else "bluelm-default"."""
    if args.served_model_name:
        return args.served_model_name
    if args.model:
        return os.path.basename(os.path.normpath(args.model)) or args.model
    return "bluelm-default"


def check_packages() -> None:
    """ServeSetupError naming the `serve` extra when one of its packages is missing."""
    import importlib.util

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ServeSetupError(f"serve needs {', '.join(missing)}: pip install 'bluelm-jax[serve]'")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (OSError, e.g. the port is in use, is one error line)."""
    if not 0 <= port < 65536:
        raise ServeSetupError(f"--port must be in [0, 65535], got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def run(args, load) -> None:
    """Serves until interrupted. load(args) -> (model, mesh) is cli.py's loader."""
    check_packages()
    name = served_name(args)
    if not args.no_compile_cache:
        enable_compile_cache(compile_cache_dir())
    sock = bind(args.host, args.port)
    try:
        _serve(args, load, name, sock)
    finally:
        sock.close()


def _serve(args, load, name: str, sock: socket.socket) -> None:
    import uvicorn

    from bluelm_jax import sharding
    from bluelm_jax.engine import Engine
    from bluelm_jax.server.app import create_app

    model, mesh = load(args)
    with sharding.use(mesh), Engine(model, max_batch=args.max_batch, max_queue=args.max_queue,
                                    max_len=args.max_len, kv_cache_dtype=args.kv_cache_dtype) as engine:
        started = time.perf_counter()
        engine.warm_up()  # the first requests do not wait for the decode blocks to compile
        print(f"compiled the engine in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        app = create_app(engine, model, name, args.api_key)
        host, port = sock.getsockname()[:2]
        print(f"serving {name!r} on http://{host}:{port}/v1 (max batch {args.max_batch}, "
              f"queue {args.max_queue}{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])
