"""GRU and LSTM are points of the two-input space: ``KNOWN["gru"]`` and ``KNOWN["lstm"]``, given
the weights of a ``torch.nn.GRUCell`` / ``LSTMCell``, compute exactly what those compute.

The weights are solved for, not assumed: with ``[W_x; b_x]`` of full rank (input size < hidden),
every affine map ``x P + q`` is ``u B`` for ``B = [W_x; b_x]⁺ [P; q]``, which is how each op that
reads ``u`` gets both its input weights and its bias. Also here: the genotype's ``cell_state``
field in JSON (version 2, and version-1 files still read) and its refusals.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from morphnas import cells
from morphnas import genotype as gt
from morphnas.cells import TwoInputCell
from morphnas.cells import discrete as discrete_mod
from morphnas.errors import UserError
from morphnas.genotype import KNOWN, Genotype, Node

N_IN, D, T, B = 3, 8, 7, 5
TOL = 1e-6  # the bound on max |difference|; float64 gives ~1e-15 (printed: pytest -s)


def input_basis(cell: TwoInputCell) -> Tensor:
    """Random ``W_x``, ``b_x`` in the cell; returns ``[W_x; b_x]`` (N_IN + 1 × D), full rank."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        cell.input_weight.copy_(torch.randn(N_IN, D, generator=gen, dtype=torch.float64))
        cell.input_bias.copy_(torch.randn(D, generator=gen, dtype=torch.float64))
    basis = torch.cat([cell.input_weight, cell.input_bias[None]]).detach()
    assert torch.linalg.matrix_rank(basis) == N_IN + 1
    return basis


def from_u(basis: Tensor, p: Tensor | None, q: Tensor) -> Tensor:
    """The ``B`` (D × D) with ``u B = x P + q`` for every ``x``: the min-norm solution of
    ``[W_x; b_x] B = [P; q]``, exact because ``[W_x; b_x]`` has full row rank."""
    p = torch.zeros(N_IN, D, dtype=torch.float64) if p is None else p
    target = torch.cat([p, q[None]])
    solution = torch.linalg.pinv(basis) @ target
    torch.testing.assert_close(basis @ solution, target, rtol=0, atol=1e-12)
    return solution


def set_weights(cell: TwoInputCell, blocks: dict[int, tuple[Tensor, Tensor]]) -> None:
    """Node ``i`` (1-based) gets ``[A; B]`` from ``blocks[i] = (A, B)``; every weighted node
    must be given one."""
    weighted = {i + 1 for i, slot in enumerate(cell._weight_slot) if slot is not None}
    assert weighted == set(blocks)
    with torch.no_grad():
        for i, (a, b) in blocks.items():
            slot = cell._weight_slot[i - 1]
            assert slot is not None
            cell.node_weights[slot].copy_(torch.cat([a, b]))


def gru_as_two_input(ref: nn.GRUCell, fused: bool) -> TwoInputCell:
    """``KNOWN["gru"]`` holding ``ref``'s weights (torch's gate order r, z, n)."""
    cell = TwoInputCell(KNOWN["gru"], N_IN, D, fused=fused).double()
    basis = input_basis(cell)
    w_i, w_h = ref.weight_ih.detach().chunk(3), ref.weight_hh.detach().chunk(3)
    b_i, b_h = ref.bias_ih.detach().chunk(3), ref.bias_hh.detach().chunk(3)
    eye = torch.eye(D, dtype=torch.float64)
    gate = {k: (from_u(basis, w_i[k].T, b_i[k] + b_h[k]), w_h[k].T) for k in (0, 1)}
    set_weights(
        cell,
        {
            1: gate[0],  # r = σ(u A + h B)
            2: gate[1],  # z
            3: (w_h[2].T, from_u(basis, None, b_h[2])),  # W_hn h + b_hn
            5: (from_u(basis, w_i[2].T, b_i[2]), eye),  # n = tanh(W_in x + b_in + s4)
            6: (eye, -eye),  # h − n
        },
    )
    return cell


def lstm_as_two_input(ref: nn.LSTMCell, fused: bool) -> TwoInputCell:
    """``KNOWN["lstm"]`` holding ``ref``'s weights (torch's gate order i, f, g, o)."""
    cell = TwoInputCell(KNOWN["lstm"], N_IN, D, fused=fused).double()
    basis = input_basis(cell)
    w_i, w_h = ref.weight_ih.detach().chunk(4), ref.weight_hh.detach().chunk(4)
    b_i, b_h = ref.bias_ih.detach().chunk(4), ref.bias_hh.detach().chunk(4)
    eye, zero = torch.eye(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    blocks = {k + 1: (from_u(basis, w_i[k].T, b_i[k] + b_h[k]), w_h[k].T) for k in range(4)}
    blocks[8] = (eye, zero)  # tanh(c')
    set_weights(cell, blocks)
    return cell


def reference(cls: type[nn.RNNCellBase]) -> nn.RNNCellBase:
    """A torch cell with biases, its weights drawn wider than its init so that gates saturate
    in places (a wrong sign or a swapped gate then shows)."""
    torch.manual_seed(5)
    ref = cls(N_IN, D, bias=True).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.8, 0.8)
    return ref


def sequence(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, N_IN, generator=gen, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(B, D, generator=gen, dtype=torch.float64).requires_grad_()
    c0 = torch.randn(B, D, generator=gen, dtype=torch.float64).requires_grad_()
    return x, h0, c0


def unroll(ref: nn.RNNCellBase, x: Tensor, state: Tensor | tuple[Tensor, Tensor]):
    """torch's cell stepped over ``x``: the outputs and the final state."""
    outputs = []
    for t in range(x.shape[0]):
        state = ref(x[t], state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outputs), state


def max_diff(*pairs: tuple[Tensor, Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in pairs)


def input_grads(loss_of: Callable[[], Tensor], wrt: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss_of(), wrt))


@pytest.fixture
def kernel_calls(monkeypatch):
    """The fused sequence kernel, counting its calls, so a test knows which path a cell took."""
    real = discrete_mod.FusedTwoInputCellSequence

    class Counting:
        calls = 0

        @classmethod
        def apply(cls, *args):
            cls.calls += 1
            return real.apply(*args)

    monkeypatch.setattr(discrete_mod, "FusedTwoInputCellSequence", Counting)
    return Counting


@pytest.mark.parametrize("fused", [True, False], ids=["default", "eager"])
def test_gru_genotype_is_torch_gru(fused, kernel_calls):
    ref = reference(nn.GRUCell)
    cell = gru_as_two_input(ref, fused)
    x, h0, _ = sequence(1)
    out, h = cell(x, h0)
    assert kernel_calls.calls == (1 if fused else 0)  # the default path is the kernel
    ref_out, ref_h = unroll(ref, x, h0)
    diff = max_diff((out, ref_out), (h, ref_h))
    print(f"gru, {'default' if fused else 'eager'} path: max |difference| {diff:.3g}")
    assert diff <= TOL
    # the same function of x and h0, so the same input gradients (the kernel's backward too)
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours = input_grads(lambda: (cell(x, h0)[0] * weight).sum(), [x, h0])
    theirs = input_grads(lambda: (unroll(ref, x, h0)[0] * weight).sum(), [x, h0])
    assert max_diff(*zip(ours, theirs, strict=True)) <= TOL
    # forward_with_state of a cell without cell_state carries h alone
    out2, state = cell.forward_with_state(x, h0)
    assert isinstance(state, Tensor) and max_diff((out2, out), (state, h)) == 0


@pytest.mark.parametrize("fused", [True, False], ids=["default", "eager"])
def test_lstm_genotype_is_torch_lstm(fused, kernel_calls):
    ref = reference(nn.LSTMCell)
    cell = lstm_as_two_input(ref, fused)
    x, h0, c0 = sequence(3)
    out, (h, c) = cell.forward_with_state(x, (h0, c0))
    assert kernel_calls.calls == 0  # the kernel does not carry c: the eager loop runs
    ref_out, (ref_h, ref_c) = unroll(ref, x, (h0, c0))
    diff = max_diff((out, ref_out), (h, ref_h), (c, ref_c))
    print(f"lstm, {'default' if fused else 'eager'} path: max |difference| {diff:.3g}")
    assert diff <= TOL
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours = input_grads(
        lambda: (cell.forward_with_state(x, (h0, c0))[0] * weight).sum(), [x, h0, c0]
    )
    theirs = input_grads(lambda: (unroll(ref, x, (h0, c0))[0] * weight).sum(), [x, h0, c0])
    assert max_diff(*zip(ours, theirs, strict=True)) <= TOL
    # forward(x, h0): c starts at zero, h_last is h (not c)
    out0, h_last = cell(x, h0)
    ref_out0, _ = unroll(ref, x, (h0, torch.zeros_like(c0)))
    assert max_diff((out0, ref_out0), (h_last, ref_out0[-1])) <= TOL


def test_lstm_genotype_carries_c_across_windows():
    """Two windows with the state handed over equal one window over both, as for nn.LSTM."""
    ref = reference(nn.LSTMCell)
    cell = lstm_as_two_input(ref, fused=True)
    x, h0, c0 = sequence(6)
    whole, (h, c) = cell.forward_with_state(x, (h0, c0))
    first, state = cell.forward_with_state(x[:3], (h0, c0))
    second, (h2, c2) = cell.forward_with_state(x[3:], state)
    assert max_diff((torch.cat([first, second]), whole), (h2, h), (c2, c)) <= 1e-12
    # a bare h starts c at zero, as forward does
    out, (h_bare, _) = cell.forward_with_state(x, h0)
    assert max_diff((out, cell(x, h0)[0]), (h_bare, cell(x, h0)[1])) == 0


def test_lstm_genotype_in_a_language_model():
    """The language model hands the LSTM cell's (h, c) from window to window."""
    from morphnas.tasks.language import LanguageModel, detach_state

    torch.manual_seed(0)
    model = LanguageModel(
        cells.build(KNOWN["lstm"], 6, 6), vocab_size=11, emb_size=6, hidden_size=6
    )
    model.eval()
    tokens = torch.randint(0, 11, (9, 2))
    whole = model(tokens)
    first = model(tokens[:4])
    assert isinstance(first.state, tuple) and len(first.state) == 2
    second = model(tokens[4:], detach_state(first.state))
    logits = torch.cat([first.logits, second.logits])
    torch.testing.assert_close(logits, whole.logits, rtol=0, atol=1e-6)
    # dropping c at the window boundary changes the result: c is really carried
    cut = model(tokens[4:], first.state[0])
    assert not torch.allclose(cut.logits, second.logits)


def test_known_cell_parameter_counts():
    """The two-input GRU/LSTM hold more weights than torch's (each gate's [A; B] is 2d × d,
    and the identity-like nodes have weights too): five weighted nodes each, plus W_x, b_x."""
    n_gru = sum(p.numel() for p in TwoInputCell(KNOWN["gru"], N_IN, D).parameters())
    n_lstm = sum(p.numel() for p in TwoInputCell(KNOWN["lstm"], N_IN, D).parameters())
    assert n_gru == N_IN * D + D + 5 * 2 * D * D
    assert n_lstm == N_IN * D + D + 5 * 2 * D * D


@pytest.mark.parametrize(
    "overrides",
    [
        {"data": {"dataset": "synthetic", "window": 6}, "space": {"hidden": 6}},
        {"task": "lm", "data": {"dataset": "tiny"}, "space": {"hidden": 6}, "lm": {"bptt": 8}},
    ],
    ids=["forecast", "lm"],
)
def test_baseline_names_pick_torch_or_known(overrides):
    """``lstm``/``gru`` are torch.nn's even though KNOWN has cells of those names; the
    ``*_genotype`` baselines are KNOWN's cells, fresh; all pass the config's validation."""
    from morphnas import api, config, tasks
    from morphnas.cells.baselines import RecurrentBaseline

    names = ["lstm", "gru", "lstm_genotype", "gru_genotype", "darts_v2"]
    run = config.resolve(overrides={**overrides, "train": {"baselines": names}})
    data = tasks.kind_for(run).load()
    built = {name: api._build_model(name, run, data).cell for name in names}
    for torch_name in ("lstm", "gru"):
        cell = built[torch_name]
        assert isinstance(cell, RecurrentBaseline) and cell.kind == torch_name
        assert built[f"{torch_name}_genotype"].genotype == KNOWN[torch_name]
    assert built["darts_v2"].genotype == KNOWN["darts_v2"]


# --------------------------------------------------------------------------------------------
# cell_state in the genotype's JSON
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_known_round_trip(name, tmp_path):
    g = KNOWN[name]
    data = json.loads(g.to_json())
    assert data["version"] == gt.VERSION == 3 and data["cell_state"] == g.cell_state
    back = gt.from_json(g.to_json())
    assert back == g and back.cell_state == g.cell_state and back.to_json() == g.to_json()
    g.save(tmp_path / "g.json")
    assert gt.load(tmp_path / "g.json") == g
    assert gt.load_or_known(name) == g


def test_lstm_text_names_c():
    text = str(KNOWN["lstm"])
    assert "c_t = s7" in text and "s5 = hadamard(s2, c)" in text


def test_version_1_file_still_loads():
    text = """{
      "format": "morphnas.genotype",
      "version": 1,
      "space": "two_input",
      "output": "last",
      "output_activation": "tanh",
      "nodes": [
        {"op": "add_sigmoid", "inputs": [0, -1], "residual": false},
        {"op": "hadamard", "inputs": [1, 0]}
      ],
      "metadata": {"seed": 1}
    }"""
    g = gt.from_json(text)
    assert g == Genotype(
        "two_input",
        (Node("add_sigmoid", (0, -1)), Node("hadamard", (1, 0))),
        output="last",
        output_activation="tanh",
    )
    assert g.cell_state is None and g.metadata == {"seed": 1}
    assert json.loads(g.to_json())["version"] == 3  # written back as the current version


def dict_with(**changes) -> str:
    data = json.loads(KNOWN["lstm"].to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (dict_with(cell_state=0), ("cell_state 0 is not a node", "1..9")),
        (dict_with(cell_state=10), ("cell_state 10 is not a node", "1..9")),
        (dict_with(cell_state=-2), ("cell_state -2 is not a node",)),
        (dict_with(cell_state="7"), ("cell_state '7' is not a node",)),
        (dict_with(cell_state=True), ("cell_state True is not a node",)),
        (
            dict_with(cell_state=None),
            ("node 5 reads state -2", "only in a cell with a 'cell_state'"),
        ),
        (dict_with(version=1), ("'cell_state' needs genotype version 2",)),
        (
            json.dumps({**json.loads(KNOWN["darts_v2"].to_json()), "cell_state": 1}),
            ("'cell_state' is for two_input cells",),
        ),
    ],
    ids=["zero", "past_end", "negative", "string", "bool", "unset_but_read", "v1", "darts"],
)
def test_bad_cell_state_is_refused_in_one_line(text, fragments):
    with pytest.raises(UserError) as info:
        gt.from_json(text)
    message = str(info.value)
    assert "\n" not in message and message.startswith("genotype:"), message
    for fragment in fragments:
        assert fragment in message, message


def test_darts_rnn_refuses_cell_state_in_python_too():
    with pytest.raises(UserError, match="'cell_state' is for two_input cells"):
        Genotype("darts_rnn", (Node("tanh", (0,)),), cell_state=1)
