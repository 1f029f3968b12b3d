"""The CPU flags that matter for speed, printed by every benchmark with its figures (and MKL's reproducibility mode,
which chargpt sets: it changes how MKL rounds, and its speed, on AMD CPUs)."""

from __future__ import annotations

from chargpt.cli.machine import mkl_cbwr
from chargpt.machine.precision import SPEED_FLAGS as SHOWN_FLAGS
from chargpt.machine.precision import CPUInfo


def shown_flags(info: CPUInfo) -> str:
    have = [f for f in SHOWN_FLAGS if f in info.flags]
    flags = " ".join(have) if have else "(none of " + " ".join(SHOWN_FLAGS) + ")"
    return f"{flags}; MKL_CBWR {mkl_cbwr()}"
