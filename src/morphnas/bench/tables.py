"""Human-readable rich tables of a ``run_bench`` result, one per part run."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from morphnas.bench.parts.cell import COMPILED_SUFFIX


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _supernet_table(result: dict[str, Any]) -> Table:
    table = Table(title="Supernet training step: our kernel vs the DARTS reference loop")
    for column in ("config", "impl", "threads", "s/step", "GFLOP/s", "% matmul", "peak MB"):
        table.add_column(column, justify="left" if column in ("config", "impl") else "right")
    table.add_column("speedup", justify="right")
    for name, entry in result["supernet"].items():
        c = entry["config"]
        label = f"{name} B{c['batch']} H{c['hidden']} T{c['bptt']} N{c['nodes']}"
        impls = [i for i in ("ours", "ours_cuda_graph", "ours_python", "reference") if i in entry]
        speedups = {
            "ours": "speedup",
            "ours_cuda_graph": "speedup_cuda_graph",
            "ours_python": "speedup_python_kernel",
        }
        for impl in impls:
            e = entry[impl]
            table.add_row(
                label if impl == impls[0] else "",
                impl,
                str(e["threads"]),
                _fmt(e["seconds"]),
                _fmt(e["gflops"]),
                f"{100 * e['fraction_of_matmul']:.1f}",
                _fmt(e["peak_mb"], 4),
                f"{entry[speedups[impl]]:.2f}×" if impl in speedups else "",
            )
    return table


def _two_input_table(result: dict[str, Any]) -> Table:
    table = _impl_table("Two-input supernet training step: sequence kernel vs eager loop")
    for name, entry in result["supernet_two_input"].items():
        c = entry["config"]
        label = f"{name} B{c['batch']} H{c['hidden']} T{c['bptt']} N{c['nodes']}"
        speedups = {"kernel": "speedup", "kernel_python": "speedup_python_kernel"}
        impls = [i for i in ("kernel", "kernel_python", "eager") if i in entry]
        _impl_rows(table, label, entry, impls, speedups)
    return table


def _impl_table(title: str) -> Table:
    """A table of implementations per configuration (filled by ``_impl_rows``)."""
    table = Table(title=title)
    for column in ("config", "impl", "threads", "s/step", "peak MB", "speedup"):
        table.add_column(column, justify="left" if column in ("config", "impl") else "right")
    return table


def _impl_rows(
    table: Table, label: str, entry: dict[str, Any], impls: list[str], speedups: dict[str, str]
) -> None:
    """One row per implementation of a configuration: threads, seconds, peak memory, and its
    speedup (the key in ``speedups``) where it has one; the label on the first row only."""
    for position, impl in enumerate(impls):
        e = entry[impl]
        table.add_row(
            label if position == 0 else "",
            impl,
            str(e["threads"]),
            _fmt(e["seconds"]),
            _fmt(e["peak_mb"], 4),
            f"{entry[speedups[impl]]:.2f}×" if impl in speedups else "",
        )


def _cell_table(result: dict[str, Any]) -> Table:
    """One row per model and config; the compile columns only when compiled cells were run."""
    table = Table(title="Discrete cells vs LSTM/GRU: forward + backward")
    columns = ["config", "model", "threads", "s/step", "GFLOP/s", "% matmul", "× LSTM GFLOP/s"]
    with_compile = any(
        model.endswith(COMPILED_SUFFIX)
        for entry in result["cell"].values()
        for model in entry["gflops_vs_lstm"]
    )
    if with_compile:
        columns += ["compile s", "max |Δ|"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("config", "model") else "right")
    for name, entry in result["cell"].items():
        c = entry["config"]
        for i, model in enumerate(entry["gflops_vs_lstm"]):  # CELL_MODELS, then compiled ones
            e = entry[model]
            compile_cells = []
            if with_compile:
                compiled = e.get("compiled")
                seconds = "eager fallback" if compiled is False else _fmt(e.get("compile_seconds"))
                compile_cells = [seconds, _fmt(e.get("max_abs_diff"), 2)]
            table.add_row(
                f"{name} B{c['batch']} H{c['hidden']} T{c['bptt']}" if i == 0 else "",
                model,
                str(e["threads"]),
                _fmt(e["seconds"]),
                _fmt(e["gflops"]),
                f"{100 * e['fraction_of_matmul']:.1f}",
                f"{entry['gflops_vs_lstm'][model]:.2f}",
                *compile_cells,
            )
    return table


def _search_table(result: dict[str, Any]) -> Table:
    table = Table(title="Search: seconds per epoch (real engine, synthetic data)")
    for column in ("strategy", "space", "threads", "batches", "s/epoch"):
        table.add_column(column, justify="left" if column in ("strategy", "space") else "right")
    for strategy_name, by_space in result["search"].items():
        for space_name, e in by_space.items():
            table.add_row(
                strategy_name,
                space_name,
                str(e["threads"]),
                str(e["batches_per_epoch"]),
                _fmt(e["seconds_per_epoch"]),
            )
    return table


def _threads_table(result: dict[str, Any]) -> Table:
    part = result["threads"]
    c = part["config"]
    caption = (
        f"crossover (all cores faster from this B×H up): {part['crossover_product'] or '–'}; "
        f"policy MULTITHREAD_FROM = {part['multithread_from']}, "
        f"{part['policy_mismatches']} point(s) where it picks the slower count"
    )
    table = Table(
        title=f"Threads: fused supernet training step (T{c['bptt']} N{c['nodes']})",
        caption=caption,
    )
    counts = [str(t) for t in part["candidates"]]
    columns = ["batch", "hidden", "B×H", *(f"s @{t}" for t in counts)]
    for column in (*columns, "faster", "all-core speedup", "policy", "agrees"):
        table.add_column(column, justify="right")
    for p in part["points"]:
        agrees = {True: "yes", False: "NO", None: "–"}[p["policy_agrees"]]
        table.add_row(
            str(p["batch"]),
            str(p["hidden"]),
            str(p["product"]),
            *(_fmt(p["seconds"][t]) for t in counts),
            str(p["faster_threads"]),
            f"{p['speedup_all_cores']:.2f}×",
            str(p["policy_threads"]),
            agrees,
        )
    return table


def _cnn_table(result: dict[str, Any]) -> Table:
    table = _impl_table("CNN supernet training step: shared ops vs the per-edge loop")
    for name, entry in result["supernet_cnn"].items():
        c = entry["config"]
        label = f"{name} B{c['batch']} {c['channels']}×{c['image']}² L{c['cells']} C{c['hidden']}"
        _impl_rows(table, label, entry, ["ours", "per_edge"], {"ours": "speedup"})
    return table


def bench_table(result: dict[str, Any]) -> list[Table]:
    """Human-readable tables of a ``run_bench`` result: machine, then one table per part."""
    m = result["machine"]
    machine = Table(title="Machine")
    columns = ("device", "cores", "torch", "load (1 min)", "matmul GFLOP/s", "before, after")
    for column in (*columns, "matmul threads"):
        machine.add_column(column)
    machine.add_row(
        f"{m['device']} ({m['device_name']})",
        str(m["cpu_count"]),
        m["torch"],
        _fmt(m["load_average_1min"], 2),
        _fmt(result["matmul_gflops"]),
        ", ".join(_fmt(gflops) for gflops in result["matmul"]["readings"]),
        str(result["matmul"]["threads"]),
    )
    tables = [machine]
    builders = {
        "supernet": _supernet_table,
        "supernet_two_input": _two_input_table,
        "supernet_cnn": _cnn_table,
        "cell": _cell_table,
        "search": _search_table,
        "threads": _threads_table,
    }
    tables += [build(result) for part, build in builders.items() if part in result]
    wall = Table(title="Wall seconds of this run")
    for column in result["wall_seconds"]:
        wall.add_column(column, justify="right")
    wall.add_row(*(f"{seconds:.1f}" for seconds in result["wall_seconds"].values()))
    return [*tables, wall]
