"""Keras-style layers, lowered to graph ops when a model is built.

Each layer has ``build(g, input_shape, dtype, rng)`` (creates its variables),
``call(g, x)`` (adds its ops) and ``get_config()`` (for saving). Kernels are
``(in, out)``, batch-major, as in Keras.
"""
from __future__ import annotations

import numpy as np

from client.nn import activations, initializers, regularizers
from graph.core import Graph, Tensor


class Layer:
    kind = "layer"

    def __init__(self, name: str | None = None, input_dim: int | None = None, input_shape=None):
        self.name = name
        if input_dim is not None and input_shape is not None:
            raise ValueError(f"{type(self).__name__}: give input_dim or input_shape, not both")
        if input_dim is not None:
            if int(input_dim) <= 0:
                raise ValueError(f"{type(self).__name__}: input_dim must be a positive integer, got {input_dim!r}")
            input_shape = (int(input_dim),)
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.weights: list[Tensor] = []  # Keras order
        self.penalties: list[Tensor] = []
        self.logits: Tensor | None = None  # pre-activation output, when a head can fuse it

    def build(self, g: Graph, input_shape: tuple, dtype, rng: np.random.Generator) -> None:
        pass

    def call(self, g: Graph, x: Tensor) -> Tensor:
        raise NotImplementedError

    def output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict:
        cfg = {"class": type(self).__name__, "name": self.name}
        if self.input_shape is not None:
            cfg["input_shape"] = list(self.input_shape)
        return cfg


class Dense(Layer):
    """A fully connected layer: ``activation(x @ kernel + bias)``.

    Usage: ``nn.Dense(128, activation="relu", input_dim=784)``
    """

    kind = "dense"

    def __init__(
        self,
        units: int,
        activation: str | None = None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        input_dim: int | None = None,
        input_shape=None,
        name: str | None = None,
    ):
        super().__init__(name, input_dim, input_shape)
        if not isinstance(units, (int, np.integer)) or units <= 0:
            raise ValueError(f"Dense: units must be a positive integer, got {units!r}")
        self.units = int(units)
        self.activation = activations.check(activation, f"Dense({units})")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.kernel_regularizer = regularizers.get(kernel_regularizer)

    def build(self, g, input_shape, dtype, rng):
        if len(input_shape) != 1:
            raise ValueError(
                f"layer '{self.name}': Dense takes inputs of shape (batch, features), got (batch, "
                f"{', '.join(map(str, input_shape))}); add a Flatten layer first"
            )
        k = initializers.initialize(self.kernel_initializer, (input_shape[0], self.units), dtype, rng, f"layer '{self.name}' kernel")
        self.weights = [g.variable(k, name=f"{self.name}/kernel")]
        if self.use_bias:
            b = initializers.initialize(self.bias_initializer, (self.units,), dtype, rng, f"layer '{self.name}' bias")
            self.weights.append(g.variable(b, name=f"{self.name}/bias"))
        if self.kernel_regularizer is not None:
            self.penalties = [self.kernel_regularizer.penalty(g, self.weights[0])]

    def call(self, g, x):
        y = g.matmul(x, self.weights[0], name=f"{self.name}/matmul")
        if self.use_bias:
            y = g.add(y, self.weights[1], name=f"{self.name}/bias_add")
        self.logits = y
        return activations.apply(g, self.activation, y, self.name)

    def output_shape(self, input_shape):
        return (self.units,)

    def get_config(self):
        init = lambda i: i if isinstance(i, str) else "glorot_uniform"  # arrays live in the weights
        return {
            **super().get_config(),
            "units": self.units,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "kernel_initializer": init(self.kernel_initializer),
            "bias_initializer": init(self.bias_initializer),
            "kernel_regularizer": None if self.kernel_regularizer is None else self.kernel_regularizer.get_config(),
        }


class Dropout(Layer):
    """Inverted dropout: in training each unit is zeroed with probability ``rate`` and
    the rest scaled by 1/(1-rate); at inference it is the identity."""

    kind = "dropout"

    def __init__(self, rate: float, seed: int | None = None, name: str | None = None, input_shape=None):
        super().__init__(name, None, input_shape)
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.seed = seed

    def build(self, g, input_shape, dtype, rng):
        if self.seed is None:
            self.seed = int(rng.integers(0, 2**31 - 1))

    def call(self, g, x):
        return g.dropout(x, rate=self.rate, seed=int(self.seed), name=self.name)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


class BatchNormalization(Layer):
    """Batch normalization: batch statistics in training, moving averages at
    inference; weights are [gamma, beta, moving_mean, moving_variance]."""

    kind = "batch_normalization"

    def __init__(self, axis: int = -1, momentum: float = 0.99, epsilon: float = 0.001, name: str | None = None, input_shape=None):
        super().__init__(name, None, input_shape)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"BatchNormalization: momentum must be in [0, 1], got {momentum!r}")
        if float(epsilon) <= 0:
            raise ValueError(f"BatchNormalization: epsilon must be > 0, got {epsilon!r}")
        self.axis, self.momentum, self.epsilon = int(axis), float(momentum), float(epsilon)

    def build(self, g, input_shape, dtype, rng):
        full = (None,) + tuple(input_shape)
        axis = self.axis % len(full)
        if axis == 0:
            raise ValueError(f"layer '{self.name}': BatchNormalization cannot normalize over the batch axis")
        c = full[axis]
        self.weights = [
            g.variable(np.ones(c, dtype), name=f"{self.name}/gamma"),
            g.variable(np.zeros(c, dtype), name=f"{self.name}/beta"),
            g.variable(np.zeros(c, dtype), trainable=False, name=f"{self.name}/moving_mean"),
            g.variable(np.ones(c, dtype), trainable=False, name=f"{self.name}/moving_variance"),
        ]

    def call(self, g, x):
        return g.batch_norm(x, *self.weights, axis=self.axis, epsilon=self.epsilon, momentum=self.momentum, name=self.name)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "momentum": self.momentum, "epsilon": self.epsilon}


class Flatten(Layer):
    """Flattens each example to one dimension."""

    kind = "flatten"

    def call(self, g, x):
        return g.reshape(x, shape=(-1, int(np.prod(x.shape[1:]))), name=self.name)

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)


class Activation(Layer):
    """An activation on its own: ``nn.Activation("relu")``."""

    kind = "activation"

    def __init__(self, activation: str, name: str | None = None, input_shape=None):
        super().__init__(name, None, input_shape)
        self.activation = activations.check(activation, "Activation")

    def call(self, g, x):
        self.logits = x
        return activations.apply(g, self.activation, x, self.name)

    def get_config(self):
        return {**super().get_config(), "activation": self.activation}


LAYERS = {c.__name__: c for c in (Dense, Dropout, BatchNormalization, Flatten, Activation)}


def from_config(cfg: dict) -> Layer:
    cfg = dict(cfg)
    cls = LAYERS.get(cfg.pop("class"))
    if cls is None:
        raise ValueError(f"unknown layer class in saved model; known: {sorted(LAYERS)}")
    if "input_shape" in cfg:
        cfg["input_shape"] = tuple(cfg["input_shape"])
    return cls(**cfg)
