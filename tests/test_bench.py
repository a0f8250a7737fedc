"""The benchmark: its reference is right, its FLOP counts are right, its output is complete.

No wall-clock assertions: timings depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from morphnas import bench, cells
from morphnas.bench import (
    DARTS_V2,
    PARTS,
    TWO_INPUT_GATED,
    ReferenceDartsCell,
    bench_table,
    cell_flops,
    multithread_crossover,
    run_bench,
    supernet_flops,
    thread_point,
)
from morphnas.bench import timing as bench_timing
from morphnas.bench.parts import cell as cell_part
from morphnas.bench.parts import supernet as supernet_part
from morphnas.bench.parts.cell import CELL_MODELS, COMPILABLE, COMPILED_SUFFIX
from morphnas.bench.parts.search import SEARCH_VARIANTS
from morphnas.bench.reference import STEP_FLOPS
from morphnas.bench.workloads import CellConfig, SupernetConfig
from morphnas.cli import app
from morphnas.engine.runtime import MULTITHREAD_FROM, choose_threads
from morphnas.errors import UserError
from morphnas.spaces import DartsRNNSearchCell, of_modality
from morphnas.strategies import STRATEGIES

TOL64 = dict(rtol=1e-5, atol=1e-5)

# The documented keys (docs/benchmarks.md, "Output keys"), leaf by leaf.
MACHINE_KEYS = {
    "device", "device_name", "cpu_name", "cpu_count", "torch", "python", "platform", "date",
    "load_average_1min", "malloc", "native", "quick",
}  # fmt: skip
IMPL_KEYS = {"seconds", "threads", "peak_mb", "gflops", "fraction_of_matmul"}
SUPERNET_KEYS = {
    "config", "gflop", "max_abs_diff", "agreement_steps", "matmul_gflops", "ours", "reference",
}  # fmt: skip
# On CPU with the native kernel built (as here, where it must build): the Python kernel too.
PYTHON_KERNEL_KEYS = {"ours_python", "speedup_python_kernel"}
PYTHON_CELLS = {"darts_python", "two_input_python"}  # ... and the derived cells on theirs
SEARCH_KEYS = {"seconds_per_epoch", "batches_per_epoch", "threads", "config"}
THREADS_KEYS = {
    "config", "candidates", "points", "crossover_product", "multithread_from", "policy_mismatches",
}  # fmt: skip
# ``compile=True`` adds a compiled copy of every derived cell (LSTM/GRU are fused already).
COMPILED = {name + COMPILED_SUFFIX for name in COMPILABLE}
COMPILED_KEYS = IMPL_KEYS | {"gflop", "compiled", "compile_seconds", "max_abs_diff"}
THREAD_POINT_KEYS = {
    "batch", "hidden", "product", "seconds", "faster_threads", "all_cores_faster",
    "speedup_all_cores", "policy_threads", "policy_agrees",
}  # fmt: skip


def _pair(seed: int = 0, **options) -> tuple[DartsRNNSearchCell, ReferenceDartsCell]:
    torch.manual_seed(seed)
    ours = DartsRNNSearchCell(5, 6, nodes=3, **options).double()
    return ours, ReferenceDartsCell.copy_of(ours)


def _run(module: torch.nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)  # the same dropout masks in both cells
    return module(x)


def test_reference_computes_the_fused_cell_outputs_and_gradients():
    ours, reference = _pair(dropout_x=0.3, dropout_h=0.2)
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    probe = torch.randn(4, 7, 6, dtype=torch.float64)
    out_ours, h_ours = _run(ours, x, seed=3)
    out_ref, h_ref = _run(reference, x, seed=3)
    torch.testing.assert_close(out_ours, out_ref, **TOL64)
    torch.testing.assert_close(h_ours, h_ref, **TOL64)

    (out_ours * probe).sum().backward()
    (out_ref * probe).sum().backward()
    torch.testing.assert_close(ours.init_weight.grad, reference._W0.grad, **TOL64)
    for mine, theirs in zip(ours.node_weights, reference._Ws, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, **TOL64)
    arch_grad = torch.cat([alpha.grad for alpha in ours.arch])
    torch.testing.assert_close(arch_grad, reference.weights.grad, **TOL64)


def test_reference_agrees_in_eval_mode_without_dropout_masks():
    ours, reference = _pair(seed=1, dropout_x=0.5, dropout_h=0.5)
    ours.eval()
    reference.eval()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    h0 = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x, h0)[0], reference(x, h0)[0], **TOL64)


def test_reference_refuses_a_grown_supernet():
    ours, _ = _pair()
    ours.grow()
    with pytest.raises(ValueError, match="plain DARTS supernet"):
        ReferenceDartsCell.copy_of(ours)


def test_supernet_flops_equal_a_hand_count():
    # B=2, input 3, hidden 3, 2 nodes, one step. Init GEMM (2×6)@(6×6): 72 multiply-adds;
    # node 1, one edge (2×3)@(3×6): 36; node 2, two edges: 72. 180 MACs = 360 FLOPs forward,
    # ×3 with the backward.
    assert supernet_flops(batch=2, input_size=3, hidden=3, bptt=1, nodes=2) == 1080
    assert supernet_flops(batch=2, input_size=3, hidden=3, bptt=4, nodes=2) == 4 * 1080


def test_cell_flops_equal_a_hand_count():
    # LSTM, B=2, input 3, hidden 4: (2×3)@(3×16) + (2×4)@(4×16) = 96 + 128 MACs = 448 FLOPs.
    assert cell_flops("lstm", batch=2, input_size=3, hidden=4, bptt=1) == 3 * 448
    assert cell_flops("gru", batch=2, input_size=3, hidden=4, bptt=1) == 3 * 336
    # Two-input gated cell, B=2, input 3, hidden 4: input projection (2×3)@(3×4) = 24 MACs;
    # add_sigmoid, add_tanh: (2×8)@(8×4) = 64 each; hadamard: none; highway (2×4)@(4×8) = 64.
    assert cell_flops(TWO_INPUT_GATED, batch=2, input_size=3, hidden=4, bptt=1) == 3 * 2 * 216


def test_every_registered_space_has_a_flop_count(monkeypatch):
    assert set(STEP_FLOPS) == set(of_modality("sequences"))
    monkeypatch.delitem(STEP_FLOPS, "two_input")  # a space without one is named, not guessed
    with pytest.raises(ValueError, match=r"'two_input'; known: \['darts_rnn'\]"):
        cell_flops(TWO_INPUT_GATED, batch=2, input_size=3, hidden=4, bptt=1)


@pytest.mark.parametrize(
    ("name", "genotype"), [("darts", DARTS_V2), ("two_input", TWO_INPUT_GATED)]
)
def test_eager_models_are_the_same_cells_without_their_kernels(name, genotype):
    """``cell.<config>.<model>_eager`` is the kernel's side-by-side baseline: same genotype and
    FLOPs, eager loop; only the kernel-backed cells are compiled under ``--compile``."""
    assert CELL_MODELS[name + "_eager"] is CELL_MODELS[name] is genotype
    assert cell_part._cell_module(name, genotype, 4).fused
    assert not cell_part._cell_module(name + "_eager", genotype, 4).fused
    assert COMPILABLE == ("darts", "two_input")


# Matmuls on the states. The fused kernel also mixes each edge's activations with a ``bmm`` of
# inner size ``len(activations)``: the elementwise mixing the formulas leave out, as for the others.
MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm}


def _forward_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if op in MATMULS)


def test_flop_formulas_match_pytorchs_counter_on_the_forward():
    """The counted forward is a third of the formula (the ×3 is the backward convention)."""
    ours, reference = _pair()
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    expected = supernet_flops(batch=2, input_size=5, hidden=6, bptt=3, nodes=3) // 3
    assert _forward_flops(ours, x) == expected
    assert _forward_flops(reference, x) == expected
    for genotype in (DARTS_V2, TWO_INPUT_GATED):
        # The formula counts the cell's matmuls, on its eager loop; the DARTS kernel adds one
        # (1, N) @ (N, B·d) per step for the mean of the nodes (1/(2d) of a node's), uncounted.
        cell = cells.build(genotype, 5, 6, fused=False).double()
        assert _forward_flops(cell, x) == cell_flops(genotype, 2, 5, 6, 3) // 3


def test_run_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown bench part"):
        run_bench(["nope"], quick=True)
    with pytest.raises(UserError, match="device"):
        run_bench(quick=True, device="tpu")
    with pytest.raises(ValueError, match="repeats"):
        run_bench(quick=True, repeats=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="no CUDA GPU"):
        run_bench(quick=True, device="cuda")


@pytest.fixture(scope="session")  # once per process, whichever modules a worker interleaves
def quick_result():
    threads = torch.get_num_threads()
    result = run_bench(quick=True)
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    return result


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _check_impl(entry: dict) -> None:
    assert set(entry) >= IMPL_KEYS
    assert all(_positive(entry[k]) for k in IMPL_KEYS - {"peak_mb"})
    # A tiny step can fit in pages that are already resident; never negative, though.
    assert entry["peak_mb"] is not None and entry["peak_mb"] >= 0


def test_quick_run_has_every_documented_key(quick_result):
    r = quick_result
    assert set(r) == {
        "machine", "matmul", "matmul_gflops", "supernet_two_input", "supernet_cnn",
        "wall_seconds", *PARTS,
    }  # fmt: skip
    assert set(r["machine"]) == MACHINE_KEYS
    wall = r["wall_seconds"]
    assert list(wall) == ["setup", *PARTS, "ceiling", "total"]  # in the order they ran
    assert all(_positive(seconds) for seconds in wall.values())
    assert sum(wall[part] for part in ["setup", *PARTS, "ceiling"]) <= wall["total"]
    assert set(r["matmul"]) == {"size", "threads", "gflops", "readings"}
    readings = r["matmul"]["readings"]
    assert len(readings) == 2 and all(_positive(gflops) for gflops in readings)  # before, after
    assert r["matmul_gflops"] == r["matmul"]["gflops"] == max(readings)
    timed = [
        (entry["matmul_gflops"], impl) for part in ("supernet", "cell")
        for entry in r[part].values() for impl in entry.values()
        if isinstance(impl, dict) and "gflops" in impl
    ]  # fmt: skip
    assert len(timed) == 2 * 3 + 2 * (len(CELL_MODELS) + len(PYTHON_CELLS))
    for ceiling, impl in timed:  # against the matmul timed in the same rounds
        assert _positive(ceiling)
        assert impl["fraction_of_matmul"] == pytest.approx(impl["gflops"] / ceiling)
    for name in ("small", "darts"):
        entry = r["supernet"][name]
        assert set(entry) == SUPERNET_KEYS | PYTHON_KERNEL_KEYS | {"speedup"}
        assert set(entry["config"]) == {"batch", "hidden", "bptt", "nodes"}
        assert _positive(entry["gflop"]) and _positive(entry["speedup"])
        assert _positive(entry["speedup_python_kernel"])
        assert 0 <= entry["max_abs_diff"] <= 1e-4
        for impl in ("ours", "ours_python", "reference"):
            _check_impl(entry[impl])
    kernels = r["machine"]["native"]
    assert set(kernels) == {"darts_supernet", "darts_cell", "two_input_cell", "two_input_supernet"}
    assert _positive(kernels["darts_supernet"])
    assert len(set(kernels.values())) == 1  # one library
    cnn = r["supernet_cnn"]["digits"]
    assert set(cnn) == {"config", "max_abs_diff", "ours", "per_edge", "speedup"}
    assert set(cnn["config"]) == {"batch", "channels", "image", "cells", "hidden"}
    assert 0 <= cnn["max_abs_diff"] <= 1e-4 and _positive(cnn["speedup"])
    for impl in ("ours", "per_edge"):
        assert set(cnn[impl]) == {"seconds", "threads", "peak_mb"}
        assert _positive(cnn[impl]["seconds"]) and cnn[impl]["peak_mb"] >= 0
    entry = r["supernet_two_input"]["small"]
    assert set(entry) == {
        "config", "max_abs_diff", "kernel", "kernel_python", "eager", "speedup",
        "speedup_python_kernel",
    }  # fmt: skip
    assert 0 <= entry["max_abs_diff"] <= 1e-4 and _positive(entry["speedup"])
    assert _positive(entry["speedup_python_kernel"])
    for impl in ("kernel", "kernel_python", "eager"):
        assert set(entry[impl]) == {"seconds", "threads", "peak_mb"}
        assert _positive(entry[impl]["seconds"]) and entry[impl]["peak_mb"] >= 0
    assert set(CELL_MODELS) == {
        "darts",
        "darts_eager",
        "two_input",
        "two_input_eager",
        "lstm",
        "gru",
    }
    for name in ("small", "large"):
        entry = r["cell"][name]
        assert set(entry) == {
            "config", "matmul_gflops", "gflops_vs_lstm", *CELL_MODELS, *PYTHON_CELLS
        }  # fmt: skip
        for model in {*CELL_MODELS, *PYTHON_CELLS}:
            _check_impl(entry[model])
            assert _positive(entry[model]["gflop"])
            assert _positive(entry["gflops_vs_lstm"][model])
        assert entry["gflops_vs_lstm"]["lstm"] == 1.0
    assert set(r["search"]) == set(STRATEGIES) | set(SEARCH_VARIANTS)
    for by_space in r["search"].values():
        assert set(by_space) == {"darts_rnn", "two_input"}
        for entry in by_space.values():
            assert set(entry) == SEARCH_KEYS
            assert all(_positive(entry[k]) for k in SEARCH_KEYS - {"config"})
    json.dumps(r, allow_nan=False)  # plain JSON, no NaN


def test_quick_threads_part_is_consistent(quick_result):
    part = quick_result["threads"]
    assert set(part) == THREADS_KEYS
    assert set(part["config"]) == {"bptt", "nodes"}
    assert part["multithread_from"] == MULTITHREAD_FROM
    candidates = part["candidates"]
    assert candidates and all(isinstance(t, int) and t >= 1 for t in candidates)
    assert len(part["points"]) >= 2
    for point in part["points"]:
        assert set(point) == THREAD_POINT_KEYS
        assert point["product"] == point["batch"] * point["hidden"]
        assert set(point["seconds"]) == {str(t) for t in candidates}  # JSON keys: strings
        assert all(_positive(s) for s in point["seconds"].values())
        assert point["faster_threads"] in candidates
        fastest = min(point["seconds"].values())
        assert point["seconds"][str(point["faster_threads"])] == fastest
        assert _positive(point["speedup_all_cores"])
        assert point["policy_threads"] == choose_threads(point["hidden"], point["batch"])
        if point["policy_threads"] in candidates:
            assert point["policy_agrees"] == (point["policy_threads"] == point["faster_threads"])
        else:
            assert point["policy_agrees"] is None
    assert part["crossover_product"] == multithread_crossover(part["points"])
    assert part["policy_mismatches"] == sum(p["policy_agrees"] is False for p in part["points"])


def _point(batch: int, hidden: int, one: float, two: float, policy: int = 1) -> dict:
    """A grid point from hand-made seconds at one and two threads."""
    return thread_point(SupernetConfig(batch, hidden, bptt=35, nodes=8), {1: one, 2: two}, policy)


def test_thread_point_summarises_hand_made_timings():
    point = _point(64, 128, one=0.6, two=0.4, policy=1)
    assert point["product"] == 8192
    assert point["seconds"] == {"1": 0.6, "2": 0.4}
    assert point["faster_threads"] == 2 and point["all_cores_faster"]
    assert point["speedup_all_cores"] == pytest.approx(1.5)
    assert point["policy_agrees"] is False
    tie = _point(32, 32, one=0.2, two=0.2, policy=1)
    assert tie["faster_threads"] == 1 and not tie["all_cores_faster"] and tie["policy_agrees"]
    # A count the policy picks but the grid did not time cannot be judged.
    assert thread_point(SupernetConfig(8, 8, 4, 2), {1: 0.1}, 2)["policy_agrees"] is None


def test_crossover_is_the_smallest_product_with_all_cores_winning_from_there_up():
    points = [
        _point(32, 32, one=0.20, two=0.25),  # 1,024: one thread
        _point(64, 32, one=0.30, two=0.28),  # 2,048: all cores, but ...
        _point(32, 64, one=0.30, two=0.33),  # 2,048: ... one thread at the same product
        _point(64, 64, one=0.40, two=0.45),  # 4,096: one thread
        _point(64, 128, one=0.60, two=0.40),  # 8,192: all cores from here up
        _point(256, 64, one=0.90, two=0.60),  # 16,384
        _point(256, 128, one=1.80, two=1.20),  # 32,768
    ]
    assert multithread_crossover(points) == 8192
    assert multithread_crossover(points[::-1]) == 8192  # the order of the grid does not matter
    assert multithread_crossover(points[:4]) is None  # one thread won at the largest product
    assert multithread_crossover(points[1:2] + points[4:]) == 2048  # all cores won everywhere
    assert multithread_crossover(points[:3]) is None  # a tie at the top product is not a win
    assert multithread_crossover([]) is None
    single = [thread_point(SupernetConfig(8, 8, 4, 2), {1: 0.1}, 1)]
    assert multithread_crossover(single) is None  # nothing compared, no crossover


def test_bench_table_renders(quick_result):
    console = Console(file=io.StringIO(), width=160)
    tables = bench_table(quick_result)
    assert len(tables) == 4 + len(PARTS)  # machine, wall seconds; the supernet part has three
    for table in tables:
        console.print(table)
    text = console.file.getvalue()
    words = (
        "Machine", "reference", "kernel", "lstm", "two_input", "darts_rnn", "s/epoch", "total",
        "per_edge",
    )  # fmt: skip
    for word in (*words, "crossover"):
        assert word in text


def test_bench_table_shows_only_the_parts_run(quick_result):
    dropped = ("supernet", "supernet_two_input", "supernet_cnn", "cell", "threads")
    partial = {k: v for k, v in quick_result.items() if k not in dropped}
    assert len(bench_table(partial)) == 3  # machine, search, wall seconds


def test_without_compile_there_are_no_compiled_keys(quick_result):
    assert sorted(COMPILED) == ["darts_compiled", "two_input_compiled"]
    for entry in quick_result["cell"].values():
        assert not COMPILED & set(entry)
        assert not COMPILED & set(entry["gflops_vs_lstm"])
        assert not any("compile" in key for model in CELL_MODELS for key in entry[model])


def test_compile_adds_the_compiled_cells_to_the_cell_part(monkeypatch):
    # aot_eager traces like inductor (Dynamo, AOT autograd) without generating C++, and one short
    # configuration: tracing cost grows with the unroll, seconds here rather than minutes.
    monkeypatch.setattr(
        cell_part, "QUICK_CELL_CONFIGS", {"small": CellConfig(batch=4, hidden=8, bptt=3)}
    )
    result = run_bench(["cell"], quick=True, compile=True, compile_backend="aot_eager")
    assert set(result) == {"machine", "matmul", "matmul_gflops", "cell", "wall_seconds"}
    assert list(result["wall_seconds"]) == ["setup", "cell", "ceiling", "total"]
    for entry in result["cell"].values():
        assert set(entry) == {
            "config", "matmul_gflops", "gflops_vs_lstm", *CELL_MODELS, *PYTHON_CELLS, *COMPILED
        }  # fmt: skip
        assert set(entry["gflops_vs_lstm"]) == {*CELL_MODELS, *PYTHON_CELLS, *COMPILED}
        for name in COMPILED:
            compiled, eager = entry[name], entry[name.removesuffix(COMPILED_SUFFIX)]
            assert set(compiled) == COMPILED_KEYS
            _check_impl(compiled)
            assert compiled["compiled"] is True and _positive(compiled["compile_seconds"])
            assert compiled["gflop"] == eager["gflop"]
            assert _positive(entry["gflops_vs_lstm"][name])
            # The compiled copy computes the eager cell's function (same weights, same masks).
            assert 0 <= compiled["max_abs_diff"] <= 1e-5
    json.dumps(result, allow_nan=False)

    # A backend that failed: the copy ran eagerly, and the table says so.
    fell_back = json.loads(json.dumps(result))
    for entry in fell_back["cell"].values():
        for name in COMPILED:
            entry[name].update(compiled=False, compile_seconds=None)
    console = Console(file=io.StringIO(), width=200)
    for table in bench_table(fell_back):
        console.print(table)
    text = console.file.getvalue()
    assert "darts_compiled" in text and "two_input_compiled" in text
    assert "eager fallback" in text and "compile s" in text


def test_cli_compile_flag_reaches_run_bench(monkeypatch):
    calls = []

    def fake_run_bench(parts, **options):
        calls.append(options["compile"])
        return {"parts": parts}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    for flags in ([], ["--compile"]):
        done = CliRunner().invoke(app, ["bench", "--parts", "cell", "--quick", *flags, "--json"])
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout) == {"parts": ["cell"]}
    assert calls == [False, True]


class _ThreadBound:
    """A stand-in workload whose step is fast only at one thread count (it sleeps otherwise)."""

    threads = None

    def __init__(self, fast_at: int) -> None:
        self.fast_at, self.counts = fast_at, []

    def step(self, bptt: int | None = None) -> None:
        self.counts.append(torch.get_num_threads())
        if torch.get_num_threads() != self.fast_at:
            time.sleep(0.05)


def test_measure_without_probe_times_every_count_and_keeps_the_faster():
    before = torch.get_num_threads()
    try:
        works = {"one": _ThreadBound(1), "two": _ThreadBound(2)}
        result = bench_timing.measure(works, torch.device("cpu"), 3, (1, 2), probe=False)
    finally:
        torch.set_num_threads(before)
    assert result["one"]["threads"] == 1 and result["two"]["threads"] == 2
    for work in works.values():  # the memory step, then three interleaved rounds at each count
        assert work.counts == [1] + [1, 2] * 3


@pytest.mark.parametrize("probe_above_gflop, probed", [(1.0, False), (0.001, True)])
def test_supernet_part_probes_only_above_its_flop_threshold(monkeypatch, probe_above_gflop, probed):
    # The quick ``small`` configuration is 0.009 GFLOP a step: under a threshold of 1 it is timed
    # at every count in full, over one of 0.001 each implementation's count comes from the probe.
    monkeypatch.setattr(supernet_part, "PROBE_ABOVE_GFLOP", probe_above_gflop)
    calls = []
    measure = bench_timing.measure
    monkeypatch.setattr(
        bench_timing,
        "measure",
        lambda *args, **kw: calls.append(kw["probe"]) or measure(*args, **kw),
    )
    ctx = bench_timing.Context(torch.device("cpu"), (1,))
    small = supernet_part.QUICK_SUPERNET_CONFIGS["small"]
    result = supernet_part.bench_supernet_config(small, ctx, repeats=1)
    assert calls == [probed]
    assert _positive(result["speedup"])
