"""The native (C++) kernels, the DARTS supernet's and the derived cells', beyond the float64
checks of ``test_fused`` and ``test_fused_cells``: float32, where they compute ``exp`` by
their own vectorised polynomial; rows split across threads; the build, the fallback to the Python
kernels when it fails, and ``MORPHNAS_NATIVE`` (the CLI's one-line error for a bad value:
``test_runtime``)."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from morphnas import cells, native
from morphnas.errors import UserError
from morphnas.genotype import Genotype, Node
from morphnas.spaces import DartsRNNSearchCell, TwoInputSearchCell

STEPS, BATCH, N_IN, D = 12, 16, 8, 32


def float32_cell(training: bool) -> DartsRNNSearchCell:
    """Every node kind: mixed, grown (residual, non-zero γ) and fixed; dropout; BatchNorm with
    moved running statistics; large activations, so that ``exp`` sees a wide range."""
    torch.manual_seed(0)
    cell = DartsRNNSearchCell(N_IN, D, nodes=4, dropout_x=0.2, dropout_h=0.3)
    cell.grow()
    with torch.no_grad():
        for a in cell.arch:
            a.normal_()
        for g in cell.gammas.values():
            g.normal_()
        for w in cell.node_weights:
            w.mul_(8.0)
        cell.bn.running_mean.normal_(0, 0.3)
        cell.bn.running_var.uniform_(0.5, 1.5)
    cell.fixed[3] = Node("tanh", (1,))
    return cell.train(training)


GROWN_DERIVED = Genotype(  # every activation, a shared parent, residual nodes, tanh squash
    "darts_rnn",
    (
        Node("relu", (0,)),
        Node("tanh", (1,)),
        Node("identity", (1,), residual=True),
        Node("sigmoid", (3,), residual=True),
        Node("tanh", (0,)),
    ),
    output="mean",
    output_activation="tanh",
)


def derived_cell(genotype: Genotype, scale: float, training: bool, hidden: int) -> torch.nn.Module:
    """A derived cell of ``genotype`` with non-zero γ, dropout, and weights ``scale`` times their
    initial range: large enough that ``exp`` sees a wide range, not so large that float32 itself
    loses the recurrence (the DARTS cell at ×35 already does)."""
    torch.manual_seed(0)
    cell = cells.build(genotype, N_IN, hidden, dropout_x=0.2, dropout_h=0.3)
    with torch.no_grad():
        for g in cell.gammas.values():
            g.normal_()
        for w in cell.node_weights:
            w.mul_(scale)
    return cell.train(training)


def float32_derived_cell(training: bool, hidden: int = D) -> torch.nn.Module:
    return derived_cell(GROWN_DERIVED, 20.0, training, hidden)


GROWN_TWO_INPUT = Genotype(  # every op, both add activations that exp, u and h read, residuals
    "two_input",
    (
        Node("add_sigmoid", (0, -1)),
        Node("add_tanh", (0, -1)),
        Node("hadamard", (1, 2)),
        Node("highway", (3, 0)),
        Node("add_relu", (4, 1), residual=True),
        Node("add", (5, -1), residual=True),
    ),
    output="mean",
    output_activation="tanh",
)


def float32_two_input_cell(training: bool, hidden: int = D) -> torch.nn.Module:
    return derived_cell(GROWN_TWO_INPUT, 4.0, training, hidden)


def float32_two_input_supernet(hidden: int = D, wiring: str = "chain") -> torch.nn.Module:
    """The two-input search cell with every op, grown, with BatchNorm and dropout; under
    ``wiring: search`` its nodes read their slots' mixtures of the states."""
    torch.manual_seed(0)
    cell = TwoInputSearchCell(N_IN, hidden, nodes=3, dropout_x=0.2, dropout_h=0.3, wiring=wiring)
    cell.grow()
    with torch.no_grad():
        for a in cell.arch:
            a.normal_()
    return cell


def native_path(out: torch.Tensor) -> bool:
    """Whether the sequence kernel behind ``out`` ran natively."""
    return out.grad_fn.native is not None


def outputs_and_grads(cell: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(1)  # the same dropout masks
    out, _ = cell(x)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * probe).sum(), list(cell.parameters()), allow_unused=True)
    return [out.detach()] + [g for g in grads if g is not None]


CELLS = {
    "supernet": float32_cell,
    "derived": float32_derived_cell,
    "two_input": float32_two_input_cell,
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make", list(CELLS))
def test_float32_native_kernel_matches_the_float64_eager_loop(make, training):
    """The native kernel in float32 against the eager loop in float64 (the truth up to float32
    rounding), and no further from it than the Python kernel in float32."""
    cell = CELLS[make](training)
    assert native_path(cell(torch.randn(2, 2, N_IN))[0]), "the native kernels did not build"
    truth = copy.deepcopy(cell).double()
    truth.fused = False
    x = torch.randn(STEPS, BATCH, N_IN, generator=torch.Generator().manual_seed(2))
    expected = outputs_and_grads(truth, x.double())
    ours = outputs_and_grads(copy.deepcopy(cell), x)
    with native.python_kernels():
        python = outputs_and_grads(copy.deepcopy(cell), x)
    assert len(ours) == len(expected) == len(python)
    for got, py, want in zip(ours, python, expected, strict=True):
        scale = want.abs().max().item()
        error = (got.double() - want).abs().max().item() / scale
        python_error = (py.double() - want).abs().max().item() / scale
        assert error < 1e-4, error
        assert error < 10 * python_error + 1e-6, (error, python_error)


def test_the_native_kernel_updates_batchnorm_statistics_as_the_python_one():
    cell = float32_cell(training=True)
    other = copy.deepcopy(cell)
    x = torch.randn(STEPS, BATCH, N_IN)
    torch.manual_seed(1)  # the same dropout masks
    cell(x)
    torch.manual_seed(1)
    with native.python_kernels():
        other(x)
    torch.testing.assert_close(cell.bn.running_mean, other.bn.running_mean)
    torch.testing.assert_close(cell.bn.running_var, other.bn.running_var)
    assert int(cell.bn.num_batches_tracked) == int(other.bn.num_batches_tracked) > 0


def split_supernet() -> torch.nn.Module:
    torch.manual_seed(0)
    cell = DartsRNNSearchCell(N_IN, 16, nodes=3, dropout_x=0.2, dropout_h=0.3).double()
    cell.grow()
    return cell


@pytest.mark.parametrize(
    ("make", "threads"),
    [
        (split_supernet, 2),
        (split_supernet, 3),
        (lambda: split_supernet().eval(), 3),
        (lambda: float32_derived_cell(True, 16).double(), 2),
        (lambda: float32_derived_cell(True, 16).double(), 3),
        (lambda: float32_two_input_cell(True, 16).double(), 2),
        (lambda: float32_two_input_cell(True, 16).double(), 3),
        (lambda: float32_two_input_supernet(16).double(), 2),
        (lambda: float32_two_input_supernet(16).double(), 3),
        (lambda: float32_two_input_supernet(16).double().eval(), 3),
        (lambda: float32_two_input_supernet(16, "search").double(), 3),
    ],
    ids=[
        "supernet",
        "supernet-3",
        "supernet-3-eval",
        "derived",
        "derived-3",
        "two_input",
        "two_input-3",
        "two_input_supernet",
        "two_input_supernet-3",
        "two_input_supernet-3-eval",
        "two_input_supernet-3-search",
    ],
)
def test_rows_split_across_threads_give_the_one_thread_result(make, threads):
    """Batch rows split across threads against one thread, in float64, with a batch large
    enough that every node's loop is split and that does not divide evenly: the supernet's
    parts (one a thread, their BatchNorm sums pooled; ``in_parts``), the derived cells' parts,
    the two-input supernet's parts."""
    cell = make()
    assert native_path(cell(torch.randn(2, 2, N_IN, dtype=torch.float64))[0])
    x = torch.randn(STEPS, 251, N_IN, dtype=torch.float64)
    saved = torch.get_num_threads()
    results = []
    try:
        for count in (1, threads):
            torch.set_num_threads(count)
            run = copy.deepcopy(cell)
            results.append(outputs_and_grads(run, x) + list(run.buffers()))
    finally:
        torch.set_num_threads(saved)
    for one, split in zip(*results, strict=True):  # the BatchNorm's running statistics too
        torch.testing.assert_close(split, one, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [split_supernet, lambda: float32_two_input_supernet(16)],
    ids=["supernet", "two_input_supernet"],
)
def test_two_threads_give_the_same_bits_every_run(make):
    """The reductions of rows split across threads are merged in the chunks' order, not in
    the order threads finish: runs at one thread count agree to the bit (float32 here, where
    a different order of the partial sums would show)."""
    cell = make().float()
    assert native_path(cell(torch.randn(2, 2, N_IN))[0])
    x = torch.randn(STEPS, 256, N_IN)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = [outputs_and_grads(copy.deepcopy(cell), x) for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(run, runs[0], strict=True):
            assert torch.equal(a, b)


def test_a_failed_build_warns_once_and_the_python_kernel_runs(monkeypatch):
    """No compiler, or a build error: one warning naming the compiler's error, then the cell
    trains on the Python kernel."""
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("Error building extension:\n[1/2] c++ ...\nx.cpp:3:1: error: boom\n")

    monkeypatch.setattr("torch.utils.cpp_extension.load", failing_load)
    monkeypatch.setattr(native, "_build", functools.cache(native._build.__wrapped__))
    with pytest.warns(RuntimeWarning, match="error: boom") as warned:
        assert native.darts_supernet() is None
        assert native.darts_cell() is None
        assert native.two_input_cell() is None
        assert native.darts_supernet() is None
    assert len(warned) == 1 and len(calls) == 1
    for make in CELLS.values():
        cell = make(True)
        out, _ = cell(torch.randn(STEPS, BATCH, N_IN))
        assert not native_path(out)
        out.sum().backward()
        assert all(p.grad is not None for p in cell.node_weights)


@pytest.mark.parametrize(
    "kernel", [native.darts_supernet, native.darts_cell, native.two_input_cell]
)
def test_off_and_suspended_mean_the_python_kernel(monkeypatch, kernel):
    monkeypatch.setenv(native.NATIVE_ENV, "off")
    assert kernel() is None
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    assert kernel() is not None
    with native.python_kernels():
        assert kernel() is None
    assert kernel() is not None


def test_the_install_step_builds_the_kernels_or_says_why_not(monkeypatch, capsys):
    """``python -m morphnas.native`` (``make setup``): the library ready in the cache after it;
    with the kernels off, nothing built; a failed build is a warning, not a failed install."""
    from morphnas.native.__main__ import main

    main()
    assert "native kernels ready" in capsys.readouterr().out
    assert native.darts_supernet() is not None
    monkeypatch.setenv(native.NATIVE_ENV, "off")
    main()
    assert "nothing to build" in capsys.readouterr().out
    monkeypatch.setenv(native.NATIVE_ENV, "auto")

    def failing_load(**kwargs):
        raise RuntimeError("x.cpp:3:1: error: boom")

    monkeypatch.setattr("torch.utils.cpp_extension.load", failing_load)
    monkeypatch.setattr(native, "_build", functools.cache(native._build.__wrapped__))
    with pytest.warns(RuntimeWarning, match="error: boom"):
        main()
    assert "the Python kernels will run" in capsys.readouterr().out


def test_an_unknown_native_choice_is_a_user_error(monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "fast")
    with pytest.raises(UserError, match="auto or off"):
        native.darts_supernet()


@pytest.mark.parametrize("path", ["/usr/bin:/bin", ""])
def test_the_build_runs_the_packaged_ninja_whatever_is_on_path(monkeypatch, tmp_path, path):
    """Activated or not, with another ninja on ``PATH`` (Debian's, here a stand-in) or none:
    the build runs the ``ninja`` package's binary, since two versions rebuild each other's
    library, and the caller's ``PATH`` is back after it."""
    import ninja

    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\necho 1.11.1\n")
    (other / "ninja").chmod(0o755)
    path = os.pathsep.join(filter(None, [str(other), path]))
    monkeypatch.setenv("PATH", path)
    assert shutil.which("ninja") == str(other / "ninja")
    with native._packaged_ninja():
        assert Path(shutil.which("ninja")).parent == Path(ninja.BIN_DIR)
    assert os.environ["PATH"] == path


def test_the_build_is_named_for_the_sources_and_flags(monkeypatch, tmp_path):
    """Another version of the kernels' sources or compiler flags gets another build (and cache
    entry), so two versions sharing torch's extension cache never load each other's library."""
    for name in ("kernels.cpp", "common.h"):
        (tmp_path / name).write_text("// v1\n")
    monkeypatch.setattr(native, "_SOURCE_DIR", tmp_path)
    first = native._build_tag()
    assert native._build_tag() == first
    (tmp_path / "common.h").write_text("// v2\n")
    assert native._build_tag() != first
    second = native._build_tag()
    monkeypatch.setattr(native, "_FLAGS", [*native._FLAGS, "-ffp-contract=off"])
    assert native._build_tag() != second  # the same sources compiled otherwise


def test_two_installs_never_share_a_build(monkeypatch, tmp_path):
    """Two installs (two checkouts, each with its virtual environment) sharing torch's extension
    cache: each its own entry, even with the same sources, since torch's ``build.ninja`` names
    the sources' and torch's paths and ninja rebuilds whatever command changed, so one shared
    entry was rebuilt by each in turn. One install keeps one entry; and what is hashed as the
    sources' directory is the one the build is given."""
    trees = [tmp_path / "a" / "native", tmp_path / "b" / "native"]
    for tree in trees:
        tree.mkdir(parents=True)
        for source in native._SOURCE_DIR.glob("*.[ch]*"):
            shutil.copy(source, tree / source.name)
    loads = []

    def recording_load(**kwargs):
        loads.append(kwargs)
        raise RuntimeError("error: not built here")

    monkeypatch.setattr("torch.utils.cpp_extension.load", recording_load)

    def name_and_sources(tree: Path) -> tuple[str, list[str]]:
        monkeypatch.setattr(native, "_SOURCE_DIR", tree)
        tag = native._build_tag()
        with pytest.warns(RuntimeWarning, match="not built here"):
            assert native._build.__wrapped__() is None
        assert loads[-1]["name"] == f"morphnas_kernels_{tag}"
        return tag, loads[-1]["sources"]

    a, a_sources = name_and_sources(trees[0])
    assert name_and_sources(trees[0]) == (a, a_sources)  # the same install: the same entry
    assert a_sources == [str(trees[0] / "kernels.cpp")]
    b, _ = name_and_sources(trees[1])
    assert b != a  # the same sources elsewhere
    (trees[1] / "common.h").write_text("// another version\n")
    assert name_and_sources(trees[1])[0] not in (a, b)

    monkeypatch.setattr(native, "_SOURCE_DIR", trees[0])
    assert native._build_tag() == a
    monkeypatch.setenv("CXX", "clang++")  # another compiler
    assert native._build_tag() != a
    monkeypatch.delenv("CXX")
    other_torch = [str(tmp_path / "venv" / "torch" / "include")]
    monkeypatch.setattr(
        "torch.utils.cpp_extension.include_paths", lambda *args, **kwargs: other_torch
    )
    assert native._build_tag() != a  # another virtual environment's torch
    monkeypatch.undo()
    assert native._build_tag() == native._build_tag()


def test_a_later_process_loads_the_build_without_rebuilding():
    """What ``python -m morphnas.native`` (``make setup``) or a first use built, a later process
    loads from the same entry, named for this install, and leaves as it was."""
    library = Path(native._build().__file__)
    assert library.parent.name == library.stem == f"morphnas_kernels_{native._build_tag()}"
    built = library.stat().st_mtime_ns
    script = "from morphnas import native; print(native._build().__file__)"
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(loaded) == library
    assert library.stat().st_mtime_ns == built


def test_parts_pool_their_sums_over_alternating_rounds():
    """``PartPool``: three parts (more than the cores here) pool six rounds of column sums, the
    two sets of slots alternating; every part sees every round's totals."""
    kernels = native._kernel("testing")
    assert kernels is not None, "the native kernels did not build"
    parts, rounds, width = 3, 6, 4
    totals = torch.tensor(kernels.pooled_rounds(parts, rounds, width, -1, 0))
    r = torch.arange(rounds, dtype=torch.float64).view(rounds, 1)
    j = torch.arange(width, dtype=torch.float64).view(1, width)
    expected = sum(p + r + j for p in range(parts))  # Σ over parts of what part p adds
    assert torch.equal(totals.view(parts, rounds, width), expected.expand(parts, -1, -1))


FAILING_PART = """
from morphnas import native
try:
    native._kernel("testing").pooled_rounds(3, 6, 4, 1, 3)
except RuntimeError as error:
    print(error)
"""


def test_a_part_that_fails_releases_the_others_waiting_at_the_barrier():
    """``in_parts``: part 1 throws in round 3 while parts 0 and 2 wait at that round's barrier;
    they leave it, and part 1's own error (not theirs, "another part failed") reaches Python.
    In a child process with a timeout, because the bug this guards against is a hang."""
    assert native._kernel("testing") is not None, "the native kernels did not build"
    done = subprocess.run(
        [sys.executable, "-c", FAILING_PART], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "part 1 failed"
