"""Each learning-rate schedule against its closed form: linear warm-up from 0 over
``warmup_steps``, then linear, cosine, inverse-sqrt or constant."""
import math

import pytest

from fastlab.optim import SCHEDULES, lr_multiplier

WARMUP, TOTAL, MIN = 10, 110, 0.1


def _closed_form(name, step):
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / (TOTAL - WARMUP))
    return {"linear": MIN + (1 - MIN) * (1 - progress),
            "cosine": MIN + (1 - MIN) * (1 + math.cos(math.pi * progress)) / 2,
            "inverse_sqrt": max(MIN, math.sqrt(WARMUP / (step + 1))),
            "constant": 1.0}[name]


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_its_closed_form(name):
    f = lr_multiplier(name, WARMUP, TOTAL, MIN)
    for step in (0, 4, 9, 10, 35, 60, 85, 109, 110, 500):
        assert f(step) == pytest.approx(_closed_form(name, step), rel=1e-12), step


@pytest.mark.parametrize("name, step, value", [
    ("linear", 0, 0.1), ("linear", 9, 1.0), ("linear", 60, 0.55), ("linear", 110, 0.1),
    ("cosine", 10, 1.0), ("cosine", 60, 0.55), ("cosine", 35, 0.1 + 0.9 * (2 + 2 ** 0.5) / 4),
    ("cosine", 110, 0.1), ("inverse_sqrt", 39, 0.5), ("inverse_sqrt", 1999, 0.1),
    ("constant", 5, 0.6), ("constant", 1000, 1.0),
])
def test_schedule_values_by_hand(name, step, value):
    assert lr_multiplier(name, WARMUP, TOTAL, MIN)(step) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_no_warmup_starts_at_full_rate(name):
    assert lr_multiplier(name, 0, TOTAL, MIN)(0) == 1.0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_multiplier("step", WARMUP, TOTAL)
    with pytest.raises(ValueError, match="total_steps >= 1"):
        lr_multiplier("linear", WARMUP, 0)
