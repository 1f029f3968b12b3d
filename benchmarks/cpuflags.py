"""The CPU flags that matter for speed, printed by every benchmark with its figures."""

from __future__ import annotations

from chargpt.machine.precision import SPEED_FLAGS as SHOWN_FLAGS
from chargpt.machine.precision import CPUInfo


def shown_flags(info: CPUInfo) -> str:
    have = [f for f in SHOWN_FLAGS if f in info.flags]
    return " ".join(have) if have else "(none of " + " ".join(SHOWN_FLAGS) + ")"
