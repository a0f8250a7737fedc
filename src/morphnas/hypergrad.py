"""One functional bilevel engine for architecture hypergradients (DESIGN.md §3).

Differentiable NAS solves ``min_α L_val(w*(α), α)`` with ``w*(α) = argmin_w L_train(w, α)``.
Every method in spec/methods.md needs the same few derivative products, so they live here, once:

* ``first_order``  — DARTS ξ = 0: ``∇_α L_val(w, α)``.
* ``unrolled``     — DARTS second order (Liu et al., ICLR 2019, §2.3): one virtual SGD step
  ``w' = w − ξ ∇_w L_train(w, α)`` and
  ``∇_α L_val(w', α) − ξ ∇²_{α,w} L_train(w, α) ∇_{w'} L_val(w', α)``; the mixed product is taken
  around the *original* ``w`` (the fixed version of quark0/darts#21).
* ``neumann``      — iDARTS (Zhang et al., ICML 2021): implicit-function-theorem gradient at
  ``w_T`` (after ``T`` inner SGD steps) with ``H⁻¹ ≈ γ Σ_{k=0}^{K} (I − γH)^k``, γ = ``lr``
  unless ``gamma`` is given; ``top_eigenvalue`` checks γλ_max < 1 by power iteration.
  ``T = 1, K = 0`` is *almost* DARTS second order (the mixed term is taken at ``w_T``, not ``w``).
* ``neumann_diagonal`` — iDARTS's cheaper variant (the official ``architect_approx.py``): the
  series taken elementwise with the diagonal estimate ``d = H·g/‖g‖``, ``g = ∇_w L_train(w_T)``,
  ``H⁻¹ v ≈ γ v ⊙ Σ_{k=0}^{K} (1 − γd)^k``: one Hessian–vector product instead of ``K``.
* ``cg``           — the same implicit gradient, ``H⁻¹ v`` by ``K`` conjugate-gradient iterations.
* ``exact``        — the same implicit gradient with a dense Hessian and a direct solve (tests and
  toy problems only: it costs O(n²) memory in the number of weights).

All products are computed on *functional* weights (fresh leaves), so nothing is perturbed in
place. The first-order ones run where the supernets' once-differentiable sequence kernels can;
the products that differentiate a gradient again (Hessian–vector and exact mixed products, by
double backward) run on the eager loops (``fused_ops.eager_kernels``), and under a torch.func
transform by torch.func. ``hvp="finite_all"`` takes every second-order product by central
difference instead, two first-order gradients each, so that a whole hypergradient runs on the
kernels.
Public ports of DARTS perturb ``w`` in place (+εv, −2εv, +εv; quark0/darts#52) and leave
floating-point drift behind; here the caller's tensors are never written: they stay bit-identical.
The finite-difference denominator is ``(2 * eps)`` with brackets (NNI #3044, pt.darts#43).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch.func import grad, hessian, vjp

from morphnas.errors import check_count
from morphnas.kernels.fused_ops import eager_kernels, transforms_active

__all__ = [
    "HVP_MODES",
    "METHODS",
    "check_gamma",
    "check_hvp_options",
    "hypergradient",
    "top_eigenvalue",
]

Tensors = tuple[Tensor, ...]
Loss = Callable[[Tensors, Tensors], Tensor]

METHODS = ("first_order", "unrolled", "neumann", "neumann_diagonal", "cg", "exact")
HVP_MODES = ("exact", "finite", "finite_all")

_FD_SCALE = 0.01  # DARTS cnn/architect.py: eps = 0.01 / ||v||


def check_hvp_options(hvp: str, eps: float | None) -> None:
    """Raise ``ValueError`` for a Hessian–vector product mode or finite-difference step that
    ``hypergradient`` cannot use; strategies call it when built, before any run starts."""
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be > 0 or None, got {eps!r}")


def check_gamma(gamma: float | None) -> None:
    """Raise ``ValueError`` for a Neumann step γ that is not a positive number or ``None`` (which
    ties γ to the learning rate); iDARTS calls it when built, ``hypergradient`` when called."""
    if gamma is not None and not gamma > 0:  # also rejects NaN
        raise ValueError(f"gamma must be > 0 or None (tied to the learning rate), got {gamma!r}")


# --------------------------------------------------------------------------- tuple arithmetic


def _axpy(a: float | Tensor, x: Tensors, y: Tensors) -> Tensors:
    """``a·x + y`` elementwise over tuples, out of place (never touches the caller's tensors)."""
    return tuple(a * xi + yi for xi, yi in zip(x, y, strict=True))


def _dot(x: Tensors, y: Tensors) -> Tensor:
    """Inner product of two tuples viewed as one flat vector."""
    return sum(torch.sum(xi * yi) for xi, yi in zip(x, y, strict=True))


def _norm(x: Tensors) -> Tensor:
    """Euclidean norm of a tuple viewed as one flat vector."""
    return torch.sqrt(_dot(x, x))


def _flatten(x: Tensors) -> Tensor:
    """Concatenate a tuple into one vector (for the dense ``exact`` solve)."""
    return torch.cat([xi.reshape(-1) for xi in x])


def _unflatten(flat: Tensor, like: Tensors) -> Tensors:
    """Split a flat vector back into tensors shaped like ``like``."""
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return tuple(out)


# --------------------------------------------------------------------------- derivative products


def _grads(
    loss: Loss, weights: Tensors, arch: Tensors, argnums: tuple[int, ...] = (0, 1)
) -> tuple[Tensors, ...]:
    """The gradients of ``loss(w, α)`` with respect to the arguments ``argnums`` (0: ``w``,
    1: ``α``), one tuple each, by reverse-mode autograd when it can.

    Under a torch.func transform (an exact product differentiates this gradient again) it is
    ``torch.func.grad``. At the top level it is ``torch.autograd.grad`` on fresh leaves (views of
    the inputs, never written): the same gradient, but the spaces' sequence kernels, which are
    differentiable once and step aside under torch.func, run here, and functorch's per-op
    wrapping is skipped. Unused inputs get zeros, as torch.func gives them.
    """
    if transforms_active():
        return grad(loss, argnums=argnums)(weights, arch)
    args = [weights, arch]
    with torch.enable_grad():
        for n in argnums:
            args[n] = tuple(t.detach().requires_grad_() for t in args[n])
        leaves = [t for n in argnums for t in args[n]]
        found = torch.autograd.grad(loss(*args), leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, found, strict=True)]
    out, start = [], 0
    for n in argnums:
        out.append(tuple(grads[start : start + len(args[n])]))
        start += len(args[n])
    return tuple(out)


def _grad_w(loss: Loss, weights: Tensors, arch: Tensors) -> Tensors:
    """``∇_w loss(w, α)``."""
    return _grads(loss, weights, arch, (0,))[0]


def _grad_a(loss: Loss, weights: Tensors, arch: Tensors) -> Tensors:
    """``∇_α loss(w, α)``."""
    return _grads(loss, weights, arch, (1,))[0]


def _central(
    loss: Loss, weights: Tensors, arch: Tensors, v: Tensors, eps: float | None, argnum: int
) -> Tensors:
    """DARTS's central difference along ``v`` in the weights of the gradient in ``w``
    (``argnum`` 0) or ``α`` (1): ``[g(w+εv) − g(w−εv)] / (2ε)``, ``ε = 0.01/‖v‖`` unless
    ``eps`` is given.

    ``w±`` are new tensors, so no restore step exists that could drift (quark0/darts#52). The
    two gradients are first-order, so they run on the sequence kernels.
    """
    norm = float(_norm(v))
    if norm == 0.0:  # zero direction: the product is exactly zero, and 0.01/0 would be inf
        return tuple(torch.zeros_like(t) for t in (weights, arch)[argnum])
    step = eps if eps is not None else _FD_SCALE / norm
    (g_plus,) = _grads(loss, _axpy(step, v, weights), arch, (argnum,))
    (g_minus,) = _grads(loss, _axpy(-step, v, weights), arch, (argnum,))
    return tuple((gp - gm) / (2 * step) for gp, gm in zip(g_plus, g_minus, strict=True))


class Curvature:
    """The second-order products of ``loss`` at one point ``(w, α)``, each the gradient of
    ``⟨∇_w loss(w, α), v⟩``: ``hvp(v) = ∇²_{ww} loss · v`` and ``mixed(v) = ∇²_{αw} loss · v``,
    exact or by central difference as ``hvp`` (one of :data:`HVP_MODES`) says.

    An exact product is one more backward through the weight gradient, taken once with its
    graph: iDARTS's K Neumann products and its mixed product, all at ``(w_T, α)``, share one
    forward and one first backward instead of taking one each. At the top level that is
    autograd with ``create_graph=True`` on the eager loops (``eager_kernels``: the sequence
    kernels' backward is once-only), which gives torch.func's products to the bit without its
    per-op wrapping (docs/benchmarks.md); under a torch.func transform (a caller's ``vmap``) it
    is torch.func's ``vjp`` of the weight gradient, its pull-backs kept the same way. A central
    difference is two first-order gradients instead, on the sequence kernels.

    Reverse-over-reverse, not forward-over-reverse (``jvp``): in torch 2.13 the forward-mode
    formula of ``mse_loss``'s backward writes into the zero tangent of a target that has none
    ("ZeroTensors are immutable"), so a task using ``nn.MSELoss`` could not be differentiated.
    """

    def __init__(
        self,
        loss: Loss,
        weights: Tensors,
        arch: Tensors,
        hvp: str = "exact",
        eps: float | None = None,
    ) -> None:
        check_hvp_options(hvp, eps)
        self._loss, self._weights, self._arch = loss, weights, arch
        self._finite_hvp = hvp == "finite_all"
        self._finite_mixed = hvp in ("finite", "finite_all")
        self._eps = eps
        self._pulls: dict[int, Callable[[Tensors], tuple[Tensors]]] = {}

    def hvp(self, v: Tensors) -> Tensors:
        """``∇²_{ww} loss · v``."""
        if self._finite_hvp:
            return _central(self._loss, self._weights, self._arch, v, self._eps, argnum=0)
        return self._product(v, 0)

    def mixed(self, v: Tensors) -> Tensors:
        """``∇²_{αw} loss · v = ∇_α ⟨∇_w loss, v⟩``."""
        if self._finite_mixed:
            return _central(self._loss, self._weights, self._arch, v, self._eps, argnum=1)
        return self._product(v, 1)

    def _product(self, v: Tensors, argnum: int) -> Tensors:
        """``∇_x ⟨∇_w loss, v⟩`` for ``x`` = ``w`` (``argnum`` 0) or ``α`` (1)."""
        if transforms_active():
            (out,) = self._pull(argnum)(v)
            return out
        leaves, g_w = self._graph
        wrt = leaves[argnum]
        with torch.enable_grad():
            terms = [(g * vi).sum() for g, vi in zip(g_w, v, strict=True) if g is not None]
            inner = sum(terms[1:], terms[0]) if terms else None
        if inner is None or not inner.requires_grad:  # the gradient does not depend on x
            return tuple(torch.zeros_like(t) for t in wrt)
        found = torch.autograd.grad(inner, wrt, retain_graph=True, allow_unused=True)
        return tuple(
            torch.zeros_like(t) if f is None else f for t, f in zip(wrt, found, strict=True)
        )

    @cached_property
    def _graph(self) -> tuple[tuple[Tensors, Tensors], tuple[Tensor | None, ...]]:
        """The leaves ``(w, α)`` and ``∇_w loss`` with its graph, on the eager loops."""
        with eager_kernels(), torch.enable_grad():
            w = tuple(t.detach().requires_grad_() for t in self._weights)
            a = tuple(t.detach().requires_grad_() for t in self._arch)
            g_w = torch.autograd.grad(self._loss(w, a), w, create_graph=True, allow_unused=True)
        return (w, a), g_w

    def _pull(self, argnum: int) -> Callable[[Tensors], tuple[Tensors]]:
        """torch.func's pull-back of the weight gradient in ``w`` or ``α``, made once."""
        if argnum not in self._pulls:
            loss, weights, arch = self._loss, self._weights, self._arch
            if argnum == 0:
                _, self._pulls[0] = vjp(lambda w: _grad_w(loss, w, arch), weights)
            else:
                _, self._pulls[1] = vjp(lambda a: _grad_w(loss, weights, a), arch)
        return self._pulls[argnum]


# --------------------------------------------------------------------------- inverse-Hessian solves


def _inner_sgd(train_loss: Loss, weights: Tensors, arch: Tensors, lr: float, steps: int) -> Tensors:
    """``T`` plain SGD steps on ``L_train`` at fixed α (iDARTS inner loop), on copies."""
    w = weights
    for _ in range(steps):
        w = _axpy(-lr, _grad_w(train_loss, w, arch), w)
    return w


def _neumann(curvature: Curvature, v: Tensors, gamma: float, terms: int) -> Tensors:
    """``γ Σ_{k=0}^{K} (I − γH)^k v`` (iDARTS; converges to H⁻¹v if 0 < γλ < 2 for every
    eigenvalue λ of H, monotonically if γλ_max < 1: ``top_eigenvalue`` checks that)."""
    p, acc = v, v
    for _ in range(terms):
        p = _axpy(-gamma, curvature.hvp(p), p)
        acc = _axpy(1.0, p, acc)
    return tuple(gamma * a for a in acc)


def _neumann_diagonal(
    curvature: Curvature, train_grad: Tensors, v: Tensors, gamma: float, terms: int
) -> Tensors:
    """``γ v ⊙ Σ_{k=0}^{K} (1 − γd)^k`` with ``d = H·g/‖g‖`` for ``g`` = ``train_grad``: the
    official iDARTS ``architect_approx.py``'s surrogate, ``d`` being ``∂‖∇_w L_train‖/∂w``
    (spec 2a). ``d`` is zero where the training gradient is (nothing to scale by)."""
    norm = float(_norm(train_grad))
    if norm == 0.0:
        diag = tuple(torch.zeros_like(t) for t in v)
    else:
        diag = curvature.hvp(tuple(g / norm for g in train_grad))
    out = []
    for vi, di in zip(v, diag, strict=True):
        term = acc = torch.ones_like(di)
        for _ in range(terms):
            term = term * (1 - gamma * di)
            acc = acc + term
        out.append(gamma * vi * acc)
    return tuple(out)


def top_eigenvalue(curvature: Curvature, start: Tensors, iters: int) -> float:
    """The eigenvalue of ``H = ∇²_{ww} loss`` largest in magnitude, by ``iters`` steps of power
    iteration from ``start``: the Rayleigh quotient ``⟨v, Hv⟩`` of the last unit iterate.

    A Rayleigh quotient lies between H's smallest and largest eigenvalues, so the estimate never
    overstates the true magnitude: ``γ·|estimate| ≥ 1`` proves that the Neumann series with step
    γ does not converge monotonically (spec 2f's diagnostic). Fewer iterations can only
    understate it. Zero for a zero ``start`` or a zero product (``v`` in H's null space).
    """
    check_count("iters", iters, 1)
    norm = float(_norm(start))
    if norm == 0.0:
        return 0.0
    v = tuple(t / norm for t in start)
    value = 0.0
    for _ in range(iters):
        hv = curvature.hvp(v)
        value = float(_dot(v, hv))
        size = float(_norm(hv))
        if size == 0.0:
            return 0.0
        v = tuple(h / size for h in hv)
    return value


def _cg(curvature: Curvature, v: Tensors, iters: int) -> Tensors:
    """``H⁻¹ v`` by ``iters`` conjugate-gradient iterations (H symmetric positive definite)."""
    x = tuple(torch.zeros_like(t) for t in v)
    r, d = v, v
    rr = _dot(r, r)
    for _ in range(iters):
        if float(rr) == 0.0:  # converged exactly; another step would divide by zero
            break
        hd = curvature.hvp(d)
        step = rr / _dot(d, hd)
        x = _axpy(step, d, x)
        r = _axpy(-step, hd, r)
        rr_new = _dot(r, r)
        d = _axpy(rr_new / rr, d, r)
        rr = rr_new
    return x


def _dense_solve(train_loss: Loss, weights: Tensors, arch: Tensors, v: Tensors) -> Tensors:
    """``H⁻¹ v`` from the dense Hessian over the flattened weights and ``torch.linalg.solve``."""
    flat = _flatten(weights)
    h = hessian(lambda f: train_loss(_unflatten(f, weights), arch))(flat)
    return _unflatten(torch.linalg.solve(h, _flatten(v)), weights)


# --------------------------------------------------------------------------- methods


def _first_order(val_loss: Loss, weights: Tensors, arch: Tensors) -> Tensors:
    """DARTS first order: ``∂L_val/∂α`` at the current weights."""
    return _grad_a(val_loss, weights, arch)


def _unrolled(
    train_loss: Loss,
    val_loss: Loss,
    weights: Tensors,
    arch: Tensors,
    lr: float,
    hvp: str,
    eps: float | None,
) -> Tensors:
    """DARTS second order: one virtual step, mixed term around the original ``w`` (darts#21)."""
    w_virtual = _inner_sgd(train_loss, weights, arch, lr, 1)
    g_w, g_a = _grads(val_loss, w_virtual, arch)
    mixed = Curvature(train_loss, weights, arch, hvp, eps).mixed(g_w)
    return _axpy(-lr, mixed, g_a)


@dataclass(frozen=True)
class _Options:
    """``hypergradient``'s keyword options, checked once when built and then handed on whole, so
    that the implicit solver reads them by name rather than through a long positional list."""

    method: str
    lr: float
    steps: int
    terms: int
    eps: float | None
    hvp: str
    gamma: float | None

    def __post_init__(self) -> None:
        """Reject bad options with a ValueError that names the option and the allowed values."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        check_hvp_options(self.hvp, self.eps)
        check_count("steps", self.steps, 1)
        check_count("terms", self.terms, 0)
        if not self.lr > 0:  # also rejects NaN
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        check_gamma(self.gamma)

    @property
    def series_gamma(self) -> float:
        """γ of the Neumann series: ``gamma``, or ``lr`` when it is None (as iDARTS does)."""
        return self.lr if self.gamma is None else self.gamma


def _implicit(
    train_loss: Loss, val_loss: Loss, weights: Tensors, arch: Tensors, options: _Options
) -> Tensors:
    """IFT gradient ``∇_α L_val − ∇²_{αw} L_train · H⁻¹ · ∇_w L_val`` at ``w_T`` (iDARTS)."""
    method, terms, gamma = options.method, options.terms, options.series_gamma
    w_t = _inner_sgd(train_loss, weights, arch, options.lr, options.steps)
    g_w, g_a = _grads(val_loss, w_t, arch)
    # every product below is at (w_T, α)
    curvature = Curvature(train_loss, w_t, arch, options.hvp, options.eps)
    if method == "neumann":
        p = _neumann(curvature, g_w, gamma, terms)
    elif method == "neumann_diagonal":
        p = _neumann_diagonal(curvature, _grad_w(train_loss, w_t, arch), g_w, gamma, terms)
    elif method == "cg":
        p = _cg(curvature, g_w, terms)
    else:
        p = _dense_solve(train_loss, w_t, arch, g_w)
    return _axpy(-1.0, curvature.mixed(p), g_a)


def _check_tensors(weights: Tensors, arch: Tensors) -> None:
    """Reject ``weights`` or ``arch`` that are not non-empty tuples of tensors."""
    for name, group in (("weights", weights), ("arch", arch)):
        if not isinstance(group, tuple) or not group:
            raise ValueError(f"{name} must be a non-empty tuple of tensors")
        if not all(isinstance(t, Tensor) for t in group):
            raise ValueError(f"{name} must contain only tensors")


def hypergradient(
    train_loss: Loss,
    val_loss: Loss,
    weights: Tensors,
    arch: Tensors,
    *,
    method: str,
    lr: float,
    steps: int = 1,
    terms: int = 2,
    eps: float | None = None,
    hvp: str = "exact",
    gamma: float | None = None,
) -> Tensors:
    """Hypergradient of ``val_loss`` with respect to ``arch``, shaped like ``arch``.

    Args:
        train_loss, val_loss: ``f(weights, arch) -> scalar``, both taking tuples of tensors.
            They must be pure functions of their arguments (torch.func transforms them).
        weights, arch: tuples of tensors. Never modified; they are bit-identical afterwards.
        method: one of :data:`METHODS` (see the module docstring).
        lr: ξ of DARTS's virtual step, and the inner SGD step of the implicit methods.
        steps: inner SGD steps ``T`` before the implicit methods (all but ``first_order`` and
            ``unrolled``).
        terms: Neumann depth ``K`` (sum over k = 0..K, both ``neumann`` methods) or the number
            of CG iterations.
        eps: finite-difference step; ``None`` means ``0.01 / ‖v‖`` as in the DARTS code.
        hvp: how the second-order products are taken. ``"exact"``: all by double backward.
            ``"finite"``: the mixed ``∇²_{α,w}`` product by DARTS's central difference, the
            Hessian–vector products of Neumann/CG exact (the official iDARTS code's choice).
            ``"finite_all"``: every product by central difference, each two first-order
            gradients on the sequence kernels (the fastest; O(ε²) error plus float rounding).
            The dense solve of ``exact`` is exact whatever ``hvp`` says.
        gamma: γ of the ``neumann`` methods' series; ``None`` ties it to ``lr``, as iDARTS does.
            The series needs γλ < 2 for H's eigenvalues λ (``top_eigenvalue`` estimates the
            largest).

    Returns:
        Detached tensors, one per ``arch`` entry.

    Raises:
        ValueError: unknown ``method``/``hvp``, ``steps < 1``, ``terms < 0``, ``lr <= 0``,
            ``eps <= 0``, ``gamma <= 0``, or ``weights``/``arch`` not non-empty tuples of tensors.
    """
    options = _Options(method, lr, steps, terms, eps, hvp, gamma)
    _check_tensors(weights, arch)
    # torch.func needs no requires_grad; detaching (a view, never a write) keeps the caller's
    # autograd graph out of every product and saves its memory.
    weights = tuple(t.detach() for t in weights)
    arch = tuple(t.detach() for t in arch)
    if method == "first_order":
        out = _first_order(val_loss, weights, arch)
    elif method == "unrolled":
        out = _unrolled(train_loss, val_loss, weights, arch, lr, hvp, eps)
    else:
        out = _implicit(train_loss, val_loss, weights, arch, options)
    return tuple(t.detach() for t in out)
