"""A real `chargpt serve` in a subprocess on a free loopback port, for the serve and playground tests."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 180  # a safety net against a hung child on a loaded machine, not a timing assertion


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    banner: str

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, str, float]:
        """Send `sig`; return (exit code, stderr, seconds until the process had exited)."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def start_server(model_dir: Path, *flags: str) -> ServerProcess:
    """Start `chargpt serve --port 0` (any free port) and wait for its one ready line, which names the URL."""
    cmd = [sys.executable, "-m", "chargpt", "serve", "--model", str(model_dir), "--port", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*cmd, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        banner = lines.get(timeout=STARTUP_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"the server did not start: {proc.communicate()}") from None
    match = re.search(r"http://127\.0\.0\.1:\d+", banner)
    if not match:
        proc.kill()
        raise AssertionError(f"no URL in the ready line {banner!r}: {proc.communicate()}")
    return ServerProcess(proc, match.group(0), banner)
