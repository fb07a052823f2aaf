"""Optimizers, Keras names: ``nn.optimizers.SGD(learning_rate=0.01, momentum=0.0)``
and ``nn.optimizers.Adam(learning_rate=0.001)``. The update rules live with the
parameter server (psserver/optimizers.py), which applies them on every path."""
from psserver.optimizers import SGD, Adam, optimizer_from_config as get

__all__ = ["SGD", "Adam", "get"]
