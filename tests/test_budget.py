"""chargpt.training.budget: how a --max-time run ends within its budget, in plain numbers."""

from __future__ import annotations

import math

from chargpt.training.budget import EVAL_SHARE, MARGIN, SLACK, Budget, Timings

MEASURED = Timings(step=0.4, evaluation=1.0, sample=0.5, plot=0.3, save=0.2)


def test_the_reserve_is_the_work_that_ends_a_run_with_room_to_spare():
    assert Budget(60).reserve(MEASURED) == MARGIN * (0.4 + 1.0 + 0.3 + 0.2) + SLACK
    assert Budget(60).reserve(Timings()) == SLACK  # before anything was measured: the slack alone


def test_a_run_stops_while_its_end_still_fits():
    budget, reserve = Budget(60), Budget(60).reserve(MEASURED)
    assert not budget.spent(60 - reserve - 0.01, MEASURED)
    assert budget.spent(60 - reserve, MEASURED) and budget.spent(59.9, MEASURED)
    assert not Budget(0).spent(10**6, MEASURED)  # no time limit: the steps end the run


def test_an_evaluation_takes_a_tenth_of_the_budget_and_the_last_what_is_left():
    budget = Budget(100)
    assert budget.evaluation_seconds(0.0, MEASURED, final=False) == EVAL_SHARE * 100
    assert budget.evaluation_seconds(95.0, MEASURED, final=False) == 5.0  # never past the end
    after = budget.after_estimate(MEASURED)
    assert after == MARGIN * (0.5 + 0.3 + 2 * 0.2) + SLACK
    assert budget.evaluation_seconds(90.0, MEASURED, final=True) == 10.0 - after
    assert budget.evaluation_seconds(100.0, MEASURED, final=True) == 0.0  # spent: the caller's one batch
    assert Budget(0).evaluation_seconds(5.0, MEASURED, final=True) == math.inf


def test_the_last_sample_is_written_only_where_it_fits():
    budget = Budget(100)
    after = budget.after_estimate(MEASURED)
    assert budget.sample_fits(100 - after - 1e-9, MEASURED) and not budget.sample_fits(100 - after + 0.01, MEASURED)
    assert Budget(0).sample_fits(10**6, MEASURED)
