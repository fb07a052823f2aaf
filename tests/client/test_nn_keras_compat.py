"""Keras behaviour a Keras user relies on, beyond the basics in test_nn.py: predict
on an uncompiled model, input_dim/input_shape on every layer, BatchNormalization's
center/scale and initializers, Dense's bias_regularizer, LeakyReLU with a slope, the
perceptron's step and sign, and callable activations and losses.

Numbers are compared with PyTorch in float64: the forward pass, and one SGD step
(the loss before the update and every weight after it).
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client import nn
from client.nn import layers as layers_mod

RTOL, ATOL = 1e-10, 1e-12
LR = 0.1


# ---- helpers ------------------------------------------------------------------------------------------
def data(n=8, features=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, features))


def targets(n=8, out=2, seed=1):
    return np.random.default_rng(seed).standard_normal((n, out))


def linear(kernel: np.ndarray, bias: np.ndarray | None) -> torch.nn.Linear:
    lin = torch.nn.Linear(*kernel.shape, bias=bias is not None, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(kernel.T))
        if bias is not None:
            lin.bias.copy_(torch.tensor(bias))
    return lin


def host(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def two_dense(activation, loss="mse", bias_regularizer=None, kernel_regularizer=None, compile_=True):
    """Dense(5, activation) -> Dense(2): a hidden activation under test, a linear head."""
    model = nn.Sequential(
        [
            nn.Dense(5, activation=activation, input_dim=4, bias_initializer=np.linspace(-0.5, 0.5, 5),
                     kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer),
            nn.Dense(2, bias_initializer=np.array([0.3, -0.2]), bias_regularizer=bias_regularizer),
        ],
        dtype="float64",
        seed=0,
    )
    if compile_:
        model.compile(nn.optimizers.SGD(LR), loss)
    return model


def step_both(model: nn.Sequential, torch_act, torch_loss=F.mse_loss, penalty=lambda l0, l1: 0.0, x=None, y=None):
    """One SGD step of ``two_dense`` and of the same torch model; compares the loss
    and every weight afterwards."""
    x = data() if x is None else x
    y = targets() if y is None else y
    k0, b0, k1, b1 = model.get_weights()
    l0, l1 = linear(k0, b0), linear(k1, b1)
    opt = torch.optim.SGD([*l0.parameters(), *l1.parameters()], lr=LR)
    total = torch_loss(l1(torch_act(l0(torch.tensor(x)))), torch.tensor(y)) + penalty(l0, l1)
    total.backward()
    opt.step()
    assert_close(model.train_on_batch(x, y), total.item())
    want = [host(l0.weight).T, host(l0.bias), host(l1.weight).T, host(l1.bias)]
    for got, w in zip(model.get_weights(), want):
        assert_close(got, w)


# ---- predict without compile ------------------------------------------------------------------------------
def test_a_model_with_input_dim_is_built_and_predicts_without_compile():
    model = two_dense("tanh", compile_=False)
    assert model.built
    k0, b0, k1, b1 = model.get_weights()
    x = data()
    with torch.no_grad():
        want = linear(k1, b1)(torch.tanh(linear(k0, b0)(torch.tensor(x))))
    assert_close(model.predict(x), host(want))


def test_build_then_predict_without_compile():
    model = nn.Sequential([nn.Dense(3, activation="relu"), nn.Dense(2, activation="softmax")], dtype="float64", seed=1)
    assert not model.built
    model.build((4,))
    assert model.built
    out = model.predict(data())
    assert out.shape == (8, 2)
    assert_close(out.sum(axis=1), np.ones(8))


def test_predict_on_an_unbuilt_uncompiled_model_builds_it_from_the_data():
    model = nn.Sequential([nn.Dense(3), nn.Dense(2)], dtype="float64", seed=1)
    assert model.predict(data(features=6)).shape == (8, 2)
    assert [w.shape for w in model.get_weights()] == [(6, 3), (3,), (3, 2), (2,)]


def test_add_builds_as_soon_as_the_input_shape_is_known_and_keeps_weights_on_the_next_add():
    model = nn.Sequential(dtype="float64", seed=2)
    model.add(nn.Dense(3, activation="relu", input_dim=4))
    assert model.built
    first = model.get_weights()
    model.add(nn.Dense(2))
    assert [w.shape for w in model.get_weights()] == [(4, 3), (3,), (3, 2), (2,)]
    for a, b in zip(model.get_weights(), first):
        np.testing.assert_array_equal(a, b)
    model.compile(nn.optimizers.SGD(LR), "mse")
    model.fit(data(), targets(), verbose=0)


def test_an_added_layer_that_does_not_fit_leaves_the_model_as_it_was():
    model = nn.Sequential([nn.Dense(3, input_dim=4)], dtype="float64")
    model.compile("sgd", "mse")
    bad = nn.Dense(2, activation=lambda x: 1.0)
    with pytest.raises(TypeError, match="layer 'dense_1'"):
        model.add(bad)
    assert len(model.layers) == 1
    model.fit(data(), targets(out=3), verbose=0)


def test_compile_before_add_builds_when_the_layers_come():
    model = nn.Sequential(dtype="float64", seed=0)
    model.compile(nn.optimizers.SGD(LR), "mse")
    model.add(nn.Dense(2, input_dim=4))
    assert model.built and model._plan is not None  # what a job submission reads
    model.fit(data(), targets(), verbose=0)


def test_uncompiled_model_checks_the_declared_input_shape():
    model = two_dense("relu", compile_=False)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 4\)"):
        model.predict(data(features=3))


@pytest.mark.parametrize("call", ["fit", "evaluate", "train_on_batch"])
def test_training_an_uncompiled_model_says_to_compile(call):
    model = two_dense("relu", compile_=False)
    args = (data(), targets())
    with pytest.raises(RuntimeError, match=f"not compiled.*model.compile.*before {call}"):
        getattr(model, call)(*args, **({"verbose": 0} if call == "fit" else {}))


def test_compile_after_build_keeps_the_weights_as_keras_does():
    model = two_dense("relu", compile_=False)
    new = [np.full_like(w, 0.1 * (i + 1)) for i, w in enumerate(model.get_weights())]
    model.set_weights(new)
    before = model.predict(data())
    model.compile(nn.optimizers.SGD(LR), "mse")
    for a, b in zip(model.get_weights(), new):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(data()), before)
    model.fit(data(), targets(), verbose=0)
    trained = model.get_weights()
    model.compile("adam", "mae")  # recompiling keeps the trained weights too
    for a, b in zip(model.get_weights(), trained):
        np.testing.assert_array_equal(a, b)


def test_an_uncompiled_model_saves_and_loads_uncompiled(tmp_path):
    model = two_dense("sigmoid", compile_=False)
    model.save(tmp_path / "m.npz")
    loaded = nn.load_model(tmp_path / "m.npz")
    assert loaded.get_config()["compile"] is None
    np.testing.assert_array_equal(loaded.predict(data()), model.predict(data()))
    with pytest.raises(RuntimeError, match="not compiled"):
        loaded.evaluate(data(), targets())


# ---- input_dim / input_shape on every layer ---------------------------------------------------------------
FIRST_LAYERS = {
    "Dense": lambda **kw: nn.Dense(3, **kw),
    "Dropout": lambda **kw: nn.Dropout(0.5, **kw),
    "BatchNormalization": lambda **kw: nn.BatchNormalization(**kw),
    "Flatten": lambda **kw: nn.Flatten(**kw),
    "Activation": lambda **kw: nn.Activation("tanh", **kw),
}


def test_every_layer_class_is_covered():
    defined = {
        c.__name__ for c in vars(layers_mod).values()
        if inspect.isclass(c) and issubclass(c, layers_mod.Layer) and c is not layers_mod.Layer
    }
    assert defined == set(layers_mod.LAYERS) == set(FIRST_LAYERS)


@pytest.mark.parametrize("kind", sorted(FIRST_LAYERS))
def test_every_layer_takes_input_dim_and_input_shape_as_first_layer(kind):
    def model(**kw):
        m = nn.Sequential([FIRST_LAYERS[kind](**kw), nn.Dense(2)], dtype="float64", seed=3)
        assert m.built
        return m

    by_dim, by_shape = model(input_dim=4), model(input_shape=(4,))
    assert by_dim.layers[0].input_shape == by_shape.layers[0].input_shape == (4,)
    for a, b in zip(by_dim.get_weights(), by_shape.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = data()
    assert by_dim.predict(x).shape == (8, 2)
    np.testing.assert_array_equal(by_dim.predict(x), by_shape.predict(x))
    assert by_dim.get_config()["input_shape"] == [4]


@pytest.mark.parametrize("kind", sorted(FIRST_LAYERS))
def test_every_layer_rejects_bad_input_arguments_by_name(kind):
    make = FIRST_LAYERS[kind]
    with pytest.raises(ValueError, match=f"{kind}: give input_dim or input_shape, not both"):
        make(input_dim=4, input_shape=(4,))
    with pytest.raises(ValueError, match=f"{kind}: input_dim must be a positive integer"):
        make(input_dim=0)
    with pytest.raises(ValueError, match=f"{kind}: input_shape must be a tuple of positive integers"):
        make(input_shape=4)
    with pytest.raises(TypeError, match=f"{kind}: unknown argument.*input_dimm; it takes .*name, input_dim, input_shape$"):
        make(input_dimm=4)


# ---- BatchNormalization: center, scale, initializers ----------------------------------------------------
AFFINE = [(True, True), (True, False), (False, True), (False, False)]


def bn_model(center, scale, momentum=0.9, eps=1e-3, **init):
    model = nn.Sequential(
        [
            nn.Dense(6, input_dim=4),
            nn.BatchNormalization(momentum=momentum, epsilon=eps, center=center, scale=scale, **init),
            nn.Activation("relu"),
            nn.Dense(2),
        ],
        dtype="float64",
        seed=0,
    )
    model.compile(nn.optimizers.SGD(LR, momentum=0.9), "mse")
    return model


def split_bn(weights, center, scale):
    """Keras-order weights -> (k0, b0, gamma|None, beta|None, moving_mean, moving_variance, k1, b1)."""
    it = iter(weights)
    k0, b0 = next(it), next(it)
    gamma = next(it) if scale else None
    beta = next(it) if center else None
    mm, mv, k1, b1 = it
    return k0, b0, gamma, beta, mm, mv, k1, b1


@pytest.mark.parametrize("center, scale", AFFINE)
def test_batch_norm_weights_follow_center_and_scale(center, scale):
    model = bn_model(center, scale)
    bn = model.layers[1]
    names = [w.name for w in bn.weights]
    want = [n for n, keep in (("gamma", scale), ("beta", center), ("moving_mean", True), ("moving_variance", True)) if keep]
    assert names == [f"batch_normalization/{n}" for n in want]
    assert len(model.get_weights()) == 4 + len(want)
    trainable = {n.split("/")[-1] for n in model.trainable_weights_names if n.startswith("batch_normalization/")}
    assert trainable == {n for n in ("gamma", "beta") if n in want}


@pytest.mark.parametrize("center, scale", AFFINE)
def test_batch_norm_step_and_inference_match_torch(center, scale):
    momentum, eps = 0.9, 1e-3
    model = bn_model(center, scale, momentum, eps)
    rng = np.random.default_rng(5)
    k0, b0, _, _, mm, mv, k1, b1 = split_bn(model.get_weights(), center, scale)
    gamma, beta = 1 + 0.2 * rng.standard_normal(6), 0.2 * rng.standard_normal(6)
    model.set_weights([k0, b0] + ([gamma] if scale else []) + ([beta] if center else []) + [mm, mv, k1, b1])

    l0, l1 = linear(k0, b0), linear(k1, b1)
    bn = torch.nn.BatchNorm1d(6, eps=eps, momentum=1 - momentum, affine=center or scale, dtype=torch.float64)
    if center or scale:
        with torch.no_grad():  # a dropped gamma is 1, a dropped beta 0, and neither trains
            bn.weight.copy_(torch.tensor(gamma if scale else np.ones(6)))
            bn.bias.copy_(torch.tensor(beta if center else np.zeros(6)))
        bn.weight.requires_grad_(scale)
        bn.bias.requires_grad_(center)
    params = [*l0.parameters(), *[p for p in bn.parameters() if p.requires_grad], *l1.parameters()]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    x, y = data(n=10), targets(n=10)
    pre = l0(torch.tensor(x))
    total = F.mse_loss(l1(torch.relu(bn(pre))), torch.tensor(y))
    total.backward()
    opt.step()

    assert_close(model.train_on_batch(x, y), total.item())
    k0n, b0n, gn, bn_, mmn, mvn, k1n, b1n = split_bn(model.get_weights(), center, scale)
    assert_close(k0n, host(l0.weight).T)
    assert_close(b0n, host(l0.bias))
    assert_close(k1n, host(l1.weight).T)
    assert_close(b1n, host(l1.bias))
    if scale:
        assert_close(gn, host(bn.weight))
    if center:
        assert_close(bn_, host(bn.bias))
    assert_close(mmn, bn.running_mean.numpy())
    batch = host(pre)  # Keras's moving variance uses the biased batch variance, torch the unbiased
    assert_close(mvn, momentum * mv + (1 - momentum) * batch.var(axis=0))

    bn.eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor(mvn))
        xt = data(n=5, seed=9)
        want = l1(torch.relu(bn(l0(torch.tensor(xt)))))
    assert_close(model.predict(xt), host(want))


def test_batch_norm_without_center_and_scale_is_torchs_affine_false():
    model = bn_model(center=False, scale=False)
    k0, b0, mm, mv, k1, b1 = model.get_weights()
    rng = np.random.default_rng(2)
    mm, mv = 0.3 * rng.standard_normal(6), rng.uniform(0.5, 2.0, 6)
    model.set_weights([k0, b0, mm, mv, k1, b1])
    bn = torch.nn.BatchNorm1d(6, eps=1e-3, affine=False, dtype=torch.float64).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(mm))
        bn.running_var.copy_(torch.tensor(mv))
        want = linear(k1, b1)(torch.relu(bn(linear(k0, b0)(torch.tensor(data())))))
    assert_close(model.predict(data()), host(want))


def test_batch_norm_initializers_set_the_starting_weights():
    model = bn_model(True, True, gamma_initializer="zeros", beta_initializer="ones",
                     moving_mean_initializer=np.arange(6.0), moving_variance_initializer="ones")
    _, _, gamma, beta, mm, mv, _, _ = model.get_weights()
    np.testing.assert_array_equal(gamma, np.zeros(6))
    np.testing.assert_array_equal(beta, np.ones(6))
    np.testing.assert_array_equal(mm, np.arange(6.0))
    np.testing.assert_array_equal(mv, np.ones(6))


@pytest.mark.parametrize("center, scale", AFFINE)
def test_batch_norm_without_center_or_scale_saves_and_loads(tmp_path, center, scale):
    model = bn_model(center, scale)
    model.fit(data(n=16), targets(n=16), batch_size=4, epochs=2, verbose=0)
    model.save(tmp_path / "bn.npz")
    loaded = nn.load_model(tmp_path / "bn.npz")
    cfg = loaded.get_config()["layers"][1]
    assert (cfg["center"], cfg["scale"]) == (center, scale)
    assert len(loaded.get_weights()) == len(model.get_weights())
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(data()), model.predict(data()))
    loaded.fit(data(n=16), targets(n=16), batch_size=4, epochs=1, verbose=0)  # and keeps training


# ---- Dense(bias_regularizer=) ---------------------------------------------------------------------------
@pytest.mark.parametrize("reg", [nn.regularizers.L2(0.05), nn.regularizers.L1(0.03)], ids=["l2", "l1"])
def test_bias_regularizer_adds_its_penalty_to_the_loss_and_the_gradient(reg):
    model = two_dense("tanh", bias_regularizer=reg, kernel_regularizer=nn.regularizers.L2(0.01))

    def penalty(l0, l1):
        size = (lambda b: reg.l2 * (b**2).sum()) if isinstance(reg, nn.regularizers.L2) else (lambda b: reg.l1 * b.abs().sum())
        return 0.01 * (l0.weight**2).sum() + size(l0.bias) + size(l1.bias)

    k0, b0, k1, b1 = model.get_weights()
    x, y = data(), targets()
    with torch.no_grad():
        l0, l1 = linear(k0, b0), linear(k1, b1)
        want = F.mse_loss(l1(torch.tanh(l0(torch.tensor(x)))), torch.tensor(y)) + penalty(l0, l1)
    assert_close(model.evaluate(x, y), want.item())
    step_both(model, torch.tanh, penalty=penalty, x=x, y=y)


def test_bias_regularizer_is_saved(tmp_path):
    model = two_dense("relu", bias_regularizer=nn.regularizers.L1(0.02))
    model.save(tmp_path / "m.npz")
    loaded = nn.load_model(tmp_path / "m.npz")
    assert loaded.layers[0].bias_regularizer == nn.regularizers.L1(0.02)
    assert loaded.evaluate(data(), targets()) == model.evaluate(data(), targets())


def test_without_a_bias_there_is_nothing_to_regularize():
    model = nn.Sequential([nn.Dense(2, input_dim=4, use_bias=False, bias_regularizer=nn.regularizers.L2(1.0))], dtype="float64")
    model.compile("sgd", "mse")
    assert model.layers[0].penalties == []


# ---- LeakyReLU with a slope ------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_leaky_relu_activation_matches_torch(alpha):
    model = two_dense(nn.activations.LeakyReLU(alpha))
    k0, b0, k1, b1 = model.get_weights()
    x = data()
    with torch.no_grad():
        want = linear(k1, b1)(F.leaky_relu(linear(k0, b0)(torch.tensor(x)), alpha))
    assert_close(model.predict(x), host(want))
    step_both(model, lambda t: F.leaky_relu(t, alpha))


def test_leaky_relu_defaults_follow_keras():
    assert nn.activations.LeakyReLU().alpha == 0.3  # the layer's default
    assert inspect.signature(nn.activations.leaky_relu).parameters["alpha"].default == 0.2  # the function's
    by_name = two_dense("leaky_relu")
    step_both(by_name, lambda t: F.leaky_relu(t, 0.2))


def test_leaky_relu_function_with_a_slope_in_a_callable_and_as_a_layer():
    fn = two_dense(lambda x: nn.activations.leaky_relu(x, alpha=0.05))
    step_both(fn, lambda t: F.leaky_relu(t, 0.05))
    layer = nn.Sequential([nn.Activation(nn.activations.LeakyReLU(0.25), input_dim=3)], dtype="float64")
    x = np.array([[-2.0, 0.0, 3.0]])
    assert_close(layer.predict(x), [[-0.5, 0.0, 3.0]])


def test_leaky_relu_slope_survives_save_and_load(tmp_path):
    model = two_dense(nn.activations.LeakyReLU(0.07))
    model.save(tmp_path / "m.npz")
    loaded = nn.load_model(tmp_path / "m.npz")
    assert loaded.layers[0].activation == nn.activations.LeakyReLU(0.07)
    np.testing.assert_array_equal(loaded.predict(data()), model.predict(data()))


def test_leaky_relu_rejects_a_slope_that_is_not_a_number():
    with pytest.raises(ValueError, match="alpha must be a number"):
        nn.activations.LeakyReLU("0.1")


# ---- step and sign ---------------------------------------------------------------------------------------
def perceptron(activation):
    """One Dense unit per input column, kernel = identity: the output is the input."""
    model = nn.Sequential([nn.Dense(3, activation=activation, input_dim=3, kernel_initializer=np.eye(3))], dtype="float64")
    model.compile(nn.optimizers.SGD(LR), "mse")
    return model


def test_step_is_1_above_0_and_0_otherwise():
    x = np.array([[-1.5, 0.0, 2.0], [0.0, 1e-300, -0.0]])
    np.testing.assert_array_equal(perceptron("step").predict(x), [[0, 0, 1], [0, 1, 0]])


def test_sign_maps_0_to_minus_1_unlike_numpy():
    x = np.array([[-1.5, 0.0, 2.0], [0.0, 1e-300, -0.0]])
    got = perceptron("sign").predict(x)
    np.testing.assert_array_equal(got, [[-1, -1, 1], [-1, 1, -1]])
    assert np.sign(0.0) == 0 and got[0, 1] == -1
    assert "np.sign" in nn.activations.sign.__doc__


@pytest.mark.parametrize("activation", ["step", "sign"])
def test_training_through_step_or_sign_runs_with_zero_gradient(activation):
    """Their gradient is 0: a head of them learns nothing, a hidden layer of them
    passes nothing back, and neither crashes."""
    head = perceptron(activation)
    before = head.get_weights()
    history = head.fit(data(n=6, features=3), targets(n=6, out=3), batch_size=3, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for a, b in zip(head.get_weights(), before):
        np.testing.assert_array_equal(a, b)

    hidden = two_dense(activation)
    k0, b0, k1, b1 = hidden.get_weights()
    hidden.fit(data(), targets(), epochs=2, verbose=0)
    k0n, b0n, k1n, _ = hidden.get_weights()
    np.testing.assert_array_equal(k0n, k0)
    np.testing.assert_array_equal(b0n, b0)
    assert not np.array_equal(k1n, k1)  # the linear head above still learns


def test_step_and_sign_are_saved_by_name(tmp_path):
    model = two_dense("sign")
    model.save(tmp_path / "m.npz")
    assert nn.load_model(tmp_path / "m.npz").get_config()["layers"][0]["activation"] == "sign"


# ---- callable activations --------------------------------------------------------------------------------
def swish(x):
    return x * x.graph.sigmoid(x)


@pytest.mark.parametrize(
    "ours, theirs",
    [(lambda x: x * 2.0, lambda t: t * 2.0), (swish, F.silu), (nn.activations.tanh, torch.tanh)],
    ids=["lambda", "graph_ops", "builtin_function"],
)
def test_callable_activation_matches_torch(ours, theirs):
    model = two_dense(ours)
    k0, b0, k1, b1 = model.get_weights()
    x = data()
    with torch.no_grad():
        want = linear(k1, b1)(theirs(linear(k0, b0)(torch.tensor(x))))
    assert_close(model.predict(x), host(want))
    step_both(model, theirs)


def test_builtin_activation_functions_are_saved_by_name(tmp_path):
    model = two_dense(nn.activations.relu)
    model.save(tmp_path / "m.npz")
    assert nn.load_model(tmp_path / "m.npz").get_config()["layers"][0]["activation"] == "relu"


def test_a_callable_activation_cannot_be_saved_and_says_why(tmp_path):
    model = two_dense(swish)
    with pytest.raises(ValueError, match=r"layer 'dense'.*'.*swish' is a Python callable.*in this process only"):
        model.save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="swish"):
        model.get_config()


def test_a_callable_activation_is_not_sent_to_a_cluster(monkeypatch, tmp_path):
    monkeypatch.setenv("PSTRAIN_CACHE", str(tmp_path))
    model = nn.Sequential([nn.Dense(3, activation=swish, input_dim=4)], dtype="float64")
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="swish.*in this process only"):
        model.fit(data(), np.zeros(8, np.int64), cluster="127.0.0.1:1", verbose=0)


def test_a_callable_activation_must_return_a_tensor_of_the_same_shape():
    with pytest.raises(TypeError, match=r"layer 'dense'.*returned float.*graph tensor"):
        nn.Sequential([nn.Dense(3, activation=lambda x: 1.0)]).predict(data())
    with pytest.raises(ValueError, match=r"layer 'dense'.*keep shape and dtype"):
        nn.Sequential([nn.Dense(3, activation=lambda x: x.graph.reduce_sum(x, axis=-1))]).predict(data())


def test_an_activation_that_is_neither_a_name_nor_a_callable():
    with pytest.raises(ValueError, match=r"Dense\(3\): activation must be a name.*or a callable"):
        nn.Dense(3, activation=3)


# ---- callable losses -----------------------------------------------------------------------------------
def per_example_mse(y_true, y_pred):
    g = y_pred.graph
    return g.reduce_mean(g.square(y_pred - y_true), axis=-1)


def scalar_mse(y_true, y_pred):
    g = y_pred.graph
    return g.reduce_mean(g.square(y_pred - y_true))


def huber(y_true, y_pred):  # |d| <= 1: d^2/2, else |d| - 1/2 (torch's huber_loss with delta 1)
    g = y_pred.graph
    a = g.abs(y_pred - y_true)
    q = g.sub(a, g.relu(g.sub(a, 1.0)))  # min(|d|, 1)
    return g.reduce_mean(q * q * 0.5 + g.relu(g.sub(a, 1.0)), axis=-1)


@pytest.mark.parametrize(
    "ours, theirs",
    [(per_example_mse, F.mse_loss), (scalar_mse, F.mse_loss), (huber, F.huber_loss)],
    ids=["per_example", "scalar", "huber"],
)
def test_callable_loss_matches_torch(ours, theirs):
    model = two_dense("relu", loss=ours)
    x, y = data(), 3 * targets()  # big enough targets that huber has both branches
    k0, b0, k1, b1 = model.get_weights()
    with torch.no_grad():
        want = theirs(linear(k1, b1)(torch.relu(linear(k0, b0)(torch.tensor(x)))), torch.tensor(y))
    assert_close(model.evaluate(x, y), want.item())
    step_both(model, torch.relu, torch_loss=theirs, x=x, y=y)


def test_a_callable_mse_trains_exactly_as_the_named_one():
    a, b = two_dense("relu", loss=per_example_mse), two_dense("relu", loss="mse")
    a.fit(data(n=16), targets(n=16), batch_size=4, epochs=3, verbose=0)
    b.fit(data(n=16), targets(n=16), batch_size=4, epochs=3, verbose=0)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        assert_close(wa, wb)


def test_callable_loss_with_accuracy_uses_kerass_rule_by_shape():
    model = nn.Sequential([nn.Dense(3, activation="softmax", input_dim=4)], dtype="float64", seed=0)
    model.compile(nn.optimizers.SGD(LR), loss=per_example_mse, metrics=["accuracy"])
    x = data()
    y = np.eye(3)[np.random.default_rng(0).integers(0, 3, 8)]
    loss, accuracy = model.evaluate(x, y)
    assert accuracy == np.mean(np.argmax(model.predict(x), -1) == np.argmax(y, -1))


def test_a_callable_loss_cannot_be_saved_and_says_why(tmp_path):
    model = two_dense("relu", loss=huber)
    with pytest.raises(ValueError, match=r"loss '.*huber' is a Python callable.*in this process only"):
        model.save(tmp_path / "m.npz")


def test_a_callable_loss_must_return_a_float_tensor_per_example_or_scalar():
    model = two_dense("relu")
    with pytest.raises(TypeError, match=r"loss '.*<lambda>' returned float.*graph tensor"):
        model.compile("sgd", lambda y_true, y_pred: 0.0)
    with pytest.raises(ValueError, match=r"returned shape \(2,\).*one loss per example"):
        model.compile("sgd", lambda y_true, y_pred: y_pred.graph.reduce_mean(y_pred - y_true, axis=0))
    assert model.get_config()["compile"]["loss"] == "mse"  # a loss that fails leaves the model as it was
    model.evaluate(data(), targets())


def test_labels_of_the_wrong_shape_for_a_callable_loss_are_named():
    model = two_dense("relu", loss=scalar_mse)
    with pytest.raises(ValueError, match=r"labels have shape \(8, 3\).*needs \(batch, 2\)"):
        model.fit(data(), targets(out=3), verbose=0)
