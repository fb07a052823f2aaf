"""Training plans: a model graph plus its backward pass, ready to execute.

The in-process trainer and (with the distributed runtime) the master both derive
the training graph here, so the two paths run the same nodes.

Usage::

    plan = build_train_plan(g, loss=total_loss, prediction=probs,
                            features="x", labels="y")
"""
from __future__ import annotations

from dataclasses import dataclass

from graph.autodiff import gradients
from graph.core import Graph, Tensor
from graph.errors import GraphError


@dataclass(frozen=True)
class TrainPlan:
    graph: Graph
    features: str  # placeholder of the inputs
    labels: str  # placeholder of the targets
    loss: str  # scalar total loss (data loss + penalties)
    prediction: str  # model output (probabilities for a softmax head)
    grads: dict  # trainable variable name -> gradient node name
    state_variables: tuple  # non-trainable variables updated by training (e.g. BN statistics)

    @property
    def trainable(self) -> tuple:
        return tuple(self.grads)


def build_train_plan(g: Graph, loss: Tensor, prediction: Tensor, features: str, labels: str) -> TrainPlan:
    """Add the backward pass for every trainable variable ``loss`` depends on."""
    if loss.shape != ():
        raise GraphError(f"the loss must be a scalar, got shape {loss.shape}", loss.name, loss.op)
    trainable = g.variables(trainable_only=True)
    grads = gradients(loss, trainable)
    grad_names = {v.name: gr.name for v, gr in zip(trainable, grads) if gr is not None}
    state = tuple(
        v.name for v in g.variables() if not g.nodes[v.name].attrs["trainable"] and v.name not in grad_names
    )
    return TrainPlan(g, features, labels, loss.name, prediction.name, grad_names, state)
