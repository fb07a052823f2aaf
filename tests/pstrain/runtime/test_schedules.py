"""Learning-rate schedules: Keras's formulas, and the optimizer applying them per update."""
import math

import numpy as np
import pytest

from pstrain.kernels import get_backend
from pstrain.runtime.optimizers import SGD, Adam, CosineDecay, ExponentialDecay, Optimizer, optimizer_from_config


def test_cosine_decay_values():
    s = CosineDecay(0.1, decay_steps=10, alpha=0.1)
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.1 * (0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)) + 0.1))
    assert s(10) == pytest.approx(0.01)
    assert s(100) == pytest.approx(0.01)  # held at the floor after decay_steps


def test_exponential_decay_values():
    s = ExponentialDecay(0.1, decay_steps=4, decay_rate=0.5)
    assert s(4) == pytest.approx(0.05)
    assert s(2) == pytest.approx(0.1 * 0.5**0.5)
    assert ExponentialDecay(0.1, 4, 0.5, staircase=True)(7) == pytest.approx(0.05)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sgd_uses_the_scheduled_rate_per_update(backend):
    sched = ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    opt = Optimizer(SGD(sched), get_backend(backend))
    p = np.zeros(3)
    g = np.ones(3)
    for _ in range(3):
        opt.apply("w", p, g)
    np.testing.assert_allclose(p, -(1.0 + 0.5 + 0.25) * np.ones(3))


def test_schedules_round_trip_through_config():
    for opt in (SGD(CosineDecay(0.1, 100), momentum=0.9), Adam(ExponentialDecay(0.01, 10, 0.9, True))):
        assert optimizer_from_config(opt.get_config()) == opt


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: CosineDecay(-0.1, 10), "initial_learning_rate"),
        (lambda: CosineDecay(0.1, 0), "decay_steps"),
        (lambda: CosineDecay(0.1, 10, alpha=2.0), "alpha"),
        (lambda: ExponentialDecay(0.1, 10, 0.0), "decay_rate"),
    ],
)
def test_schedule_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()
