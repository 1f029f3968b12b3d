"""`chargpt train | sample | eval | info | serve | export`: parses flags, calls the library, prints.

parser.py holds the flags and help, commands.py what each command does, launch.py the --nproc supervisor,
guard.py the process around a command (Ctrl-C during imports, closed pipes)."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading

from chargpt.cli import commands
from chargpt.cli.guard import Tolerant, import_holding_ctrl_c, quiet_stdout
from chargpt.cli.launch import last_line, self_command
from chargpt.cli.parser import build_parser, check_paths
from chargpt.errors import EXIT_SIGNAL, EXIT_USAGE, ChargptError, RememberedInterrupt, one_line

__all__ = ["build_parser", "main", "self_command"]


def main(argv: list[str] | None = None) -> int:
    """The `chargpt` command. stderr is made tolerant for its duration: a closed log pipe (`2>&1 | head`) or a
    closed descriptor (`2>&-`) must not end a training run; a closed stdout (`>&-`) discards the output."""
    stderr, stdout = sys.stderr, sys.stdout
    sys.stderr = stderr if isinstance(stderr, Tolerant) else Tolerant(stderr)
    if stdout is None:  # started with stdout closed (`>&-`): what it would print goes nowhere
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
        sys.stderr, sys.stdout = stderr, stdout


def _main(argv: list[str]) -> int:
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if on_main else None
    try:
        return _run(argv)
    finally:  # called in-process (tests, notebooks): the caller's handler back, unless an interrupt set SIG_IGN
        if on_main and previous is not None and isinstance(signal.getsignal(signal.SIGINT), RememberedInterrupt):
            signal.signal(signal.SIGINT, previous)


def _run(argv: list[str]) -> int:
    try:
        parser = build_parser()
        if not argv:  # `chargpt` alone: what it can do, not an error
            parser.print_help()
            return 0
        args, extra = parser.parse_known_args(argv)
        if extra:  # the subcommand's parser reports it, with its own --help and a close match
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
        check_paths(args)
        if threading.current_thread() is threading.main_thread():  # a Ctrl-C from here on is also remembered
            signal.signal(signal.SIGINT, RememberedInterrupt())
        import_holding_ctrl_c(args.command)
        code = commands.run(args, argv)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, not as a traceback at exit
        return code
    except ChargptError as e:
        last_line(f"chargpt: error: {one_line(str(e))}")
        return EXIT_USAGE
    except KeyboardInterrupt:  # also during start-up (imports, data loading), before training handles signals
        if threading.current_thread() is threading.main_thread():
            # a Ctrl-C still pending (or a second one) must not turn this exit into death by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        quiet_stdout()
        sys.stderr.write("\ninterrupted\n")
        return EXIT_SIGNAL["SIGINT"]
    except BrokenPipeError:  # `chargpt sample | head`: the reader has all it wants
        quiet_stdout()
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            where = f" {e.filename}" if e.filename else ""
            last_line(f"chargpt: error: cannot use{where} ({e.strerror or e}); check the path and the machine")
            return EXIT_USAGE
        quiet_stdout()
        sys.stderr.write(f"chargpt: error: cannot write the output ({e.strerror}); is the disk it goes to full?\n")
        return EXIT_USAGE
    except MemoryError:
        last_line("chargpt: error: out of memory; ask for less (a smaller model, batch or output)")
        return EXIT_USAGE
    except ImportError as e:  # e.g. torch's libraries cannot be mapped under a small `ulimit -v`
        last_line(
            f"chargpt: error: cannot load {e.name or 'a module'} ({one_line(str(e), 200)}); check the "
            f"installation (pip install chargpt) and that the process may use enough memory"
        )
        return EXIT_USAGE
    except RuntimeError as e:
        if "allocate" not in str(e):  # torch's own out-of-memory (e.g. under ulimit -v) is the user's to fix
            raise
        last_line(f"chargpt: error: out of memory ({one_line(str(e), 200)}); ask for less, or allow more memory")
        return EXIT_USAGE
