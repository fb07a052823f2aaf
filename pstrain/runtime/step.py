"""One training or evaluation step of a ``TrainPlan``: the piece of the worker loop
that the in-process trainer and distributed workers share.

Usage::

    runner = StepRunner(plan, backend="cpu")
    out = runner.train_step(xb, yb, params, RunContext(step=7))
    store.push(out.grads, out.updates)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graph.registry import RunContext
from pstrain.runtime.executor import Executor
from pstrain.runtime.plan import TrainPlan


@dataclass
class StepOutput:
    loss: float
    prediction: np.ndarray  # executor buffer on the host: copy to keep
    grads: dict  # variable name -> gradient (executor buffers)
    updates: dict  # state variable name -> new value


class StepRunner:
    def __init__(self, plan: TrainPlan, backend="cpu"):
        self.plan = plan
        names = list(plan.grads)
        self._grad_vars = names
        self._train = Executor(plan.graph, [plan.loss, plan.prediction] + [plan.grads[n] for n in names], backend)
        self._eval = Executor(plan.graph, [plan.loss, plan.prediction], backend)
        self._predict = Executor(plan.graph, [plan.prediction], backend)
        self.backend = self._train.backend

    def train_step(self, x, y, params, ctx: RunContext) -> StepOutput:
        res = self._train.run({self.plan.features: x, self.plan.labels: y}, params, ctx)
        loss, pred, *grads = res.values
        return StepOutput(
            float(self.backend.to_host(loss)),
            self.backend.to_host(pred),
            dict(zip(self._grad_vars, grads)),
            res.updates,
        )

    def eval_step(self, x, y, params) -> tuple[float, np.ndarray]:
        res = self._eval.run({self.plan.features: x, self.plan.labels: y}, params, RunContext(training=False))
        loss, pred = res.values
        return float(self.backend.to_host(loss)), self.backend.to_host(pred)

    def predict_step(self, x, params) -> np.ndarray:
        (pred,) = self._predict.run({self.plan.features: x}, params, RunContext(training=False)).values
        return self.backend.to_host(pred)
