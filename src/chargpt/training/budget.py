"""The time budget (--max-time): how a run ends within it, evaluations, the last sample and the saves included.
Plain numbers in, plain numbers out (tests/test_budget.py): the loop measures how long its work takes and asks.

The budget keeps room for what must still happen after the next step: that step, the final evaluation, its
sample, the plot and the saves, each as long as measured, with MARGIN to spare (on a machine whose other
programs come and go, the last of them can take longer than the one before) and SLACK seconds more (a stall of a
few tenths of a second is a fixed cost, not a share of the work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MARGIN = 1.25  # x the measured time of what ends a time-budgeted run
SLACK = 0.25  # seconds
EVAL_SHARE = 0.1  # of the budget: the most one evaluation before the last may take


@dataclass(frozen=True)
class Timings:
    """How long the run's work took, as measured: a step and a save (the last), an evaluation's estimate, its
    sample and a plot (the longest seen)."""

    step: float = 0.0
    evaluation: float = 0.0
    sample: float = 0.0
    plot: float = 0.0
    save: float = 0.0


@dataclass(frozen=True)
class Budget:
    """A run's --max-time in seconds; 0 = no time limit (the step count alone ends the run)."""

    seconds: float

    def reserve(self, t: Timings) -> float:
        """Seconds to keep after one more step: that step and a save, the final evaluation (its sample included)
        and the plot."""
        return MARGIN * (t.step + t.evaluation + t.plot + t.save) + SLACK

    def spent(self, elapsed: float, t: Timings) -> bool:
        """Whether another step would leave too little for the end of the run."""
        return bool(self.seconds) and elapsed + self.reserve(t) >= self.seconds

    def after_estimate(self, t: Timings) -> float:
        """What the last evaluation does after its estimate: the sample, the plot, the model and state saves."""
        return MARGIN * (t.sample + t.plot + 2 * t.save) + SLACK

    def evaluation_seconds(self, elapsed: float, t: Timings, final: bool) -> float:
        """How long an evaluation's estimate may take: no limit without a budget; with one, a tenth of it, never
        past its end (the last one gets what is left after the work that follows it); a spent budget still
        gets one batch per split (the caller's minimum)."""
        if not self.seconds:
            return math.inf
        left = max(self.seconds - elapsed, 0.0)
        if final:
            return max(left - self.after_estimate(t), 0.0)
        return min(EVAL_SHARE * self.seconds, left)

    def sample_fits(self, elapsed: float, t: Timings) -> bool:
        """Whether the budget has time for the sample as well as the plot and saves that follow it."""
        return not self.seconds or self.seconds - elapsed >= self.after_estimate(t)
