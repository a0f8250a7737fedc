"""The E2NAS latent space: choice tables, the graph VAE, and its on-disk cache."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from morphnas.genotype import Genotype, Node
from morphnas.latent import ChoiceTable, GraphVae, TrainConfig, load_or_train, train_vae
from morphnas.latent.cache import cache_dir, cache_path
from morphnas.latent.vae import heldout_positions, suggested_nz
from morphnas.spaces import build

# (space, nodes, options): darts_rnn, two_input's default wiring, and input choice.
CASES = {
    "darts_rnn-4": ("darts_rnn", 4, {}),
    "darts_rnn-8": ("darts_rnn", 8, {}),
    "two_input-chain-4": ("two_input", 4, {}),
    "two_input-chain-8": ("two_input", 8, {}),
    "two_input-search-4": ("two_input", 4, {"wiring": "search"}),
    "two_input-search-8": ("two_input", 8, {"wiring": "search"}),
}
# The 8-node cases train for one to four minutes each on a 2-core CPU: `make test-long`.
LONG = {name for name, case in CASES.items() if case[1] == 8}
SMALL = {
    **{k: v for k, v in CASES.items() if v[1] == 4},
    "two_input-cell_state-3": ("two_input", 3, {"wiring": "search", "cell_state": 3}),
    "darts_rnn-subset-3": ("darts_rnn", 3, {"primitives": ("none", "tanh", "relu")}),
}
FIGURES: dict[str, dict] = {}  # acceptance figures, printed by test_reconstruction


def make_table(space: str, nodes: int, options: dict) -> ChoiceTable:
    return ChoiceTable.from_space(build(space, 2, 4, nodes, **options))


@pytest.fixture(scope="module")
def tables() -> dict[str, ChoiceTable]:
    return {name: make_table(*case) for name, case in {**CASES, **SMALL}.items()}


# ---- ChoiceTable ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
def test_table_round_trip_every_entry(tables, name):
    """Every allowed entry of every node maps to its Node and back (genotype <-> choices)."""
    table = tables[name]
    for i in range(table.nodes):
        for entry, node in zip(table.entries[i], table.nodes_of[i], strict=True):
            choices = [table.entries[k][0] for k in range(table.nodes)]
            choices[i] = entry
            genotype = table.genotype(choices)
            assert genotype.nodes[i] == node
            assert table.choices(genotype) == tuple(choices)
            assert table.flat(table.positions(choices)) == tuple(choices)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_table_matches_the_supernet(tables, name):
    """No ``none`` entry is allowed, every other one is, and a derived genotype is in the table
    with the supernet's output rule."""
    space, nodes, options = SMALL[name]
    cell = build(space, 2, 4, nodes, **options)
    table = tables[name]
    for i, alpha in enumerate(cell.arch):
        columns = alpha.shape[-1]
        none = [k for k, op in enumerate(cell.op_names) if op == "none"]
        expected = [e for e in range(alpha.numel()) if e % columns not in none]
        assert list(table.entries[i]) == expected
        assert table.shapes[i] == tuple(alpha.shape)
    derived = cell.derive()
    again = table.genotype(table.choices(derived))
    assert again == derived


def test_table_refuses_a_foreign_genotype(tables):
    table = tables["two_input-chain-4"]
    wrong_inputs = Genotype(
        "two_input", tuple(Node("add", (0, -1)) for _ in range(4)), output_activation="tanh"
    )
    with pytest.raises(ValueError, match="node 2"):
        table.choices(wrong_inputs)
    with pytest.raises(ValueError, match="3-node"):
        table.choices(Genotype("darts_rnn", tuple(Node("tanh", (0,)) for _ in range(3))))
    with pytest.raises(ValueError, match="not an allowed choice"):
        table.genotype([0, 1, 1, 1])  # entry 0 is 'none'


def test_table_key_names_what_it_depends_on():
    a = make_table("two_input", 4, {})
    assert a.key == make_table("two_input", 4, {}).key
    others = [
        make_table("two_input", 5, {}),
        make_table("two_input", 4, {"wiring": "input"}),
        make_table("two_input", 4, {"output": "mean"}),
        make_table("two_input", 4, {"ops": ("none", "add", "hadamard")}),
        make_table("two_input", 4, {"wiring": "search", "cell_state": 2}),
    ]
    assert len({a.key, *(t.key for t in others)}) == 1 + len(others)


def test_sample_is_uniform_positions_and_reproducible(tables):
    table = tables["darts_rnn-4"]
    a = table.sample(4000, torch.Generator().manual_seed(3))
    b = table.sample(4000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (4000, 4)
    for i, entries in enumerate(table.entries):
        counts = torch.bincount(a[:, i], minlength=len(entries))
        assert len(counts) == len(entries) and counts.min() > 0
        assert counts.max() < 2.0 * counts.float().mean()


# ---- GraphVae ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
def test_node_probs_shapes_zeros_sums_and_gradient(tables, name):
    table = tables[name]
    torch.manual_seed(0)
    vae = GraphVae(table, nz=8, hs=16)
    z = torch.randn(8, requires_grad=True)
    probs, chosen = vae.node_probs(z)
    assert len(probs) == len(chosen) == table.nodes
    total = 0.0
    for i, p in enumerate(probs):
        assert p.shape == table.shapes[i]
        flat = p.reshape(-1)
        allowed = torch.zeros_like(flat, dtype=torch.bool)
        allowed[list(table.entries[i])] = True
        assert torch.all(flat[~allowed] == 0) and torch.all(flat[allowed] > 0)
        assert torch.isclose(flat.sum(), torch.tensor(1.0), atol=1e-5)
        assert chosen[i] in table.entries[i]
        assert chosen[i] == int(flat.argmax())  # argmax decoding picks the node's mode
        total = total + p.reshape(-1)[table.entries[i][-1]]
    total.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_decode_is_deterministic_and_the_argmax_path(tables):
    table = tables["two_input-search-4"]
    torch.manual_seed(1)
    vae = GraphVae(table, nz=8, hs=16)
    for seed in range(5):
        z = torch.randn(8, generator=torch.Generator().manual_seed(seed))
        first = vae.decode(z)
        assert first == vae.decode(z) == vae.node_probs(z)[1]
        table.genotype(first)  # a valid genotype of the table


def test_sampled_decoding_is_reproducible_and_varies(tables):
    table = tables["darts_rnn-4"]
    torch.manual_seed(2)
    vae = GraphVae(table, nz=8, hs=16)
    z = torch.zeros(8)
    draws = [
        vae.node_probs(z, sample=True, generator=torch.Generator().manual_seed(s))[1]
        for s in range(20)
    ]
    again = [
        vae.node_probs(z, sample=True, generator=torch.Generator().manual_seed(s))[1]
        for s in range(20)
    ]
    assert draws == again
    assert len({tuple(d) for d in draws}) > 1  # an untrained decoder is far from one-hot


def test_log_likelihood_is_a_normalised_teacher_forced_log_prob():
    """Over every genotype of a small table the teacher-forced probabilities sum to 1, and each
    equals the product of ``node_probs`` along its own path."""
    table = make_table("two_input", 2, {"wiring": "search"})
    torch.manual_seed(3)
    vae = GraphVae(table, nz=4, hs=8)
    z = torch.randn(4)
    everything = table.enumerate_all()
    log_p = vae.log_likelihood(z.expand(len(everything), -1), everything)
    assert torch.isclose(log_p.exp().sum(), torch.tensor(1.0), atol=1e-4)
    # The argmax path's probability from node_probs equals its teacher-forced one.
    probs, chosen = vae.node_probs(z)
    product = torch.stack([p.reshape(-1)[e] for p, e in zip(probs, chosen, strict=True)]).prod()
    row = torch.tensor([table.positions(chosen)])
    assert torch.isclose(vae.log_likelihood(z[None], row).exp()[0], product, atol=1e-5)


def test_training_is_deterministic_and_restores_global_state():
    table = make_table("two_input", 2, {})
    cfg = TrainConfig(max_steps=20, eval_every=10)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, info = train_vae(table, nz=4, hs=8, seed=5, config=cfg)
    assert torch.equal(torch.rand(1), before)  # the global RNG stream is untouched
    assert torch.get_num_threads() == threads
    b, _ = train_vae(table, nz=4, hs=8, seed=5, config=cfg)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert info["evaluated"] == 49 and info["heldout"] is False  # 7² genotypes: all measured


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.long] if n in LONG else []) for n in CASES]
)
def test_reconstruction(tables, name):
    """The issue's acceptance: decode(encode(a)) == a for ≥ 99 % of 1,000 held-out genotypes."""
    table = tables[name]
    start = time.perf_counter()
    nz = suggested_nz(table)
    vae, info = train_vae(table, nz=nz, seed=0)
    seconds = time.perf_counter() - start
    heldout, held = heldout_positions(table, seed=0)
    assert held and len(heldout) == 1000
    mu, _ = vae.encode(heldout)
    flat = vae.flat_entries(heldout)
    exact = sum(vae.decode(mu[k]) == flat[k].tolist() for k in range(len(heldout))) / 1000
    FIGURES[name] = {
        "accuracy": exact,
        "seconds": round(seconds, 1),
        "steps": info["steps"],
        "nz": nz,
    }
    print(
        f"\n{name}: held-out exact reconstruction {exact:.3f}, {seconds:.1f} s, "
        f"{info['steps']} steps; all so far: {FIGURES}"
    )
    assert exact == pytest.approx(info["accuracy"])
    assert exact >= 0.99


# ---- cache ---------------------------------------------------------------------------------------

TINY = TrainConfig(max_steps=30, eval_every=15)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MORPHNAS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "e2nas"
    monkeypatch.delenv("MORPHNAS_CACHE")
    assert cache_dir().parts[-3:] == (".cache", "morphnas", "e2nas")


def test_second_load_is_cached_and_identical(monkeypatch, tmp_path):
    monkeypatch.setenv("MORPHNAS_CACHE", str(tmp_path))
    table = make_table("two_input", 2, {"wiring": "search"})
    first, info = load_or_train(table, nz=4, hs=8, config=TINY)
    assert info["cached"] is False and info["seconds"] > 0
    path = cache_path(table, nz=4, hs=8, seed=0)
    assert info["path"] == str(path) and path.exists()
    assert path.name.startswith("two_input-2n-")
    assert not list(path.parent.glob("*.tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second, again = load_or_train(table, nz=4, hs=8, config=TINY)
    assert again["cached"] is True and again["seconds"] == 0.0
    assert again["accuracy"] == pytest.approx(info["accuracy"])
    assert not second.training and not any(p.requires_grad for p in second.parameters())
    for seed in range(10):
        z = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        assert first.decode(z) == second.decode(z)
    # Another size or seed is another file, trained anew.
    _, other = load_or_train(table, nz=5, hs=8, config=TINY)
    assert other["cached"] is False and other["path"] != info["path"]


def test_corrupt_cache_file_is_rebuilt_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("MORPHNAS_CACHE", str(tmp_path))
    table = make_table("darts_rnn", 2, {})
    load_or_train(table, nz=4, hs=8, config=TINY)
    path = cache_path(table, nz=4, hs=8, seed=0)
    path.write_bytes(b"\x00garbage\xff" * 10)
    messages: list[str] = []
    _, info = load_or_train(table, nz=4, hs=8, config=TINY, warn=messages.append)
    assert info["cached"] is False
    assert len(messages) == 1 and "\n" not in messages[0] and "unreadable" in messages[0]
    # The rebuilt file is good again.
    _, again = load_or_train(table, nz=4, hs=8, config=TINY, warn=messages.append)
    assert again["cached"] is True and len(messages) == 1
    # The default warn is warnings.warn.
    path.write_bytes(b"")
    with pytest.warns(UserWarning, match="unreadable"):
        load_or_train(table, nz=4, hs=8, config=TINY)


def test_cache_file_of_another_table_is_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv("MORPHNAS_CACHE", str(tmp_path))
    table = make_table("two_input", 2, {})
    other = make_table("two_input", 2, {"ops": ("none", "add", "hadamard")})
    load_or_train(other, nz=4, hs=8, config=TINY)
    # A file of ``other`` put where ``table``'s belongs (renamed, or a hash collision).
    cache_path(other, nz=4, hs=8, seed=0).rename(cache_path(table, nz=4, hs=8, seed=0))
    messages: list[str] = []
    vae, info = load_or_train(table, nz=4, hs=8, config=TINY, warn=messages.append)
    assert info["cached"] is False
    assert len(messages) == 1 and "another key" in messages[0]
    assert len(vae.layouts[0].entries) == 7  # built for ``table``, not ``other``
    _, again = load_or_train(table, nz=4, hs=8, config=TINY, warn=messages.append)
    assert again["cached"] is True and len(messages) == 1
