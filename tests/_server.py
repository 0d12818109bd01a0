"""Shared helper of the server tests: ``vllm-blockattn serve`` on loopback, one per test module.

    @pytest.fixture(scope="module")
    def server(tiny_qwen3, tmp_path_factory):
        with serve(tiny_qwen3, tmp_path_factory.mktemp("server")) as srv:
            yield srv

The server runs the multi-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=1``) exactly as a user
starts it, with the tiny model under the name ``tiny``. ``srv.url`` is the base URL; ``srv.log_tail()``
is the end of its log, for failure messages.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

MODEL_NAME = "tiny"
MAX_MODEL_LEN = 2048
# The shared segmentation server's additional_config["blockattn"]["segment"] (conftest.segment_server):
# the default cuts prompts of 300 tokens or more.
SEGMENT_SERVER = {"default": "auto", "min_tokens": 300, "threshold": 0.3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        """The process runs and ``/health`` answers 200."""
        if self.proc.poll() is not None:
            return False
        try:
            return requests.get(self.url + "/health", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    def metrics(self) -> str:
        return requests.get(self.url + "/metrics", timeout=30).text


def serve_command(model: str, port: int, *extra: str) -> list[str]:
    cli = os.path.join(os.path.dirname(sys.executable), "vllm-blockattn")
    return [cli, "serve", model, "--attention-backend", "blockattn", "--dtype", "float32", "--enforce-eager",
            "--max-model-len", str(MAX_MODEL_LEN), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", MODEL_NAME, *extra]


@contextlib.contextmanager
def serve(model: str, log_dir: Path, *extra: str, env: dict | None = None, startup_timeout: float = 300):
    """Start the server, wait for ``/health``, yield a :class:`Server`, terminate it on exit."""
    port = free_port()
    log = Path(log_dir) / "server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_command(model, port, *extra), stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.time() + startup_timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                if requests.get(srv.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"server did not start in {startup_timeout:.0f} s:\n{srv.log_tail()}")
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def completion(url: str, prompt, max_tokens: int, timeout: float = 120, **kw) -> requests.Response:
    """Greedy ``/v1/completions`` of the tiny model, token ids returned."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **kw}
    return requests.post(url + "/v1/completions", json=body, timeout=timeout)


def labelled_value(text: str, name: str, **labels) -> float:
    """A Prometheus sample of ``name`` whose labels include ``labels``; 0 if absent."""
    total = 0.0
    for got, value in re.findall(rf"^{re.escape(name)}{{([^}}]*)}} ([0-9.e+-]+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', got))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def metric_value(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (over all label sets) in an exposition ``text``; 0 if absent."""
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in found)
