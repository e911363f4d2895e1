"""Service test helpers: the real server in a subprocess on a loopback ephemeral port, a real HTTP client.

Random-weight tiny Llama profiles (plumbing only): small and fast on a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SCHEMES = ["w2g64z", "w3g128z", "w4g128z", "w8"]
TINY = dict(model="random:llama-tiny", n_samples=2, seq_len=16, kl_samples=2, kl_stride=1)


class Server:
    """``bitalloc serve --port 0`` as a child process; ``url`` from its first stdout line."""

    def __init__(self, state: Path, *args: str, env: dict | None = None, timeout: float = 90.0):
        self.state = Path(state)
        self.args = ["--port", "0", "--state-dir", str(state), *args]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        self.err = open(self.state.parent / f"{self.state.name}-server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "bitalloc.allocator.cli", "serve", *self.args],
                                     stdout=subprocess.PIPE, stderr=self.err, env=self.env, text=True, cwd=self.state.parent)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"server did not start: {line!r} (log {self.err.name})")
        self.url = line.split("listening on ")[1].split()[0]
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.err.close()

    def kill9(self) -> None:
        self.http.close()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.err.close()


def start_server(state: Path, *args: str, **kw) -> Server:
    state.mkdir(parents=True, exist_ok=True)
    return Server(state, *args, **kw)
