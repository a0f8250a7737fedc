"""``morphnas export``: the exported file reproduces the PyTorch model in original units (the
run's scaler applied here by hand), at any batch size, in onnxruntime and in TorchScript; a
wrong export is refused; bad requests are one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch

from conftest import run_cli
from morphnas import api, export
from morphnas.cells.baselines import RecurrentBaseline
from morphnas.data import make_windows, synthetic_series
from morphnas.errors import UserError
from morphnas.tasks.forecasting import ForecastModel

# torch 2.13 deprecates TorchScript; the exported files are what is checked here.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

CASES = [
    ("finished_run", "searched"),
    ("finished_darts_run", "searched"),
    ("finished_run", "lstm"),
    ("finished_run", "gru"),
]


def _run_file(path: Path, fmt: str, windows: np.ndarray) -> np.ndarray:
    """The exported file's output, by its own runtime, nothing of morphnas."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"window": windows})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(windows)).numpy()


def _by_hand(run: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The run's test windows in original units (float32) and the PyTorch model's forecasts
    for them, the scaler's ``(x − mean) / scale`` and ``y · scale + mean`` written out here."""
    trained = api.load_trained(run)
    model = next(m for n, _, m in trained.models if n == name).eval()
    mean, scale = trained.data.scaler.mean_, trained.data.scaler.scale_
    windows = (trained.data.test[0].numpy() * scale + mean).astype(np.float32)
    scaled = torch.from_numpy(((windows - mean) / scale).astype(np.float32))
    with torch.no_grad():
        forecasts = model(scaled).numpy() * scale + mean
    return windows, forecasts


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize(("fixture", "name"), CASES)
def test_export_reproduces_the_model_in_original_units(
    fixture: str, name: str, fmt: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    run = request.getfixturevalue(fixture)
    path = export.export_run(run, fmt, model=name, out=tmp_path / f"{name}.model")
    windows, expected = _by_hand(run, name)
    assert np.abs(_run_file(path, fmt, windows) - expected).max() < 1e-5
    interface = json.loads(path.with_suffix(".json").read_text())
    assert interface["parity_max_abs_diff"] < 1e-5
    assert interface["scaling"]["folded"] is True
    assert (interface["model"], interface["format"], interface["file"]) == (name, fmt, path.name)
    assert interface["input"]["shape"] == ["batch", 8, 3]
    assert interface["output"]["shape"] == ["batch", 3]
    assert (interface["window"], interface["horizon"]) == (8, 1)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_batch_dimension_is_dynamic(finished_run: Path, fmt: str, tmp_path: Path) -> None:
    """Traced at one batch size, the file answers 1 and 5 windows with the model's forecasts."""
    path = export.export_run(finished_run, fmt, model="searched", out=tmp_path / "m.model")
    windows, expected = _by_hand(finished_run, "searched")
    for batch in (1, 5):
        got = _run_file(path, fmt, windows[:batch])
        assert got.shape == (batch, 3)
        assert np.abs(got - expected[:batch]).max() < 1e-5
    if fmt == "onnx":  # named in the graph, not just tolerated by the runtime
        graph = onnx.load(str(path)).graph
        for value in (graph.input[0], graph.output[0]):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_default_model_and_paths(finished_run: Path, tmp_path: Path) -> None:
    """No --model: the model with weights with the best valid RSE, written to
    RUN/export/<model>.pt with its interface beside it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, lines = run_cli("export", str(run), "--format", "torchscript")
    assert code == 0, lines
    rows = json.loads((run / "summary.json").read_text())["results"]
    weighted = {path.stem for path in (run / "models").glob("*.pt")}  # naive, var: none
    best = min((r for r in rows if r["model"] in weighted), key=lambda r: r["valid_rse"])["model"]
    assert sorted(p.name for p in (run / "export").iterdir()) == [f"{best}.json", f"{best}.pt"]
    interface = json.loads((run / "export" / f"{best}.json").read_text())
    assert interface["columns"] == ["s0", "s1", "s2"]
    assert interface["valid_rse"] == next(r["valid_rse"] for r in rows if r["model"] == best)


def test_scaling_maps_inputs_and_targets_by_column() -> None:
    """With forecast targets chosen among the series and calendar inputs, the folded scaling
    reads each input column in its own units (calendar features unscaled) and writes each
    target in its own: checked against the data's own scaling, column by name."""
    base = synthetic_series(n_steps=60, n_series=3, seed=2)
    series = dataclasses.replace(
        base, index=pd.date_range("2021-01-01", periods=60, freq="D"), frequency="D"
    )
    data = make_windows(series, 6, 2, targets=["s2", "s0"], calendar=["dayofweek"])
    torch.manual_seed(0)
    cell = RecurrentBaseline("gru", len(data.input_columns), 4)
    model = ForecastModel(cell, 4, 2, ar_window=2, targets=data.target_positions).eval()
    scaled = data.test[0].numpy().astype(np.float64)
    windows = scaled.copy()
    for j, name in enumerate(series.columns):  # the series; the calendar columns stay as they are
        at = data.input_columns.index(name)
        windows[..., at] = scaled[..., at] * data.scaler.scale_[j] + data.scaler.mean_[j]
    with torch.no_grad():
        expected = data.inverse_targets(model(data.test[0]).numpy())
        got = export.OriginalUnits(model, export.Scaling.of(data))(
            torch.as_tensor(windows, dtype=torch.float32)
        ).numpy()
    assert data.input_columns[3:] == ("cal_dayofweek_sin", "cal_dayofweek_cos")
    assert np.abs(got - expected).max() < 1e-5


def test_a_wrong_export_is_refused_and_not_kept(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parity check compares the file with the model itself, not with what was traced."""
    traced = export.OriginalUnits.forward
    monkeypatch.setattr(export.OriginalUnits, "forward", lambda self, w: traced(self, w) + 0.01)
    with pytest.raises(UserError, match="differ from the PyTorch model"):
        export.export_run(finished_run, "torchscript", model="gru", out=tmp_path / "x" / "m.pt")
    assert list((tmp_path / "x").iterdir()) == []


def _refused(*args: str, fragments: tuple[str, ...]) -> None:
    code, lines = run_cli("export", *args)
    assert code == 2 and len(lines) == 1, lines
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_refuses_another_task(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("task: forecast", "task: lm"))
    _refused(str(run), "--format", "onnx", fragments=("task lm", "covers forecasting runs"))


def test_refuses_an_unfinished_run(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()
    _refused(str(run), "--format", "onnx", fragments=("not a finished", "summary.json"))


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--model", "tcn"), ("no model 'tcn'", "choose one of: searched, lstm, gru, ar")),
        (("--model", "naive"), ("'naive'", "not a network", "choose one of: searched, lstm")),
        (("--format", "tflite"), ("unknown export format 'tflite'", "onnx, torchscript")),
    ],
)
def test_refuses_bad_requests(
    finished_run: Path, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    fmt = () if "--format" in args else ("--format", "onnx")
    _refused(str(finished_run), *fmt, *args, fragments=fragments)
    assert not (finished_run / "export").exists()


def test_onnx_needs_its_extra(finished_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    _refused(str(finished_run), "--format", "onnx", fragments=("pip install 'morphnas[export]'",))
