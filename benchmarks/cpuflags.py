"""The CPU flags that matter for speed, printed by every benchmark with its figures."""

from __future__ import annotations

from chargpt.machine.precision import CPUInfo

SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "bf16")


def shown_flags(info: CPUInfo) -> str:
    have = [f for f in SHOWN_FLAGS if f in info.flags]
    return " ".join(have) if have else "(none of " + " ".join(SHOWN_FLAGS) + ")"
