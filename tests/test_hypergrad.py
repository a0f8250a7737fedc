"""Every hypergradient in ``morphnas.hypergrad`` checked against brute force (DESIGN.md §3).

* ``unrolled`` against plain autograd *through* one explicit SGD step (create_graph=True).
* ``neumann``/``cg``/``exact`` against the closed-form implicit gradient of a ridge problem whose
  inner optimum ``w*(α)`` is a linear solve, so ``dL_val(w*(α))/dα`` is exact by autograd.
* ``top_eigenvalue`` (iDARTS's γλ_max check) against the dense Hessian's eigendecomposition.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor
from torch.func import hessian

from morphnas.hypergrad import (
    HVP_MODES,
    METHODS,
    Curvature,
    _flatten,
    _unflatten,
    hypergradient,
    top_eigenvalue,
)

DTYPE = torch.float64


def _rel_err(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> float:
    g = torch.cat([t.reshape(-1) for t in got])
    w = torch.cat([t.reshape(-1) for t in want])
    return float(torch.linalg.norm(g - w) / torch.linalg.norm(w))


# --------------------------------------------------------------------------- a tiny mixed-op net


class MixedNet:
    """Two-layer net whose hidden layer is a softmax(α)-weighted mix of three ops (a DARTS edge)."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x_t = torch.randn(16, 3, generator=gen, dtype=DTYPE)
        self.y_t = torch.randn(16, 1, generator=gen, dtype=DTYPE)
        self.x_v = torch.randn(12, 3, generator=gen, dtype=DTYPE)
        self.y_v = torch.randn(12, 1, generator=gen, dtype=DTYPE)
        self.weights = (
            0.5 * torch.randn(3, 4, generator=gen, dtype=DTYPE),
            0.5 * torch.randn(4, 1, generator=gen, dtype=DTYPE),
        )
        self.arch = (0.3 * torch.randn(3, generator=gen, dtype=DTYPE),)

    @staticmethod
    def _forward(weights: tuple[Tensor, ...], arch: tuple[Tensor, ...], x: Tensor) -> Tensor:
        w1, w2 = weights
        mix = torch.softmax(arch[0], dim=0)
        z = x @ w1
        hidden = mix[0] * torch.tanh(z) + mix[1] * z + mix[2] * torch.sigmoid(z)
        return hidden @ w2

    def train_loss(self, weights: tuple[Tensor, ...], arch: tuple[Tensor, ...]) -> Tensor:
        return torch.mean((self._forward(weights, arch, self.x_t) - self.y_t) ** 2)

    def val_loss(self, weights: tuple[Tensor, ...], arch: tuple[Tensor, ...]) -> Tensor:
        return torch.mean((self._forward(weights, arch, self.x_v) - self.y_v) ** 2)


def _autograd_through_sgd_step(net: MixedNet, lr: float) -> tuple[Tensor, ...]:
    """Brute force: build w' = w − lr ∇_w L_train with a graph and differentiate L_val(w') in α."""
    w = tuple(t.clone().requires_grad_(True) for t in net.weights)
    a = tuple(t.clone().requires_grad_(True) for t in net.arch)
    g = torch.autograd.grad(net.train_loss(w, a), w, create_graph=True)
    w_next = tuple(wi - lr * gi for wi, gi in zip(w, g, strict=True))
    return torch.autograd.grad(net.val_loss(w_next, a), a)


def test_first_order_equals_plain_autograd() -> None:
    net = MixedNet()
    a = tuple(t.clone().requires_grad_(True) for t in net.arch)
    want = torch.autograd.grad(net.val_loss(net.weights, a), a)
    got = hypergradient(
        net.train_loss, net.val_loss, net.weights, net.arch, method="first_order", lr=0.1
    )
    assert _rel_err(got, want) < 1e-12


@pytest.mark.parametrize(("hvp", "tol"), [("exact", 1e-4), ("finite", 1e-2)])
def test_unrolled_equals_autograd_through_one_sgd_step(hvp: str, tol: float) -> None:
    net = MixedNet()
    lr = 0.5
    want = _autograd_through_sgd_step(net, lr)
    got = hypergradient(
        net.train_loss, net.val_loss, net.weights, net.arch, method="unrolled", lr=lr, hvp=hvp
    )
    assert _rel_err(got, want) < tol
    # The implicit term must matter here, or the test could not tell second from first order
    # (the silent degradation of NeroLoh/darts-tensorflow#1).
    first = hypergradient(
        net.train_loss, net.val_loss, net.weights, net.arch, method="first_order", lr=lr
    )
    assert _rel_err(first, want) > 100 * tol


def test_unrolled_finite_uses_bracketed_denominator() -> None:
    """A ``/ 2.*eps`` port (NNI #3044) is off by a factor 4ε²; an explicit eps exposes it."""
    net = MixedNet()
    exact = hypergradient(
        net.train_loss, net.val_loss, net.weights, net.arch, method="unrolled", lr=0.5, hvp="exact"
    )
    finite = hypergradient(
        net.train_loss,
        net.val_loss,
        net.weights,
        net.arch,
        method="unrolled",
        lr=0.5,
        hvp="finite",
        eps=1e-4,
    )
    assert _rel_err(finite, exact) < 1e-6


# --------------------------------------------------------------------------- ridge regression


class Ridge:
    """L_train = ‖X_t w − y_t‖²/n + Σ exp(α_i) w_i², L_val = ‖X_v w − y_v‖²/n.

    ``w`` is split into two tensors so the tuple handling is exercised.
    """

    def __init__(self, d: int = 5, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.d = d
        self.x_t = torch.randn(40, d, generator=gen, dtype=DTYPE)
        self.y_t = torch.randn(40, generator=gen, dtype=DTYPE)
        self.x_v = torch.randn(30, d, generator=gen, dtype=DTYPE)
        self.y_v = torch.randn(30, generator=gen, dtype=DTYPE)
        self.arch = (0.5 * torch.randn(d, generator=gen, dtype=DTYPE),)

    @staticmethod
    def _w(weights: tuple[Tensor, ...]) -> Tensor:
        return torch.cat(weights)

    def _split(self, w: Tensor) -> tuple[Tensor, ...]:
        return (w[:2].clone(), w[2:].clone())

    def train_loss(self, weights: tuple[Tensor, ...], arch: tuple[Tensor, ...]) -> Tensor:
        w = self._w(weights)
        fit = torch.sum((self.x_t @ w - self.y_t) ** 2) / self.x_t.shape[0]
        return fit + torch.sum(torch.exp(arch[0]) * w**2)

    def val_loss(self, weights: tuple[Tensor, ...], arch: tuple[Tensor, ...]) -> Tensor:
        w = self._w(weights)
        return torch.sum((self.x_v @ w - self.y_v) ** 2) / self.x_v.shape[0]

    def w_star(self, alpha: Tensor) -> Tensor:
        """Closed form: (X_tᵀX_t/n + diag e^α) w = X_tᵀy_t/n."""
        n = self.x_t.shape[0]
        lhs = self.x_t.T @ self.x_t / n + torch.diag(torch.exp(alpha))
        return torch.linalg.solve(lhs, self.x_t.T @ self.y_t / n)

    def optimum(self) -> tuple[Tensor, ...]:
        return self._split(self.w_star(self.arch[0]).detach())

    def true_hypergradient(self) -> tuple[Tensor, ...]:
        """dL_val(w*(α))/dα by autograd through the closed-form linear solve."""
        alpha = self.arch[0].clone().requires_grad_(True)
        w = self.w_star(alpha)
        return torch.autograd.grad(self.val_loss(self._split(w), (alpha,)), (alpha,))

    def safe_lr(self) -> float:
        """γ = 1/λ_max(H), H = 2 X_tᵀX_t/n + 2 diag e^α, so ‖I − γH‖ < 1 (Neumann converges)."""
        n = self.x_t.shape[0]
        h = 2 * self.x_t.T @ self.x_t / n + 2 * torch.diag(torch.exp(self.arch[0]))
        return float(1.0 / torch.linalg.eigvalsh(h).max())


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


def _ridge_call(ridge: Ridge, **kwargs: object) -> tuple[Tensor, ...]:
    return hypergradient(ridge.train_loss, ridge.val_loss, ridge.optimum(), ridge.arch, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "neumann", "terms": 200, "steps": 1},
        {"method": "cg", "terms": 5},  # d = 5 weights: CG is exact in 5 iterations
        {"method": "exact"},
    ],
    ids=["neumann", "cg", "exact"],
)
def test_implicit_methods_match_closed_form(ridge: Ridge, kwargs: dict[str, object]) -> None:
    got = _ridge_call(ridge, lr=ridge.safe_lr(), **kwargs)
    assert _rel_err(got, ridge.true_hypergradient()) < 1e-3


@pytest.mark.parametrize("hvp", ["finite", "finite_all"])
def test_implicit_methods_with_finite_products(ridge: Ridge, hvp: str) -> None:
    """A central difference of a quadratic's gradient is exact but for rounding."""
    want = ridge.true_hypergradient()
    for method in ("neumann", "cg", "exact"):
        got = _ridge_call(ridge, method=method, lr=ridge.safe_lr(), terms=200, hvp=hvp)
        assert _rel_err(got, want) < 1e-3, method


def test_neumann_error_shrinks_with_depth(ridge: Ridge) -> None:
    want = ridge.true_hypergradient()
    lr = ridge.safe_lr()
    errors = [
        _rel_err(_ridge_call(ridge, method="neumann", lr=lr, terms=k), want)
        for k in (0, 1, 5, 20, 100)
    ]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-3 * errors[0], errors


def test_neumann_gamma_is_its_own_step_apart_from_the_inner_one(ridge: Ridge) -> None:
    """``gamma`` scales the series only: left out, it is ``lr``; at any γ within 1/λ_max the
    series reaches the same closed form, while a γ past 2/λ_max makes it diverge."""
    safe = ridge.safe_lr()
    tied = _ridge_call(ridge, method="neumann", lr=safe, terms=20)
    same = _ridge_call(ridge, method="neumann", lr=safe, terms=20, gamma=safe)
    assert all(torch.equal(a, b) for a, b in zip(tied, same, strict=True))
    want = ridge.true_hypergradient()
    for gamma in (safe, 0.5 * safe):  # the inner step at lr 1e-3 moves w off the optimum a little
        got = _ridge_call(ridge, method="neumann", lr=1e-3, terms=400, gamma=gamma)
        assert _rel_err(got, want) < 1e-3, gamma
    diverged = _ridge_call(ridge, method="neumann", lr=1e-3, terms=60, gamma=2.5 * safe)
    assert _rel_err(diverged, want) > 1e3


@pytest.mark.parametrize(("hvp", "tol"), [("exact", 1e-10), ("finite_all", 1e-6)])
def test_neumann_diagonal_equals_its_dense_formula(hvp: str, tol: float) -> None:
    """iDARTS's approx variant, brute force: ``d = H g/‖g‖`` from the dense Hessian at ``w_T``,
    ``p = γ v ⊙ Σ_k (1 − γd)^k``, and the mixed product from the dense Jacobian of ``∇_w L``."""
    net = MixedNet()
    lr, gamma, terms = 0.1, 0.3, 3
    flat = _flatten(net.weights)

    def split(f: Tensor) -> tuple[Tensor, ...]:
        return _unflatten(f, net.weights)

    def train_of(f: Tensor, alpha: Tensor) -> Tensor:
        return net.train_loss(split(f), (alpha,))

    alpha = net.arch[0]
    w_t = flat - lr * torch.func.grad(train_of)(flat, alpha)
    g = torch.func.grad(train_of)(w_t, alpha)
    d = hessian(train_of)(w_t, alpha) @ (g / torch.linalg.norm(g))
    factor = sum((1 - gamma * d) ** k for k in range(terms + 1))
    v = torch.func.grad(lambda f: net.val_loss(split(f), (alpha,)))(w_t)
    mixed = torch.func.jacrev(torch.func.grad(train_of), argnums=1)(w_t, alpha)  # (n_w, n_α)
    g_a = torch.func.grad(lambda a: net.val_loss(split(w_t), (a,)))(alpha)
    want = (g_a - mixed.T @ (gamma * v * factor),)
    got = hypergradient(
        net.train_loss, net.val_loss, net.weights, net.arch, method="neumann_diagonal",
        lr=lr, terms=terms, gamma=gamma, hvp=hvp, eps=1e-6 if hvp != "exact" else None,
    )  # fmt: skip
    assert _rel_err(got, want) < tol
    full = hypergradient(
        net.train_loss, net.val_loss, net.weights, net.arch, method="neumann",
        lr=lr, terms=terms, gamma=gamma,
    )  # fmt: skip
    assert _rel_err(full, want) > 1e-3  # a different approximation, not the same one twice


def _dense_eigenvalues(loss, weights: tuple[Tensor, ...], arch: tuple[Tensor, ...]) -> Tensor:
    """The eigenvalues of ``∇²_{ww} loss`` from the dense Hessian over the flattened weights."""
    dense = hessian(lambda f: loss(_unflatten(f, weights), arch))(_flatten(weights))
    return torch.linalg.eigvalsh(dense)


@pytest.mark.parametrize("hvp", ["exact", "finite_all"])
def test_top_eigenvalue_matches_the_dense_hessian(hvp: str) -> None:
    """Power iteration finds the eigenvalue largest in magnitude, and every estimate on the way
    lies within the spectrum (so γ·|estimate| ≥ 1 is never a false alarm)."""
    net = MixedNet()
    eigenvalues = _dense_eigenvalues(net.train_loss, net.weights, net.arch)
    top = float(eigenvalues[eigenvalues.abs().argmax()])
    curvature = Curvature(net.train_loss, net.weights, net.arch, hvp, eps=1e-6)
    start = tuple(torch.ones_like(w) for w in net.weights)
    assert top_eigenvalue(curvature, start, 300) == pytest.approx(top, rel=1e-6)
    low, high = float(eigenvalues.min()), float(eigenvalues.max())
    for iters in (1, 2, 5):
        assert low - 1e-9 <= top_eigenvalue(curvature, start, iters) <= high + 1e-9


def test_top_eigenvalue_keeps_the_sign_of_negative_curvature() -> None:
    """A dominant negative eigenvalue (a saddle) comes out negative: no γ makes the series
    converge there, and the check must not read it as a safe small curvature."""
    scales = torch.tensor([-5.0, 1.0, 2.0], dtype=DTYPE)

    def saddle(weights: tuple[Tensor, ...], arch: tuple[Tensor, ...]) -> Tensor:
        return 0.5 * torch.sum(scales * weights[0] ** 2) + arch[0].sum() * weights[0].sum()

    weights = (torch.tensor([0.3, -0.2, 0.1], dtype=DTYPE),)
    arch = (torch.zeros(1, dtype=DTYPE),)
    curvature = Curvature(saddle, weights, arch)
    start = (torch.ones(3, dtype=DTYPE),)
    assert top_eigenvalue(curvature, start, 200) == pytest.approx(-5.0, rel=1e-9)
    assert top_eigenvalue(curvature, (torch.zeros(3, dtype=DTYPE),), 5) == 0.0
    with pytest.raises(ValueError, match="iters"):
        top_eigenvalue(curvature, start, 0)


# --------------------------------------------------------------------------- purity


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hvp", HVP_MODES)
def test_inputs_bit_identical_after_call(method: str, hvp: str) -> None:
    net = MixedNet()
    weights = tuple(t.clone().requires_grad_(True) for t in net.weights)
    arch = tuple(t.clone() for t in net.arch)
    w_before = tuple(t.detach().clone() for t in weights)
    a_before = tuple(t.clone() for t in arch)
    out = hypergradient(
        net.train_loss,
        net.val_loss,
        weights,
        arch,
        method=method,
        lr=0.3,
        steps=2,
        terms=3,
        hvp=hvp,
    )
    assert all(torch.equal(a, b) for a, b in zip(weights, w_before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(arch, a_before, strict=True))
    assert all(weights[i].grad is None for i in range(len(weights)))
    assert [o.shape for o in out] == [a.shape for a in arch]
    assert all(torch.isfinite(o).all() and not o.requires_grad for o in out)


def test_inputs_bit_identical_after_failure() -> None:
    net = MixedNet()
    before = tuple(t.clone() for t in net.weights)

    def broken(weights: tuple[Tensor, ...], arch: tuple[Tensor, ...]) -> Tensor:
        net.train_loss(weights, arch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hypergradient(broken, net.val_loss, net.weights, net.arch, method="unrolled", lr=0.3)
    assert all(torch.equal(a, b) for a, b in zip(net.weights, before, strict=True))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "bogus", "lr": 0.1}, "method"),
        ({"method": "unrolled", "lr": 0.1, "hvp": "bogus"}, "hvp"),
        ({"method": "neumann", "lr": 0.1, "steps": 0}, "steps"),
        ({"method": "neumann", "lr": 0.1, "terms": -1}, "terms"),
        ({"method": "unrolled", "lr": 0.0}, "lr"),
        ({"method": "unrolled", "lr": -1.0}, "lr"),
        ({"method": "unrolled", "lr": float("nan")}, "lr"),
        ({"method": "unrolled", "lr": 0.1, "eps": 0.0}, "eps"),
        ({"method": "neumann", "lr": 0.1, "gamma": 0.0}, "gamma"),
        ({"method": "neumann", "lr": 0.1, "gamma": float("nan")}, "gamma"),
    ],
)
def test_argument_validation(kwargs: dict[str, object], match: str) -> None:
    net = MixedNet()
    with pytest.raises(ValueError, match=match):
        hypergradient(net.train_loss, net.val_loss, net.weights, net.arch, **kwargs)


def test_rejects_non_tuple_inputs() -> None:
    net = MixedNet()
    with pytest.raises(ValueError, match="weights"):
        hypergradient(
            net.train_loss, net.val_loss, list(net.weights), net.arch, method="first_order", lr=0.1
        )
    with pytest.raises(ValueError, match="arch"):
        hypergradient(net.train_loss, net.val_loss, net.weights, (), method="first_order", lr=0.1)
