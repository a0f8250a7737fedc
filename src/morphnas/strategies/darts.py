"""DARTS (Liu, Simonyan, Yang, ICLR 2019): softmax mixing, Adam on ``α`` with validation batches.

* ``order=1``: ``∇_α L_val(w, α)`` at the current weights (ξ = 0).
* ``order=2``: the unrolled gradient of ``morphnas.hypergrad`` with ξ = the weight learning rate:
  ``∇_α L_val(w', α) − ξ ∇²_{α,w} L_train(w, α) ∇_{w'} L_val(w', α)``,
  ``w' = w − ξ ∇_w L_train(w, α)``; the mixed product by the paper's central difference
  (``hvp="finite"``, ε = 0.01/‖v‖; ``"finite_all"`` is the same here, the mixed product being
  the only second-order one) or exactly (``hvp="exact"``, double backward).

Our virtual step is plain SGD with ξ, while our weights train with Adam: the DARTS code copies its
own optimizer (momentum, weight decay) into the virtual step, but an Adam step is not a function
whose derivative the paper's formula describes, so we keep the paper's SGD form (spec 1f).
``perturb_unrolled=True`` reproduces the original code's bug of taking the mixed product around
``w'`` instead of ``w`` (quark0/darts#21); never the default.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.func import grad

from morphnas.hypergrad import Curvature, _inner_sgd, check_hvp_options, hypergradient
from morphnas.spaces.base import SearchSpace
from morphnas.strategies.base import BatchLoss, Objective, Strategy


def require_objective(objective: Objective | BatchLoss, who: str) -> Objective:
    """Bilevel methods need the loss as a function of the weights, not a bare closure."""
    if not isinstance(objective, Objective):
        raise TypeError(f"{who} needs an Objective (model, loss, weights), not a bare loss closure")
    return objective


class Darts(Strategy):
    """DARTS first or second order on a recurrent supernet (RNN search: Adam lr 3e-3, wd 1e-3).

    Only ``α`` gets gradients (``autograd.grad`` or ``hypergrad``), so the arch step never writes
    the weights or their ``.grad``.
    """

    name = "darts"

    def __init__(
        self,
        space: SearchSpace,
        *,
        order: int = 1,
        hvp: str = "finite",
        eps: float | None = None,
        perturb_unrolled: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(space, **common)
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        check_hvp_options(hvp, eps)
        self.order, self.hvp, self.eps = order, hvp, eps
        self.hypergradient = order == 2
        self.perturb_unrolled = perturb_unrolled

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        if self.order == 1:
            return self._first_order_step(objective, valid_batch)
        objective = require_objective(objective, "DARTS second order")
        train_loss, val_loss, weights, arch = self._bilevel(objective, train_batch, valid_batch)
        if self.perturb_unrolled:
            grads = _unrolled_around_virtual(
                train_loss, val_loss, weights, arch, self.weight_lr, self.hvp, self.eps
            )
        else:
            grads = hypergradient(
                train_loss,
                val_loss,
                weights,
                arch,
                method="unrolled",
                lr=self.weight_lr,
                hvp=self.hvp,
                eps=self.eps,
            )
        self._apply_hypergradient(grads)
        return self._valid_value(objective, valid_batch)


def _unrolled_around_virtual(
    train_loss: Any,
    val_loss: Any,
    weights: tuple[Tensor, ...],
    arch: tuple[Tensor, ...],
    lr: float,
    hvp: str,
    eps: float | None,
) -> tuple[Tensor, ...]:
    """The original DARTS code's variant: the mixed product taken around ``w'`` (darts#21)."""
    weights = tuple(w.detach() for w in weights)
    arch = tuple(a.detach() for a in arch)
    w_virtual = _inner_sgd(train_loss, weights, arch, lr, 1)
    g_w, g_a = grad(val_loss, argnums=(0, 1))(w_virtual, arch)
    mixed = Curvature(train_loss, w_virtual, arch, hvp, eps).mixed(g_w)
    return tuple((a - lr * m).detach() for a, m in zip(g_a, mixed, strict=True))


DartsFirstOrder = Darts  # the name the first version of the package exported
