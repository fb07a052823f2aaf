"""Keras-style layers, lowered to graph ops when a model is built.

Each layer has ``build(g, input_shape, dtype, rng)`` (creates its variables),
``call(g, x)`` (adds its ops) and ``get_config()`` (for saving). Kernels are
``(in, out)``, batch-major, as in Keras.
"""
from __future__ import annotations

import inspect

import numpy as np

from client.nn import activations, initializers, regularizers
from graph.core import Graph, Tensor


class Layer:
    """The base of every layer. Each takes Keras's base arguments as keywords:
    ``name``, and (read on a model's first layer) the shape of one example, as
    ``input_dim=784`` or ``input_shape=(28, 28)``.

    Usage: ``nn.BatchNormalization(input_dim=3)``
    """

    kind = "layer"

    def __init__(self, *, name: str | None = None, input_dim: int | None = None, input_shape=None, **unknown):
        cls = type(self).__name__
        if unknown:
            params = inspect.signature(type(self).__init__).parameters.values()
            takes = [p.name for p in params if p.name != "self" and p.kind != p.VAR_KEYWORD]
            takes += [p for p in ("name", "input_dim", "input_shape") if p not in takes]
            raise TypeError(f"{cls}: unknown argument(s) {', '.join(sorted(unknown))}; it takes {', '.join(takes)}")
        self.name = name
        if input_dim is not None and input_shape is not None:
            raise ValueError(f"{cls}: give input_dim or input_shape, not both")
        if input_dim is not None:
            if isinstance(input_dim, bool) or not isinstance(input_dim, (int, np.integer)) or input_dim <= 0:
                raise ValueError(f"{cls}: input_dim must be a positive integer, got {input_dim!r}")
            input_shape = (int(input_dim),)
        if input_shape is not None:
            if not isinstance(input_shape, (tuple, list)) or not all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in input_shape
            ):
                raise ValueError(
                    f"{cls}: input_shape must be a tuple of positive integers, one example's shape such as (784,) "
                    f"or (28, 28), got {input_shape!r}"
                )
            input_shape = tuple(int(d) for d in input_shape)
        self.input_shape = input_shape
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


def _init_config(init, default: str) -> str:
    """An initializer as a config stores it: an array's values live in the weights."""
    return init if isinstance(init, str) else default


class Dense(Layer):
    """A fully connected layer: ``activation(x @ kernel + bias)``.

    ``activation``: a name, ``nn.activations.LeakyReLU(alpha)`` or a callable on graph
    tensors (in-process only); the regularizers add their penalties to the loss.

    Usage: ``nn.Dense(128, activation="relu", input_dim=784)``
    """

    kind = "dense"

    def __init__(
        self,
        units: int,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(units, (int, np.integer)) or units <= 0:
            raise ValueError(f"Dense: units must be a positive integer, got {units!r}")
        self.units = int(units)
        self.activation = activations.get(activation, f"Dense({units})")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)

    def build(self, g, input_shape, dtype, rng):
        if len(input_shape) != 1:
            raise ValueError(
                f"layer '{self.name}': Dense takes inputs of shape (batch, features), got (batch, "
                f"{', '.join(map(str, input_shape))}); add a Flatten layer first"
            )
        k = initializers.initialize(self.kernel_initializer, (input_shape[0], self.units), dtype, rng, f"layer '{self.name}' kernel")
        kernel = g.variable(k, name=f"{self.name}/kernel")
        self.weights = [kernel]
        self.penalties = [] if self.kernel_regularizer is None else [self.kernel_regularizer.penalty(g, kernel)]
        if self.use_bias:
            b = initializers.initialize(self.bias_initializer, (self.units,), dtype, rng, f"layer '{self.name}' bias")
            bias = g.variable(b, name=f"{self.name}/bias")
            self.weights.append(bias)
            if self.bias_regularizer is not None:
                self.penalties.append(self.bias_regularizer.penalty(g, bias))

    def call(self, g, x):
        y = g.matmul(x, self.weights[0], name=f"{self.name}/matmul")
        if self.use_bias:
            y = g.add(y, self.weights[1], name=f"{self.name}/bias_add")
        self.logits = y
        return activations.apply(self.activation, y, self.name)

    def output_shape(self, input_shape):
        return (self.units,)

    def get_config(self):
        reg = lambda r: None if r is None else r.get_config()
        return {
            **super().get_config(),
            "units": self.units,
            "activation": activations.serialize(self.activation, f"layer '{self.name}'"),
            "use_bias": self.use_bias,
            "kernel_initializer": _init_config(self.kernel_initializer, "glorot_uniform"),
            "bias_initializer": _init_config(self.bias_initializer, "zeros"),
            "kernel_regularizer": reg(self.kernel_regularizer),
            "bias_regularizer": reg(self.bias_regularizer),
        }


class Dropout(Layer):
    """Inverted dropout: in training each unit is zeroed with probability ``rate`` and
    the rest scaled by 1/(1-rate); at inference it is the identity."""

    kind = "dropout"

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
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
    """Batch normalization, ``gamma * (x - mean) / sqrt(var + epsilon) + beta``: batch
    statistics in training, moving averages at inference.

    Keras's options: ``center=False`` drops beta (0), ``scale=False`` drops gamma (1);
    the weights are [gamma, beta, moving_mean, moving_variance], less those dropped.

    Usage: ``nn.BatchNormalization(momentum=0.9, scale=False)``
    """

    kind = "batch_normalization"

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 0.001,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"BatchNormalization: momentum must be in [0, 1], got {momentum!r}")
        if float(epsilon) <= 0:
            raise ValueError(f"BatchNormalization: epsilon must be > 0, got {epsilon!r}")
        self.axis, self.momentum, self.epsilon = int(axis), float(momentum), float(epsilon)
        self.center, self.scale = bool(center), bool(scale)
        self.beta_initializer, self.gamma_initializer = beta_initializer, gamma_initializer
        self.moving_mean_initializer = moving_mean_initializer
        self.moving_variance_initializer = moving_variance_initializer
        self._inputs: list[Tensor] = []  # gamma, beta, moving_mean, moving_variance of the op

    def build(self, g, input_shape, dtype, rng):
        full = (None,) + tuple(input_shape)
        axis = self.axis % len(full)
        if axis == 0:
            raise ValueError(f"layer '{self.name}': BatchNormalization cannot normalize over the batch axis")
        c = full[axis]

        def weight(what, init, trainable=True):
            value = initializers.initialize(init, (c,), dtype, rng, f"layer '{self.name}' {what}")
            return g.variable(value, trainable=trainable, name=f"{self.name}/{what}")

        # A dropped gamma or beta is a constant 1 or 0 for the op: no weight, no gradient.
        gamma = weight("gamma", self.gamma_initializer) if self.scale else g.constant(np.ones(c, dtype), name=f"{self.name}/gamma")
        beta = weight("beta", self.beta_initializer) if self.center else g.constant(np.zeros(c, dtype), name=f"{self.name}/beta")
        moving_mean = weight("moving_mean", self.moving_mean_initializer, trainable=False)
        moving_variance = weight("moving_variance", self.moving_variance_initializer, trainable=False)
        self._inputs = [gamma, beta, moving_mean, moving_variance]
        self.weights = [t for t in self._inputs if t.op == "variable"]

    def call(self, g, x):
        return g.batch_norm(x, *self._inputs, axis=self.axis, epsilon=self.epsilon, momentum=self.momentum, name=self.name)

    def get_config(self):
        return {
            **super().get_config(),
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": _init_config(self.beta_initializer, "zeros"),
            "gamma_initializer": _init_config(self.gamma_initializer, "ones"),
            "moving_mean_initializer": _init_config(self.moving_mean_initializer, "zeros"),
            "moving_variance_initializer": _init_config(self.moving_variance_initializer, "ones"),
        }


class Flatten(Layer):
    """Flattens each example to one dimension."""

    kind = "flatten"

    def call(self, g, x):
        return g.reshape(x, shape=(-1, int(np.prod(x.shape[1:]))), name=self.name)

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)


class Activation(Layer):
    """An activation on its own: ``nn.Activation("relu")``, or any activation
    ``Dense`` takes (``nn.Activation(nn.activations.LeakyReLU(0.1))``)."""

    kind = "activation"

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation = activations.get(activation, "Activation")

    def call(self, g, x):
        self.logits = x
        return activations.apply(self.activation, x, self.name)

    def get_config(self):
        return {**super().get_config(), "activation": activations.serialize(self.activation, f"layer '{self.name}'")}


LAYERS = {c.__name__: c for c in (Dense, Dropout, BatchNormalization, Flatten, Activation)}


def from_config(cfg: dict) -> Layer:
    cfg = dict(cfg)
    cls = LAYERS.get(cfg.pop("class"))
    if cls is None:
        raise ValueError(f"unknown layer class in saved model; known: {sorted(LAYERS)}")
    if "input_shape" in cfg:
        cfg["input_shape"] = tuple(cfg["input_shape"])
    return cls(**cfg)
