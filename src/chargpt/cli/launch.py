"""`chargpt train --nproc N`: torchrun started and supervised (signals forwarded, one last line for all ranks),
and how the user runs chargpt again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from chargpt.config import TrainConfig
from chargpt.errors import EXIT_SIGNAL, EXIT_USAGE, ChargptError

# set by the --nproc launcher: each rank writes its last line (an error, "interrupted ...") to DIR/rankN,
# and the launcher prints one of them once, instead of every rank's copy and torchrun's traceback
# set by the --nproc launcher: each rank writes its last line (an error, "interrupted ...") to DIR/rankN,
# and the launcher prints one of them once, instead of every rank's copy and torchrun's traceback
MESSAGES_ENV = "CHARGPT_LAUNCHER_MESSAGES"


def self_command() -> str:
    """How the user can run chargpt again: `chargpt` when that is on PATH and is this program, else a path."""
    argv0 = Path(sys.argv[0])
    here = argv0 if argv0.name == "chargpt" else Path(sys.executable).with_name("chargpt")
    on_path = shutil.which("chargpt")
    if on_path and here.exists() and Path(on_path).resolve() == here.resolve():
        return "chargpt"
    if not here.exists():
        return f"{sys.executable} -m chargpt"
    try:
        return str(here.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(here.absolute())


def launch_torchrun(nproc: int, cfg: TrainConfig, argv: list[str]) -> int:
    """`chargpt train --nproc N ...` = `python -m torch.distributed.run --standalone --nproc_per_node=N -m chargpt
    train ...`, after the checks that would otherwise fail on every rank at once."""
    import os

    import torch

    from chargpt.machine.devices import resolve_device
    from chargpt.training.distributed import check_batch

    if nproc < 1:
        raise ChargptError(f"--nproc must be >= 1, got {nproc}")
    if os.environ.get("WORLD_SIZE") or os.environ.get("RANK"):
        raise ChargptError("--nproc launches torchrun itself; drop --nproc when running under torchrun")
    check_batch(cfg, nproc)
    if resolve_device(cfg.device).type == "cuda" and nproc > torch.cuda.device_count():
        raise ChargptError(
            f"--nproc {nproc} needs {nproc} GPUs and this machine has {torch.cuda.device_count()}; "
            f"use --nproc {torch.cuda.device_count()} or --device cpu"
        )
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
    rest = [a for a in rest if not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    with tempfile.TemporaryDirectory(prefix="chargpt-launch-") as messages:
        env = {**os.environ, MESSAGES_ENV: messages}
        # torchrun in its own session: a Ctrl-C reaches it once (forwarded below), it stops the ranks together
        proc = subprocess.Popen([*cmd, "-m", "chargpt", *rest], start_new_session=True, env=env, stderr=subprocess.PIPE)
        launch = _Launch(proc, messages)
        relay = threading.Thread(target=launch.relay, daemon=True)
        relay.start()
        old = {sig: signal.signal(sig, launch.forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            code = proc.wait()
            relay.join()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        lines = launch.lines()
    if lines:  # one rank's last line, rank 0's first; torchrun's report of the failure is not shown
        sys.stderr.write(lines[0] + "\n")
    elif launch.caught:
        sys.stderr.write(f"interrupted by {launch.caught[0]}\n")
    if launch.caught:
        return EXIT_SIGNAL[launch.caught[0]]
    return EXIT_USAGE if lines and code else code


class _Launch:
    """The --nproc launcher's view of torchrun: relays its stderr (the progress bar) until a rank has said
    its last line or a signal came, forwards signals, and collects the ranks' last lines."""

    def __init__(self, proc: subprocess.Popen, messages: str) -> None:
        self.proc, self.messages = proc, messages
        self.caught: list[str] = []

    def forward(self, signum: int, frame: Any) -> None:
        name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
        self.caught.append(name)
        self.proc.send_signal(signal.SIGINT if name == "SIGINT" else signal.SIGTERM)

    def relay(self) -> None:
        out = getattr(sys.stderr, "buffer", None)
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            if self.caught or os.listdir(self.messages) or out is None:
                continue  # what follows is torchrun's account of the stop: the launcher says it in one line
            try:
                out.write(chunk)
                out.flush()
            except OSError:
                pass

    def lines(self) -> list[str]:
        names = sorted(os.listdir(self.messages), key=lambda n: int(n.removeprefix("rank")))
        found = []
        for name in names:
            with open(os.path.join(self.messages, name), encoding="utf-8", errors="replace") as f:
                found.append(f.read().strip())
        return [line for line in found if line]


def last_line(line: str) -> None:
    """A rank's last line: to stderr, or (under the --nproc launcher) to its file, printed once by the launcher."""
    messages = os.environ.get(MESSAGES_ENV)
    if messages and os.path.isdir(messages):
        rank = os.environ.get("RANK", "0")
        path = os.path.join(messages, f"rank{int(rank) if rank.isdigit() else 0}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(line + "\n")
        return
    sys.stderr.write(line + "\n")
