"""The Keras-style API (client.nn): building, weights, saving, fit/evaluate/predict,
progress output, shuffling, determinism, convergence and error messages.

Numerical agreement with PyTorch lives in test_nn_torch.py; these tests check
behaviour a Keras user relies on, on small data so the file runs in seconds.
"""
from __future__ import annotations

import numpy as np
import pytest

from client import datasets, nn

N_FEATURES, N_CLASSES = 5, 3


# ---- helpers -------------------------------------------------------------------------------------------
def toy_data(n=40, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return rng.random((n, N_FEATURES)).astype(dtype), rng.integers(0, N_CLASSES, n)


def mlp(seed=0, input_dim=N_FEATURES, dtype="float32", metrics=("accuracy",), optimizer=None, dropout=0.0):
    layers = [nn.Dense(8, activation="relu", input_dim=input_dim)]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Dense(N_CLASSES, activation="softmax"))
    model = nn.Sequential(layers, dtype=dtype, seed=seed)
    model.compile(optimizer or nn.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", metrics=list(metrics))
    return model


@pytest.fixture(scope="module")
def synthetic_small():
    ds = datasets.load("synthetic")
    return ds.x_train[:256], ds.y_train[:256], ds.x_test[:256], ds.y_test[:256], ds.num_classes


# ---- building -----------------------------------------------------------------------------------------
def test_input_dim_builds_at_compile():
    model = mlp()
    assert model.built
    assert [w.shape for w in model.get_weights()] == [(N_FEATURES, 8), (8,), (8, N_CLASSES), (N_CLASSES,)]


def test_input_shape_is_the_same_as_input_dim():
    a = mlp(seed=3)
    b = nn.Sequential([nn.Dense(8, activation="relu", input_shape=(N_FEATURES,)), nn.Dense(N_CLASSES, activation="softmax")], seed=3)
    b.compile(nn.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    assert b.built
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_model_without_input_shape_builds_at_first_fit():
    model = nn.Sequential([nn.Dense(8, activation="relu"), nn.Dense(N_CLASSES, activation="softmax")], seed=0)
    model.compile("sgd", "sparse_categorical_crossentropy")
    assert not model.built
    x, y = toy_data()
    model.fit(x, y, epochs=1, verbose=0)
    assert model.built
    assert [w.shape for w in model.get_weights()] == [(N_FEATURES, 8), (8,), (8, N_CLASSES), (N_CLASSES,)]


def test_get_weights_before_build_says_the_model_is_not_built():
    model = nn.Sequential([nn.Dense(8), nn.Dense(N_CLASSES)], seed=0)
    model.compile("sgd", "mse")
    with pytest.raises(RuntimeError, match="not built"):
        model.get_weights()


def test_set_weights_before_build_says_the_model_is_not_built():
    model = nn.Sequential([nn.Dense(8), nn.Dense(N_CLASSES)], seed=0)
    model.compile("sgd", "mse")
    with pytest.raises(RuntimeError, match="not built"):
        model.set_weights([])


def test_layer_names_are_unique_per_kind():
    model = nn.Sequential(
        [nn.Dense(8, input_dim=4), nn.Dropout(0.1), nn.Dense(8), nn.BatchNormalization(), nn.Dropout(0.2), nn.Dense(2)]
    )
    assert [l.name for l in model.layers] == ["dense", "dropout", "dense_1", "batch_normalization", "dropout_1", "dense_2"]


def test_duplicate_layer_names_are_rejected():
    with pytest.raises(ValueError, match="'a'.*unique"):
        nn.Sequential([nn.Dense(3, name="a"), nn.Dense(3, name="a")])


def test_fit_before_compile_says_to_compile():
    model = nn.Sequential([nn.Dense(3, input_dim=N_FEATURES)])
    x, y = toy_data()
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(x, y, verbose=0)


# ---- weights ------------------------------------------------------------------------------------------------
def test_get_weights_is_keras_order_and_returns_copies():
    model = nn.Sequential(
        [nn.Dense(6, input_dim=4), nn.BatchNormalization(), nn.Dense(2, use_bias=False)], dtype="float64", seed=0
    )
    model.compile("sgd", "mse")
    w = model.get_weights()
    # Dense: kernel (in, out), bias; BN: gamma, beta, moving_mean, moving_variance
    assert [a.shape for a in w] == [(4, 6), (6,), (6,), (6,), (6,), (6,), (6, 2)]
    np.testing.assert_array_equal(w[1], 0)  # bias_initializer="zeros"
    np.testing.assert_array_equal(w[2], 1)
    np.testing.assert_array_equal(w[3], 0)
    np.testing.assert_array_equal(w[4], 0)
    np.testing.assert_array_equal(w[5], 1)
    assert all(a.dtype == np.float64 for a in w)
    w[0][...] = 123.0  # a copy: the model is unchanged
    assert not np.any(model.get_weights()[0] == 123.0)


def test_set_weights_round_trip_changes_predictions():
    model = mlp()
    x, _ = toy_data()
    new = [np.random.default_rng(i).standard_normal(w.shape).astype(np.float32) for i, w in enumerate(model.get_weights())]
    model.set_weights(new)
    for a, b in zip(model.get_weights(), new):
        np.testing.assert_array_equal(a, b)
    k0, b0, k1, b1 = new
    h = np.maximum(x @ k0 + b0, 0) @ k1 + b1
    want = np.exp(h - h.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(model.predict(x), want, rtol=1e-5, atol=1e-6)


def test_set_weights_rejects_wrong_count_and_shape():
    model = mlp()
    w = model.get_weights()
    with pytest.raises(ValueError, match="3 arrays.*has 4"):
        model.set_weights(w[:-1])
    with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(5, 8\), got \(8, 5\)"):
        model.set_weights([a.T for a in w])


def test_array_initializers_are_used_as_is():
    k = np.arange(6, dtype=np.float64).reshape(3, 2)
    model = nn.Sequential([nn.Dense(2, input_dim=3, kernel_initializer=k, bias_initializer=np.array([1.0, -1.0]))])
    model.compile("sgd", "mse")
    np.testing.assert_array_equal(model.get_weights()[0], k)
    np.testing.assert_array_equal(model.get_weights()[1], [1.0, -1.0])


# ---- save / load --------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = nn.Sequential(
        [
            nn.Dense(8, activation="tanh", input_dim=N_FEATURES, kernel_regularizer=nn.regularizers.L2(1e-3)),
            nn.Dropout(0.3),
            nn.BatchNormalization(),
            nn.Dense(N_CLASSES, activation="softmax"),
        ],
        seed=4,
    )
    model.compile(nn.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    w = model.get_weights()
    rng = np.random.default_rng(1)
    w[4] = rng.uniform(-0.5, 0.5, 8).astype(np.float32)  # non-default moving statistics travel too
    w[5] = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    model.set_weights(w)
    x, y = toy_data()
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = nn.load_model(path)
    assert [l.name for l in loaded.layers] == [l.name for l in model.layers]
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert loaded.evaluate(x, y) == model.evaluate(x, y)
    assert loaded.get_config()["compile"] == model.get_config()["compile"]


def test_save_load_of_a_model_built_at_fit_then_keeps_training(tmp_path):
    model = nn.Sequential([nn.Dense(8, activation="relu"), nn.Dense(N_CLASSES, activation="softmax")], seed=0)
    model.compile(nn.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = toy_data()
    model.fit(x, y, epochs=2, verbose=0)
    model.save(tmp_path / "m.npz")
    loaded = nn.load_model(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    before = loaded.evaluate(x, y)[0]
    loaded.fit(x, y, epochs=3, verbose=0)
    assert loaded.evaluate(x, y)[0] < before


def test_load_model_rejects_other_files(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a pstrain model"):
        nn.load_model(path)


# ---- fit, History and progress output ----------------------------------------------------------------
def test_fit_returns_history_per_epoch():
    x, y = toy_data(64)
    xv, yv = toy_data(20, seed=1)
    model = mlp()
    h = model.fit(x, y, batch_size=16, epochs=3, validation_data=(xv, yv), verbose=0)
    assert isinstance(h, nn.History)
    assert set(h.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 3 for v in h.history.values())
    assert h.epoch == [0, 1, 2]
    assert all(0.0 <= a <= 1.0 for a in h.history["accuracy"] + h.history["val_accuracy"])
    val_loss, val_acc = model.evaluate(xv, yv)
    assert h.history["val_loss"][-1] == pytest.approx(val_loss, rel=1e-5)
    assert h.history["val_accuracy"][-1] == pytest.approx(val_acc)


def test_history_without_metrics_or_validation_has_only_loss():
    x, y = toy_data()
    h = mlp(metrics=()).fit(x, y, epochs=2, verbose=0)
    assert list(h.history) == ["loss"] and len(h.history["loss"]) == 2


def test_batch_gd_history_loss_is_the_loss_before_each_update():
    """With batch_size=len(x) an epoch is one step, so history["loss"][0] is the loss of
    the initial weights (the loss train_on_batch reports is before its update)."""
    x, y = toy_data(dtype="float64")
    model = mlp(dtype="float64")
    initial = model.evaluate(x, y)[0]
    h = model.fit(x, y, batch_size=len(x), epochs=2, verbose=0)
    assert h.history["loss"][0] == pytest.approx(initial, rel=1e-12)


def test_fit_verbose_0_prints_nothing(capsys):
    x, y = toy_data()
    mlp().fit(x, y, epochs=2, validation_data=(x, y), verbose=0)
    assert capsys.readouterr().out == ""


def test_fit_verbose_2_prints_one_line_per_epoch(capsys):
    x, y = toy_data()
    mlp().fit(x, y, batch_size=16, epochs=3, verbose=2)
    lines = capsys.readouterr().out.splitlines()
    headers = [l for l in lines if l.startswith("Epoch ")]
    rows = [l for l in lines if not l.startswith("Epoch ")]
    assert headers == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert len(rows) == 3
    assert all(r.startswith("3/3 - ") and "loss: " in r and "accuracy: " in r and "[" not in r for r in rows)


def test_fit_verbose_1_prints_a_bar_ending_in_the_final_line(capsys):
    x, y = toy_data()
    mlp().fit(x, y, batch_size=16, epochs=2, validation_data=(x, y), verbose=1)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Epoch 1/2" and "Epoch 2/2" in lines
    last = lines[-1]
    assert last.startswith("3/3 [" + "=" * 30 + "]")
    for key in ("loss: ", "accuracy: ", "val_loss: ", "val_accuracy: "):
        assert key in last
    assert out.endswith("\n")


def test_evaluate_prints_only_when_verbose(capsys):
    x, y = toy_data()
    model = mlp()
    model.evaluate(x, y)
    assert capsys.readouterr().out == ""
    model.evaluate(x, y, verbose=1)
    assert "loss: " in capsys.readouterr().out


def test_fit_reshuffles_every_epoch():
    """Rows are tagged by their index in feature 0; record the order fit feeds them."""
    n = 24
    x = np.zeros((n, N_FEATURES), np.float32)
    x[:, 0] = np.arange(n)
    y = np.zeros(n, np.int64)

    def orders(shuffle):
        model = mlp(optimizer=nn.optimizers.SGD(1e-6))
        seen = []
        train_batch = model._train_batch
        model._train_batch = lambda xb, yb: (seen.extend(xb[:, 0].astype(int)), train_batch(xb, yb))[1]
        model.fit(x, y, batch_size=5, epochs=3, shuffle=shuffle, verbose=0)
        return [seen[e * n : (e + 1) * n] for e in range(3)]

    for order in orders(shuffle=False):
        assert order == list(range(n))
    shuffled = orders(shuffle=True)
    for order in shuffled:
        assert sorted(order) == list(range(n))  # each epoch sees every example once
        assert order != list(range(n))
    assert shuffled[0] != shuffled[1] != shuffled[2]
    assert orders(shuffle=True) == shuffled  # the seed fixes the shuffles


def test_shuffle_changes_stochastic_training():
    x, y = toy_data()
    a, b = mlp(), mlp()
    a.fit(x, y, batch_size=1, epochs=1, shuffle=True, verbose=0)
    b.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0)
    assert not np.array_equal(a.get_weights()[0], b.get_weights()[0])


@pytest.mark.parametrize("batch_size", ["full", 1, 16], ids=["batch", "stochastic", "mini_batch"])
def test_gradient_descent_variants_reduce_loss(synthetic_small, batch_size):
    x, y, _, _, classes = synthetic_small
    bs = len(x) if batch_size == "full" else batch_size
    model = nn.Sequential([nn.Dense(16, activation="relu", input_dim=x.shape[1]), nn.Dense(classes, activation="softmax")], seed=0)
    lr, momentum, epochs = {"full": (0.5, 0.9, 20), 1: (0.01, 0.0, 3), 16: (0.1, 0.9, 5)}[batch_size]
    model.compile(nn.optimizers.SGD(lr, momentum=momentum), "sparse_categorical_crossentropy", metrics=["accuracy"])
    before = model.evaluate(x, y)[0]
    h = model.fit(x, y, batch_size=bs, epochs=epochs, verbose=0)
    after, acc = model.evaluate(x, y)
    assert after < 0.5 * before and acc > 0.9
    assert h.history["loss"][-1] < h.history["loss"][0]


def test_digits_reaches_90_percent_test_accuracy():
    ds = datasets.load("digits")
    model = nn.Sequential([nn.Dense(64, activation="relu", input_dim=64), nn.Dense(10, activation="softmax")], seed=0)
    model.compile(nn.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    h = model.fit(ds.x_train, ds.y_train, batch_size=32, epochs=4, validation_data=(ds.x_test, ds.y_test), verbose=0)
    loss, acc = model.evaluate(ds.x_test, ds.y_test)
    assert acc > 0.9, h.history
    assert h.history["val_accuracy"][-1] == pytest.approx(acc)


# ---- train_on_batch / evaluate / predict ---------------------------------------------------------------
def test_train_on_batch_returns_loss_and_accuracy_before_the_update():
    x, y = toy_data(dtype="float64")
    model = mlp(dtype="float64")
    loss0, acc0 = model.evaluate(x, y)
    want_acc = np.mean(np.argmax(model.predict(x), axis=1) == y)
    loss, acc = model.train_on_batch(x, y)
    assert loss == pytest.approx(loss0, rel=1e-12)
    assert acc == pytest.approx(want_acc) == pytest.approx(acc0)
    assert model.evaluate(x, y)[0] != loss0  # the step changed the weights


def test_train_on_batch_without_metrics_returns_a_float():
    x, y = toy_data()
    loss = mlp(metrics=()).train_on_batch(x, y)
    assert isinstance(loss, float)


def test_predict_shapes_and_softmax_rows_sum_to_one():
    x, _ = toy_data(37)
    model = mlp()
    p = model.predict(x)
    assert p.shape == (37, N_CLASSES) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(p >= 0)
    np.testing.assert_allclose(model.predict(x, batch_size=8), p, rtol=1e-6)  # batching does not matter
    assert model.predict(x[:1]).shape == (1, N_CLASSES)


def test_predict_on_no_examples_returns_an_empty_array():
    x, _ = toy_data()
    assert mlp().predict(x[:0]).shape == (0, N_CLASSES)


def test_evaluate_returns_loss_and_accuracy():
    x, y = toy_data()
    model = mlp()
    res = model.evaluate(x, y)
    assert isinstance(res, list) and len(res) == 2
    loss, acc = res
    p = model.predict(x)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(len(y)), y])), rel=1e-5)
    assert acc == pytest.approx(np.mean(p.argmax(1) == y))
    assert model.evaluate(x, y, batch_size=7) == pytest.approx(res, rel=1e-5)
    assert model.evaluate(x, y, return_dict=True) == {"loss": loss, "accuracy": acc}
    assert isinstance(mlp(metrics=()).evaluate(x, y), float)


@pytest.mark.parametrize(
    "head, loss, units, make_y",
    [
        ("sigmoid", "binary_crossentropy", 1, lambda y: y % 2),
        ("softmax", "categorical_crossentropy", N_CLASSES, lambda y: np.eye(N_CLASSES)[y]),
        ("linear", "mse", 2, lambda y: np.stack([y, -y], 1).astype(float)),
        ("linear", "mae", 2, lambda y: np.stack([y, -y], 1).astype(float)),
    ],
)
def test_other_losses_train(head, loss, units, make_y):
    x, y = toy_data(64)
    y = make_y(y)
    model = nn.Sequential([nn.Dense(8, activation="tanh", input_dim=N_FEATURES), nn.Dense(units, activation=head)], seed=0)
    model.compile(nn.optimizers.Adam(0.02), loss, metrics=["accuracy"])
    before = model.evaluate(x, y)[0]
    model.fit(x, y, batch_size=16, epochs=10, verbose=0)
    assert model.evaluate(x, y)[0] < before
    assert model.predict(x).shape == (len(x), units)


# ---- determinism ---------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_weights_after_fit():
    x, y = toy_data(50)

    def trained(seed):
        model = mlp(seed=seed, dropout=0.25)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=True, verbose=0)
        return model.get_weights()

    a, b, c = trained(7), trained(7), trained(8)
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a[0], c[0])


# ---- errors ------------------------------------------------------------------------------------------------------
def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*relu"):
        nn.Dense(3, activation="swish")


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*mse"):
        mlp().compile("sgd", "hinge")


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'.*sgd"):
        mlp().compile("rmsprop", "mse")


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        mlp().compile("sgd", "mse", metrics=["auc"])


def test_optimizer_by_name_and_config():
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.compile({"name": "sgd", "learning_rate": 0.5, "momentum": 0.5}, "sparse_categorical_crossentropy")
    assert model.get_config()["compile"]["optimizer"] == {"name": "sgd", "learning_rate": 0.5, "momentum": 0.5}
    with pytest.raises(ValueError, match="learning_rate"):
        nn.optimizers.SGD(learning_rate=-1.0)


def test_dense_on_per_example_2d_input_needs_flatten():
    model = nn.Sequential([nn.Dense(N_CLASSES, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="layer 'dense'.*Flatten"):
        model.fit(np.zeros((4, 2, 3), np.float32), np.zeros(4, np.int64), verbose=0)
    flat = nn.Sequential([nn.Flatten(), nn.Dense(N_CLASSES, activation="softmax")])
    flat.compile("sgd", "sparse_categorical_crossentropy")
    flat.fit(np.zeros((4, 2, 3), np.float32), np.zeros(4, np.int64), verbose=0)
    assert flat.get_weights()[0].shape == (6, N_CLASSES)


def test_wrong_feature_count_at_fit_and_predict():
    model = mlp()
    x, y = toy_data()
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 5\), got \(40, 4\)"):
        model.fit(x[:, :4], y, verbose=0)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 5\)"):
        model.predict(x[:, :4])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        model.predict(x[0])


def test_x_y_length_mismatch():
    x, y = toy_data()
    with pytest.raises(ValueError, match="x has 40 examples but y has 39"):
        mlp().fit(x, y[:-1], verbose=0)
    with pytest.raises(ValueError, match="x has 40 examples but y has 39"):
        mlp().evaluate(x, y[:-1])


def test_non_integer_sparse_labels():
    x, y = toy_data()
    with pytest.raises(ValueError, match="integer class indices"):
        mlp().fit(x, y + 0.5, verbose=0)


def test_bad_fit_arguments():
    x, y = toy_data()
    with pytest.raises(ValueError, match="batch_size"):
        mlp().fit(x, y, batch_size=0, verbose=0)


def test_fit_on_a_cluster_that_is_down_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PSTRAIN_CACHE", str(tmp_path))
    x, y = toy_data()
    model = mlp()
    with pytest.raises(ConnectionError, match="cannot reach the pstrain master"):
        model.fit(x, y, cluster="127.0.0.1:1", verbose=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.Dense(0), "units"),
        (lambda: nn.Dropout(1.0), "rate"),
        (lambda: nn.BatchNormalization(momentum=1.5), "momentum"),
        (lambda: nn.Sequential([], dtype="float16"), "dtype"),
        (lambda: nn.regularizers.L2(-1.0), "l2"),
        (lambda: nn.Dense(3, input_dim=0), "input_dim"),
    ],
)
def test_invalid_layer_and_model_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
