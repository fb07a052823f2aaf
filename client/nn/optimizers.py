"""Optimizers, Keras names: ``nn.optimizers.SGD(learning_rate=0.01, momentum=0.0)``
and ``nn.optimizers.Adam(learning_rate=0.001)``; a learning rate may be a schedule,
``nn.optimizers.schedules.CosineDecay(0.1, decay_steps=4690)``. The update rules live
with the parameter server (pstrain/runtime/optimizers.py), which applies them on every path."""
from types import SimpleNamespace

from pstrain.runtime.optimizers import SGD, Adam, CosineDecay, ExponentialDecay
from pstrain.runtime.optimizers import optimizer_from_config as get

schedules = SimpleNamespace(CosineDecay=CosineDecay, ExponentialDecay=ExponentialDecay)

__all__ = ["SGD", "Adam", "get", "schedules"]
