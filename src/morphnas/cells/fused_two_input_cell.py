"""A hand-written forward and backward for a whole sequence of a derived two-input cell.

Why: as for the DARTS cell (``cells.fused_darts_cell``), the eager loop is a few dozen small ATen
ops per time step plus autograd's bookkeeping for each. Here:

* **Terms on the input ``u`` are hoisted.** ``u`` does not depend on the recurrence, so every
  matmul that reads it (``u A`` or ``u B`` of an ``add_*`` node, ``u [C, H]`` of a highway) is
  one matmul over the whole sequence before the loop, and its gradients one each after it.
* **Weight gradients are one ``mm`` per weight per sequence**, over all ``T·B`` rows, instead of
  autograd's one per step; the backward walks the sequence once with no graph.

The cell (``cells.discrete.TwoInputCell``, the specification and the fallback), per time step,
with states ``u`` (input projection, ``-1``), ``m ⊙ h`` (``0``, ``m`` the ``dropout_h`` mask or
1) and the nodes, node ``i`` reading ``(a, b)``:

* ``add_*``: ``f(a A + b B)`` with ``[A; B]`` its weight; ``highway``: ``a + σ(c)(tanh(g) − a)``
  with ``[c | g] = b [C, H]``; ``hadamard``: ``a ⊙ b``; ``add``: ``a + b``;
* a grown residual node: ``base(s_1..s_{i−1}) + γ_i ⊙ op(a, b)``, ``base`` the output rule;
* ``h_t = squash(base(s_1..s_N))``.

Differentiable once (``fused_ops.refuse_double_backward``); callers fall back to the eager loop
under ``torch.func`` transforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from morphnas.genotype import Genotype
from morphnas.ops import ADD_OPS
from morphnas.spaces.fused_ops import (
    activation_backward_into,
    activation_into,
    output_rule,
    output_rule_backward,
    per_step_rows,
    refuse_double_backward,
    tanh_into,
)

U, H = 0, 1  # slots of the input projection and of the (masked) previous state


@dataclass(frozen=True)
class TwoInputCellPlan:
    """A derived two-input cell as the kernel runs it: per node its op, the slots of its two
    inputs (state ``j`` is slot ``j + 1``), and whether it is a grown residual node."""

    ops: tuple[str, ...]
    inputs: tuple[tuple[int, int], ...]
    residual: tuple[bool, ...]
    output: str
    squash: str

    @classmethod
    def of(cls, genotype: Genotype) -> TwoInputCellPlan:
        return cls(
            ops=tuple(node.op for node in genotype.nodes),
            inputs=tuple((node.inputs[0] + 1, node.inputs[1] + 1) for node in genotype.nodes),
            residual=tuple(node.residual for node in genotype.nodes),
            output=genotype.output,
            squash=genotype.output_activation,
        )


class _Node:
    """One node's buffers over the sequence: ``z`` is the pre-activation of an ``add_*`` node
    or ``[σ(c) | tanh(g)]`` of a highway (starting as the hoisted ``u`` products), ``y`` the
    op's output of a residual node (before ``γ``)."""

    def __init__(
        self,
        plan: TwoInputCellPlan,
        i: int,
        weight: Tensor | None,
        gamma: Tensor | None,
        u: Tensor,
    ) -> None:
        steps, batch, d = u.shape
        self.op, (self.a, self.b) = plan.ops[i], plan.inputs[i]
        self.slot, self.weight, self.gamma = i + 2, weight, gamma
        # (input slot, weight rows) of every matmul; those on u are hoisted out of the loop.
        if self.op in ADD_OPS:
            assert weight is not None
            self.act = ADD_OPS[self.op]
            terms = [(self.a, weight[:d]), (self.b, weight[d:])]
        elif self.op == "highway":
            assert weight is not None
            terms = [(self.b, weight)]
        else:
            terms = []
        self.terms = terms
        self.recurrent = [(slot, w) for slot, w in terms if slot != U]
        on_u = [w for slot, w in terms if slot == U]
        width = terms[0][1].shape[1] if terms else 0
        flat = u.reshape(steps * batch, d)
        if on_u:
            self.z = (flat @ sum(on_u[1:], on_u[0])).view(steps, batch, width)
        else:
            self.z = u.new_zeros(steps, batch, width)
        self.z_t = self.z.unbind(0)
        if self.op == "highway":
            self.gate_t, self.cand_t = self.z[..., :d].unbind(0), self.z[..., d:].unbind(0)
        self.y = u.new_empty(steps, batch, d) if gamma is not None else None
        self.y_t = self.y.unbind(0) if self.y is not None else None


class FusedTwoInputCellSequence(torch.autograd.Function):
    """``outputs = cell(u, h0)`` over a whole sequence; see the module docstring.

    Inputs: ``plan``; ``u`` ``(T, B, d)``, the input projection (masked and multiplied outside,
    where autograd handles it); ``h0`` ``(B, d)``; ``mask_h`` ``(B, d)`` or ``None``; per node
    its weight or ``None``; per residual node its ``γ`` ``(d,)``. Output: ``(T, B, d)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        plan: TwoInputCellPlan,
        u: Tensor,
        h0: Tensor,
        mask_h: Tensor | None,
        *weights_and_gammas: Tensor | None,
    ) -> Tensor:
        n = len(plan.ops)
        weights, gammas = weights_and_gammas[:n], iter(weights_and_gammas[n:])
        node_gammas = [next(gammas) if residual else None for residual in plan.residual]
        steps, batch, d = u.shape
        states = u.new_empty(steps, n + 2, batch, d)  # u, m ⊙ h, s_1..s_N
        states[:, U].copy_(u)
        hs = u.new_empty(steps + 1, batch, d)  # h_{t−1} of every step, then the last h
        nodes = [
            _Node(plan, i, w, g, u)
            for i, (w, g) in enumerate(zip(weights, node_gammas, strict=True))
        ]
        minus_one = u.new_full((), -1.0)
        rows, h_t = per_step_rows(states), hs.unbind(0)
        h_t[0].copy_(h0)
        for t in range(steps):
            row = rows[t]
            if mask_h is None:
                row[H].copy_(h_t[t])
            else:
                torch.mul(h_t[t], mask_h, out=row[H])
            for node in nodes:
                out = row[node.slot] if node.y_t is None else node.y_t[t]
                _op_forward(node, row, t, out, minus_one)
                if node.gamma is not None:
                    base = output_rule(states[t, 1:], node.slot - 2, plan.output)
                    torch.addcmul(base, node.gamma, out, out=row[node.slot])
            activation_into(
                plan.squash, output_rule(states[t, 1:], n, plan.output), h_t[t + 1], minus_one
            )
        ctx.plan, ctx.nodes = plan, nodes  # type: ignore[attr-defined]
        ctx.states, ctx.hs = states, hs  # type: ignore[attr-defined]
        # The nodes hold the weights and γ; saving them too makes autograd refuse a backward
        # after they were changed in place.
        ctx.save_for_backward(mask_h, *weights_and_gammas)
        return hs[1:].clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        refuse_double_backward("derived two-input cell")
        plan: TwoInputCellPlan = ctx.plan  # type: ignore[attr-defined]
        nodes: list[_Node] = ctx.nodes  # type: ignore[attr-defined]
        states: Tensor = ctx.states  # type: ignore[attr-defined]
        hs: Tensor = ctx.hs  # type: ignore[attr-defined]
        mask_h = ctx.saved_tensors[0]  # type: ignore[attr-defined]
        steps, n2, batch, d = states.shape
        n = n2 - 2
        new = grad_out.new_empty
        d_u = new(steps, batch, d)
        d_u_t = d_u.unbind(0)
        dz = [torch.empty_like(node.z) for node in nodes]  # d pre of add_*, d [c | g] of highway
        dz_t = [buf.unbind(0) for buf in dz]
        d_res = [torch.empty_like(node.y) if node.y is not None else None for node in nodes]
        d_states = new(n + 2, batch, d)
        d_rows = d_states.unbind(0)
        d_node_states = d_states[1:]  # index 0 is m ⊙ h, the nodes from 1: the output rule's view
        rows, h_t, out_t = per_step_rows(states), hs.unbind(0), grad_out.unbind(0)
        recurrent_t = [[(slot, w.T) for slot, w in node.recurrent] for node in nodes]
        d_out, d_y = new(batch, d), new(batch, d)
        carry = grad_out.new_zeros(batch, d)
        for t in reversed(range(steps)):
            row = rows[t]
            torch.add(out_t[t], carry, out=d_out)
            activation_backward_into(plan.squash, d_out, h_t[t + 1], h_t[t + 1], d_out)
            d_states.zero_()
            output_rule_backward(d_node_states, n, plan.output, d_out)
            for i in reversed(range(n)):
                node = nodes[i]
                d_s = d_rows[node.slot]
                if node.gamma is not None:
                    d_res[i][t].copy_(d_s)  # type: ignore[index]
                    output_rule_backward(d_node_states, i, plan.output, d_s)
                    d_s = torch.mul(d_s, node.gamma, out=d_y)
                _op_backward(node, row, d_rows, d_s, t, dz_t[i][t] if dz[i].numel() else None)
                for slot, w_t in recurrent_t[i]:
                    d_rows[slot].addmm_(dz_t[i][t], w_t)
            d_u_t[t].copy_(d_rows[U])
            carry = d_rows[H].clone() if mask_h is None else d_rows[H] * mask_h
        flat = steps * batch
        d_weights = []
        for node, d_pre in zip(nodes, dz, strict=True):
            if node.weight is None:
                d_weights.append(None)
                continue
            d_pre2d = d_pre.view(flat, -1)
            parts = [states[:, slot].reshape(flat, d).T @ d_pre2d for slot, _ in node.terms]
            d_weights.append(torch.cat(parts, 0) if node.op in ADD_OPS else parts[0])
            for slot, w in node.terms:
                if slot == U:
                    d_u.view(flat, d).addmm_(d_pre2d, w.T)
        d_gammas = [
            (node.y * d_r).sum((0, 1))
            for node, d_r in zip(nodes, d_res, strict=True)
            if node.y is not None
        ]
        return None, d_u, carry, None, *d_weights, *d_gammas


def _op_forward(
    node: _Node, row: tuple[Tensor, ...], t: int, out: Tensor, minus_one: Tensor
) -> None:
    """Node ``node``'s op at step ``t`` into ``out`` (its ``z`` holds the hoisted ``u`` part)."""
    a, b, op = row[node.a], row[node.b], node.op
    if node.terms:
        z = node.z_t[t]
        for slot, w in node.recurrent:
            torch.addmm(z, row[slot], w, out=z)
        if op == "highway":
            node.gate_t[t].sigmoid_()
            tanh_into(node.cand_t[t], node.cand_t[t], minus_one)
            torch.lerp(a, node.cand_t[t], node.gate_t[t], out=out)
        else:  # z keeps the pre-activation (relu's backward reads its sign)
            activation_into(node.act, z, out, minus_one)
    elif op == "hadamard":
        torch.mul(a, b, out=out)
    elif op == "add":
        torch.add(a, b, out=out)
    else:
        raise KeyError(op)


def _op_backward(
    node: _Node,
    row: tuple[Tensor, ...],
    d_rows: tuple[Tensor, ...],
    d_s: Tensor,
    t: int,
    d_z: Tensor | None,
) -> None:
    """Add the gradient of node ``node``'s op at step ``t`` into its inputs' rows of
    ``d_rows`` (all but its matmuls, which the caller adds from ``d_z``)."""
    op = node.op
    if op in ADD_OPS:
        assert d_z is not None
        value = row[node.slot] if node.y_t is None else node.y_t[t]
        activation_backward_into(node.act, d_s, value, node.z_t[t], d_z)
    elif op == "highway":
        assert d_z is not None
        a, gate, cand = row[node.a], node.gate_t[t], node.cand_t[t]
        width = gate.shape[-1]
        d_gate, d_cand = d_z[:, :width], d_z[:, width:]
        torch.mul(d_s, gate, out=d_cand)
        d_rows[node.a].add_(d_s).sub_(d_cand)
        torch.sub(cand, a, out=d_gate).mul_(d_s)
        activation_backward_into("sigmoid", d_gate, gate, gate, d_gate)
        activation_backward_into("tanh", d_cand, cand, cand, d_cand)
    elif op == "hadamard":
        d_rows[node.a].addcmul_(d_s, row[node.b])
        d_rows[node.b].addcmul_(d_s, row[node.a])
    elif op == "add":
        d_rows[node.a].add_(d_s)
        d_rows[node.b].add_(d_s)
    else:
        raise KeyError(op)
