"""A `python -m bluelm_jax serve` subprocess for the tests that talk to the server over HTTP
(tests/test_server.py, tests/test_lm_eval.py): a free localhost port, a wait for /health, a log file."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `serve` subprocess on a free localhost port; its stderr goes to a file."""

    def __init__(self, args, log_path, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = dict(os.environ, **(env or {}))
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "bluelm_jax", "serve", "--port", str(self.port), *args],
                                     cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if http("GET", self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not start within {START_TIMEOUT_S} s:\n{self.log()}")

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def metrics(self) -> dict:
        """{'name{labels}': value} of /metrics."""
        status, text = http("GET", self.url + "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def http(method, url, body=None, headers=None):
    """(status, text) of a plain HTTP request; body: bytes or a JSON-able object."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


DEFAULT_SERVER_ARGS = ["--max-batch", "4", "--max-len", "512", "--no-compile-cache"]


def default_server(log_path) -> ServerProcess:
    """The server on the bundled default model (no API key), with its log at log_path."""
    return ServerProcess(DEFAULT_SERVER_ARGS, log_path)
