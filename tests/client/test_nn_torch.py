"""The Keras-style API against PyTorch, in float64: one (or a few) training steps of
small models, comparing the loss and every weight afterwards.

Each test builds an ``nn.Sequential``, copies its initial weights into an equivalent
torch model (``Linear.weight = kernel.T``), runs the same step in both and compares.
Keras semantics on the pstrain side: the loss ``train_on_batch`` returns is the one
*before* the update and includes the penalties; L1/L2 apply to kernels only
(``l * sum(|w|)`` and ``l * sum(w**2)``).

The MLP cases run on the default ``cpu`` backend (Numba) and on the NumPy
``reference`` backend, so a failure says whether the math or a kernel is wrong.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client import nn
from graph.ops.nn import dropout_mask

RTOL, ATOL = 1e-10, 1e-12
SIZES = (20, 16, 8, 3)
BATCH = 12
LR = 0.1

# ---- helpers ------------------------------------------------------------------------------------------
def make_data(n=BATCH, seed=0, in_dim=SIZES[0]):
    return np.random.default_rng(seed).standard_normal((n, in_dim))


def labels_for(loss: str, n: int, seed: int = 1, out: int = SIZES[-1]):
    """(labels for pstrain, the same labels for torch)."""
    rng = np.random.default_rng(seed)
    if loss == "sparse_categorical_crossentropy":
        y = rng.integers(0, out, n)
        return y, torch.tensor(y)
    if loss == "categorical_crossentropy":
        y = np.eye(out)[rng.integers(0, out, n)]
        return y, torch.tensor(y)
    if loss == "binary_crossentropy":
        y = rng.integers(0, 2, (n, out)).astype(np.float64)
        return y, torch.tensor(y)
    y = rng.standard_normal((n, out))
    return y, torch.tensor(y)


def keras_mlp(head: str, reg=None, device="cpu", sizes=SIZES) -> nn.Sequential:
    layers = [nn.Dense(sizes[1], activation="relu", input_dim=sizes[0], kernel_regularizer=reg)]
    for u in sizes[2:-1]:
        layers.append(nn.Dense(u, activation="relu", kernel_regularizer=reg))
    layers.append(nn.Dense(sizes[-1], activation=head, kernel_regularizer=reg))
    return nn.Sequential(layers, dtype="float64", seed=0, device=device)


def torch_linears(weights: list[np.ndarray]) -> list[torch.nn.Linear]:
    """torch Linear layers holding Keras-order [kernel, bias, kernel, bias, ...]."""
    out = []
    for k, b in zip(weights[::2], weights[1::2]):
        lin = torch.nn.Linear(k.shape[0], k.shape[1], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(k.T))
            lin.bias.copy_(torch.tensor(b))
        out.append(lin)
    return out


def torch_forward(linears, x):
    """Logits of the head (pre-activation) of the relu MLP."""
    h = torch.tensor(x)
    for lin in linears[:-1]:
        h = torch.relu(lin(h))
    return linears[-1](h)


def torch_loss(loss: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss == "sparse_categorical_crossentropy":
        return F.cross_entropy(logits, y)
    if loss == "categorical_crossentropy":
        return -(y * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    if loss == "binary_crossentropy":
        return F.binary_cross_entropy_with_logits(logits, y)
    if loss == "mse":
        return F.mse_loss(logits, y)
    raise AssertionError(loss)


def torch_penalty(linears, reg) -> torch.Tensor:
    if reg is None:
        return torch.zeros((), dtype=torch.float64)
    if isinstance(reg, nn.regularizers.L2):
        return sum(reg.l2 * (lin.weight**2).sum() for lin in linears)
    return sum(reg.l1 * lin.weight.abs().sum() for lin in linears)


def torch_optimizer(opt, params):
    if isinstance(opt, nn.optimizers.SGD):
        return torch.optim.SGD(params, lr=opt.learning_rate, momentum=opt.momentum)
    return torch.optim.Adam(params, lr=opt.learning_rate, betas=(opt.beta_1, opt.beta_2), eps=opt.epsilon)


def keras_order(linears) -> list[np.ndarray]:
    out = []
    for lin in linears:
        out += [lin.weight.detach().numpy().T, lin.bias.detach().numpy()]
    return out


def assert_weights_close(got: list[np.ndarray], want: list[np.ndarray], rtol=RTOL, atol=ATOL):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"weight {i}: shape {a.shape} vs {b.shape}"
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"weight {i}")


def run_both(head, loss, optimizer, reg=None, steps=1, device="cpu"):
    """Train pstrain and torch side by side; returns (pstrain losses, torch losses,
    pstrain weights, torch weights, initial weights)."""
    model = keras_mlp(head, reg, device)
    model.compile(optimizer, loss)
    initial = model.get_weights()
    linears = torch_linears(initial)
    params = [p for lin in linears for p in (lin.weight, lin.bias)]
    topt = torch_optimizer(optimizer, params)
    ours, theirs = [], []
    for step in range(steps):
        x = make_data(seed=10 + step)
        y, ty = labels_for(loss, len(x), seed=20 + step)
        ours.append(model.train_on_batch(x, y))
        topt.zero_grad()
        total = torch_loss(loss, torch_forward(linears, x), ty) + torch_penalty(linears, reg)
        total.backward()
        topt.step()
        theirs.append(total.item())
    return ours, theirs, model.get_weights(), keras_order(linears), initial


# ---- MLP cases -----------------------------------------------------------------------------------------
CASES = {
    "sgd_momentum_l2_sparse": ("softmax", "sparse_categorical_crossentropy", lambda: nn.optimizers.SGD(LR, momentum=0.9), lambda: nn.regularizers.L2(0.01), 1),
    "adam_l2_sparse": ("softmax", "sparse_categorical_crossentropy", lambda: nn.optimizers.Adam(0.01), lambda: nn.regularizers.L2(0.01), 1),
    "sgd_mse_linear": ("linear", "mse", lambda: nn.optimizers.SGD(LR, momentum=0.9), lambda: None, 1),
    "sgd_bce_sigmoid": ("sigmoid", "binary_crossentropy", lambda: nn.optimizers.SGD(LR, momentum=0.9), lambda: None, 1),
    "sgd_cce_onehot": ("softmax", "categorical_crossentropy", lambda: nn.optimizers.SGD(LR, momentum=0.9), lambda: None, 1),
    "sgd_l1_sparse": ("softmax", "sparse_categorical_crossentropy", lambda: nn.optimizers.SGD(LR, momentum=0.9), lambda: nn.regularizers.L1(0.01), 1),
    "sgd_no_reg_sparse": ("softmax", "sparse_categorical_crossentropy", lambda: nn.optimizers.SGD(LR, momentum=0.9), lambda: None, 1),
    "adam_no_reg_mse": ("linear", "mse", lambda: nn.optimizers.Adam(0.01), lambda: None, 1),
    "sgd_momentum_l2_3_steps": ("softmax", "sparse_categorical_crossentropy", lambda: nn.optimizers.SGD(LR, momentum=0.9), lambda: nn.regularizers.L2(0.01), 3),
    "adam_l2_3_steps": ("softmax", "sparse_categorical_crossentropy", lambda: nn.optimizers.Adam(0.01), lambda: nn.regularizers.L2(0.01), 3),
    "sgd_bce_3_steps": ("sigmoid", "binary_crossentropy", lambda: nn.optimizers.SGD(LR, momentum=0.9), lambda: None, 3),
}


def _params():
    out = []
    for name, (head, loss, opt, reg, steps) in CASES.items():
        for device in ("cpu", "reference"):
            marks = []
            out.append(pytest.param(head, loss, opt, reg, steps, device, id=f"{name}-{device}", marks=marks))
    return out


@pytest.mark.parametrize("head, loss, opt, reg, steps, device", _params())
def test_mlp_steps_match_torch(head, loss, opt, reg, steps, device):
    ours, theirs, got, want, initial = run_both(head, loss, opt(), reg(), steps, device)
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL, err_msg="loss before each update")
    assert_weights_close(got, want)
    # the step really moved every weight (so the comparison is not vacuous)
    for i, (a, b) in enumerate(zip(got, initial)):
        assert not np.array_equal(a, b), f"weight {i} did not change"


@pytest.mark.parametrize("device", ["cpu", "reference"])
def test_loss_includes_l2_penalty_on_kernels_only(device):
    """evaluate (no update) = data loss + l2 * sum(kernel**2); biases are not penalized."""
    reg = nn.regularizers.L2(0.05)
    model = keras_mlp("softmax", reg, device)
    model.compile("sgd", "sparse_categorical_crossentropy")
    w = model.get_weights()
    w = [a if a.ndim == 2 else np.full_like(a, 0.3) for a in w]  # nonzero biases
    model.set_weights(w)
    x = make_data()
    y, ty = labels_for("sparse_categorical_crossentropy", len(x))
    linears = torch_linears(w)
    with torch.no_grad():
        want = torch_loss("sparse_categorical_crossentropy", torch_forward(linears, x), ty) + torch_penalty(linears, reg)
    np.testing.assert_allclose(model.evaluate(x, y), want.item(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("head, loss", [("softmax", "sparse_categorical_crossentropy"), ("sigmoid", "binary_crossentropy"), ("linear", "mse")])
def test_predict_matches_torch_forward(head, loss):
    model = keras_mlp(head)
    model.compile("sgd", loss)
    x = make_data(n=7)
    with torch.no_grad():
        logits = torch_forward(torch_linears(model.get_weights()), x)
        want = {"softmax": torch.softmax(logits, -1), "sigmoid": torch.sigmoid(logits), "linear": logits}[head]
    np.testing.assert_allclose(model.predict(x), want.numpy(), rtol=RTOL, atol=ATOL)


# ---- batch normalization ------------------------------------------------------------------------------
def test_batch_norm_inference_matches_torch():
    model = nn.Sequential(
        [nn.Dense(16, input_dim=20), nn.BatchNormalization(epsilon=1e-3), nn.Dense(3, activation="softmax")],
        dtype="float64",
        seed=0,
    )
    model.compile("sgd", "sparse_categorical_crossentropy")
    k0, b0, _, _, _, _, k1, b1 = model.get_weights()
    rng = np.random.default_rng(3)
    gamma, beta = 1 + 0.1 * rng.standard_normal(16), 0.1 * rng.standard_normal(16)
    mm, mv = 0.2 * rng.standard_normal(16), rng.uniform(0.5, 2.0, 16)
    model.set_weights([k0, b0, gamma, beta, mm, mv, k1, b1])
    lin0, lin1 = torch_linears([k0, b0, k1, b1])
    bn = torch.nn.BatchNorm1d(16, eps=1e-3, dtype=torch.float64).eval()
    with torch.no_grad():
        for t, v in ((bn.weight, gamma), (bn.bias, beta), (bn.running_mean, mm), (bn.running_var, mv)):
            t.copy_(torch.tensor(v))
        x = make_data(n=6)
        want = torch.softmax(lin1(bn(lin0(torch.tensor(x)))), -1).numpy()
    np.testing.assert_allclose(model.predict(x), want, rtol=RTOL, atol=ATOL)


def test_batch_norm_step_matches_torch():
    keras_momentum, eps = 0.9, 1e-3
    model = nn.Sequential(
        [
            nn.Dense(16, input_dim=20),
            nn.BatchNormalization(momentum=keras_momentum, epsilon=eps),
            nn.Activation("relu"),
            nn.Dense(3, activation="softmax"),
        ],
        dtype="float64",
        seed=0,
    )
    model.compile(nn.optimizers.SGD(LR, momentum=0.9), "sparse_categorical_crossentropy")
    k0, b0, gamma, beta, mm, mv, k1, b1 = model.get_weights()
    # non-trivial gamma/beta so their gradients flow through something other than 1 and 0
    rng = np.random.default_rng(5)
    gamma, beta = 1 + 0.1 * rng.standard_normal(16), 0.1 * rng.standard_normal(16)
    model.set_weights([k0, b0, gamma, beta, mm, mv, k1, b1])

    lin0, lin1 = torch_linears([k0, b0, k1, b1])
    bn = torch.nn.BatchNorm1d(16, eps=eps, momentum=1 - keras_momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
    params = [lin0.weight, lin0.bias, bn.weight, bn.bias, lin1.weight, lin1.bias]
    topt = torch.optim.SGD(params, lr=LR, momentum=0.9)

    x = make_data(n=BATCH)
    y, ty = labels_for("sparse_categorical_crossentropy", len(x))
    loss = model.train_on_batch(x, y)

    bn.train()
    pre = lin0(torch.tensor(x))
    total = F.cross_entropy(lin1(torch.relu(bn(pre))), ty)
    total.backward()
    topt.step()

    np.testing.assert_allclose(loss, total.item(), rtol=RTOL, atol=ATOL)
    k0n, b0n, gn, bn_, mmn, mvn, k1n, b1n = model.get_weights()
    assert_weights_close(
        [k0n, b0n, gn, bn_, k1n, b1n],
        [lin0.weight.detach().numpy().T, lin0.bias.detach().numpy(), bn.weight.detach().numpy(),
         bn.bias.detach().numpy(), lin1.weight.detach().numpy().T, lin1.bias.detach().numpy()],
    )
    # Moving mean: same rule in both. Moving variance: Keras uses the biased batch
    # variance, torch the unbiased one, so compare with the Keras rule by hand.
    np.testing.assert_allclose(mmn, bn.running_mean.numpy(), rtol=RTOL, atol=ATOL)
    batch = pre.detach().numpy()
    want_mv = keras_momentum * 1.0 + (1 - keras_momentum) * batch.var(axis=0)  # ddof=0
    np.testing.assert_allclose(mvn, want_mv, rtol=RTOL, atol=ATOL)
    unbiased = keras_momentum * 1.0 + (1 - keras_momentum) * batch.var(axis=0, ddof=1)
    assert not np.allclose(mvn, unbiased, rtol=1e-6, atol=0)

    # Inference normalizes with the moving statistics.
    bn.eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor(want_mv))
        xt = make_data(n=5, seed=99)
        want_pred = torch.softmax(lin1(torch.relu(bn(lin0(torch.tensor(xt))))), -1).numpy()
    np.testing.assert_allclose(model.predict(xt), want_pred, rtol=RTOL, atol=ATOL)


# ---- dropout ----------------------------------------------------------------------------------------------
def dropout_model(rate=0.5, seed=0):
    model = nn.Sequential(
        [nn.Dense(32, activation="relu", input_dim=20), nn.Dropout(rate, seed=123), nn.Dense(3, activation="softmax")],
        dtype="float64",
        seed=seed,
    )
    model.compile(nn.optimizers.SGD(LR, momentum=0.9), "sparse_categorical_crossentropy")
    return model


def test_dropout_is_identity_at_inference():
    model = dropout_model()
    x = make_data(n=9)
    y, ty = labels_for("sparse_categorical_crossentropy", len(x))
    p1, p2 = model.predict(x), model.predict(x)
    np.testing.assert_array_equal(p1, p2)
    linears = torch_linears(model.get_weights())
    with torch.no_grad():
        logits = torch_forward(linears, x)  # no dropout at all
    np.testing.assert_allclose(p1, torch.softmax(logits, -1).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(model.evaluate(x, y), F.cross_entropy(logits, ty).item(), rtol=RTOL, atol=ATOL)


def test_dropout_training_step_differs_from_eval_and_matches_torch_with_the_same_mask():
    model = dropout_model()
    x = make_data(n=BATCH)
    y, ty = labels_for("sparse_categorical_crossentropy", len(x))
    eval_loss = model.evaluate(x, y)
    initial = model.get_weights()
    train_loss = model.train_on_batch(x, y)  # step 0, same weights as eval_loss
    assert abs(train_loss - eval_loss) > 1e-6

    # Inverted dropout: the mask the graph uses for step 0 (0 or 1/(1-rate)).
    mask = dropout_mask((len(x), 32), np.float64, 0.5, 123, 0, run_seed=model.seed)
    assert set(np.unique(mask)) <= {0.0, 2.0} and 0 < np.mean(mask == 0) < 1
    lin0, lin1 = torch_linears(initial)
    topt = torch.optim.SGD([lin0.weight, lin0.bias, lin1.weight, lin1.bias], lr=LR, momentum=0.9)
    total = F.cross_entropy(lin1(torch.relu(lin0(torch.tensor(x))) * torch.tensor(mask)), ty)
    total.backward()
    topt.step()
    np.testing.assert_allclose(train_loss, total.item(), rtol=RTOL, atol=ATOL)
    assert_weights_close(model.get_weights(), keras_order([lin0, lin1]))


def test_dropout_masks_change_between_steps():
    model = dropout_model()
    x = make_data(n=BATCH)
    y, _ = labels_for("sparse_categorical_crossentropy", len(x))
    w = model.get_weights()
    first = model.train_on_batch(x, y)
    model.set_weights(w)  # same weights, next step: a new mask
    second = model.train_on_batch(x, y)
    assert first != second
