"""``morphnas export RUN --format onnx|torchscript``: one trained forecaster of a finished run as a
file that runs without morphnas (onnxruntime, or ``torch.jit.load``), with a JSON beside it that
describes its interface.

Three choices make the file safe to hand to someone else:

- **The scaling is inside the graph.** The run's scaler (fitted on its train rows) is folded in as
  ``(x − mean) / scale`` before the model and ``y · scale + mean`` after, so the file reads and
  writes the series in their original units; nobody has to re-implement the scaler.
- **The eager path is what gets traced.** The cells normally run fused autograd kernels whose
  loops are C++ (``morphnas.native``) or opaque ``autograd.Function`` s; neither traces into an
  ONNX or TorchScript graph. Inside ``fused_ops.eager_kernels`` every cell runs its plain PyTorch
  loop instead (the kernels' specification), unrolled over the run's fixed window.
- **Every export is checked before it is kept.** The written file is run on the run's test
  windows and compared with the PyTorch model as it runs in morphnas (its fused kernels, the
  scaler applied in float64 outside it); a difference above ``TOLERANCE`` of a series' scale is
  an error and nothing is left behind. The traced batch size differs from the checked one, so a
  batch dimension baked into the graph is caught too.

ONNX goes through the TorchScript-based exporter (``dynamo=False``): it unrolls the recurrence
into a faithful graph in a fraction of the dynamo exporter's time, and ``torch.nn.LSTM`` / ``GRU``
become ONNX's own ``LSTM`` / ``GRU`` nodes; the batch dimension is dynamic. TorchScript is
``torch.jit.trace`` (the window length is fixed, so tracing loses no control flow).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from morphnas import api, run_files
from morphnas.data import WindowedSplits
from morphnas.errors import UserError
from morphnas.kernels.fused_ops import eager_kernels

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# Largest accepted |exported − PyTorch| in original units, as a fraction of each series' scale.
TOLERANCE = 1e-4
OPSET = 17
INPUT, OUTPUT = "window", "forecast"
# Windows of the test span the parity check runs (all of them when there are fewer).
CHECK_WINDOWS = 64
# The batch size the graph is traced at: not the checked one, so a baked-in batch shows.
TRACE_BATCH = 2


@dataclass(frozen=True)
class Scaling:
    """The run's scaler as the model's inputs and outputs see it: every input column (the
    series, then any calendar features, which are never scaled: mean 0, scale 1) and every
    forecast series (the scaler's columns of the targets)."""

    input_mean: np.ndarray
    input_scale: np.ndarray
    output_mean: np.ndarray
    output_scale: np.ndarray

    @classmethod
    def of(cls, data: WindowedSplits) -> Scaling:
        mean, scale = data.scaler.mean_, data.scaler.scale_
        unscaled = len(data.input_columns) - len(mean)
        targets = list(data.target_positions)
        return cls(
            np.concatenate([mean, np.zeros(unscaled)]),
            np.concatenate([scale, np.ones(unscaled)]),
            mean[targets],
            scale[targets],
        )


class OriginalUnits(nn.Module):
    """A forecaster between the run's scaler and its inverse: ``(B, P, inputs)`` windows in the
    series' own units in, ``(B, targets)`` forecasts in those units out."""

    def __init__(self, model: nn.Module, scaling: Scaling) -> None:
        super().__init__()
        self.model = model
        for name, values in dataclasses.asdict(scaling).items():
            self.register_buffer(name, torch.as_tensor(values, dtype=torch.float32))

    def forward(self, window: Tensor) -> Tensor:
        scaled = self.model((window - self.input_mean) / self.input_scale)
        return scaled * self.output_scale + self.output_mean


def export_run(
    run_dir: Path | str, fmt: str, model: str | None = None, out: Path | str | None = None
) -> Path:
    """Export model ``model`` of the finished forecasting run ``run_dir`` (default: the model with
    weights that has the best ``valid_rse``) as ``fmt`` to ``out`` (default:
    ``RUN/export/<model>.onnx`` or ``.pt``), with ``<out>.json`` describing its interface; the
    file's path. Refused, and nothing written, when the file's forecasts differ from the model's.
    """
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    run_files.read_summary(run_dir)  # an unfinished run: its own one-line error
    _check_forecasting(run_dir)
    trained = api.load_trained(run_dir)
    name, forecaster = _chosen(trained, model)
    scaling = Scaling.of(trained.data)
    # eval as a whole: the ONNX exporter puts every submodule back in the wrapper's mode.
    wrapped = OriginalUnits(forecaster.cpu(), scaling).eval()
    wrapped.requires_grad_(False)
    scaled = trained.data.test[0][:CHECK_WINDOWS].cpu().numpy()
    windows = (scaled * scaling.input_scale + scaling.input_mean).astype(np.float32)
    reference = _reference(forecaster, scaling, windows)
    path = Path(out) if out is not None else run_dir / "export" / f"{name}{FORMATS[fmt]}"
    if path.suffix == ".json":
        raise UserError(
            f"--out {path}: the interface goes to a .json beside the file; name it .onnx or .pt"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write(wrapped, torch.from_numpy(windows[:TRACE_BATCH]), fmt, tmp)
        exported = _run_exported(tmp, fmt, windows)
        parity = _parity(exported, reference, scaling.output_scale)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    parity["parity_windows"] = len(windows)
    interface = _interface(trained, name, fmt, path, scaling, parity)
    run_files.write_json(path.with_suffix(".json"), interface)
    return path


def _require_onnx() -> None:
    """onnx (the file's check) and onnxruntime (the parity run) are an optional extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"--format onnx needs onnx and onnxruntime ({err.name} is not installed): "
            "pip install 'morphnas[export]', or use --format torchscript"
        ) from None


def _check_forecasting(run_dir: Path) -> None:
    task = run_files.written_task(run_dir)
    if task != "forecast":
        raise UserError(
            f"{run_dir} is a run of task {task}; export covers forecasting runs "
            "(task forecast) only"
        )


def _chosen(trained: api.TrainedRun, model: str | None) -> tuple[str, nn.Module]:
    """The model asked for, or the one with weights with the best ``valid_rse``."""
    with_weights = {name: m for name, _, m in trained.models if isinstance(m, nn.Module)}
    choices = ", ".join(with_weights) or "none"
    if model is None:
        if not with_weights:
            raise UserError(f"{trained.dir} has no model with weights to export")
        model = run_files.best_on_valid(trained.summary["results"], with_weights)
        model = model or next(iter(with_weights))
    if model in with_weights:
        return model, with_weights[model]
    if any(name == model for name, _, _ in trained.models):
        raise UserError(
            f"model {model!r} of {trained.dir} is not a network (no trained weights to "
            f"export); choose one of: {choices}"
        )
    raise UserError(f"{trained.dir} has no model {model!r}; choose one of: {choices}")


@contextmanager
def _quiet() -> Iterator[None]:
    """No autograd, and none of the tracers' warnings: Python conditions inside ``nn.LSTM``,
    the tracers' own deprecation; none matters to a fixed-window graph whose output is then
    checked against the model's."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*(legacy|ONNX).*", category=UserWarning)
        yield


def _write(wrapped: OriginalUnits, example: Tensor, fmt: str, path: Path) -> None:
    """Trace ``wrapped``'s eager loops on ``example`` and save it to ``path`` as ``fmt``."""
    with _quiet(), eager_kernels():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapped, (example,)), str(path))
            return
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
        )
    import onnx

    onnx.checker.check_model(str(path))


def _run_exported(path: Path, fmt: str, windows: np.ndarray) -> np.ndarray:
    """The saved file's forecasts for ``windows``, run by its own runtime."""
    if fmt == "torchscript":
        with _quiet():
            return torch.jit.load(str(path))(torch.from_numpy(windows)).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: windows})[0]


def _reference(forecaster: nn.Module, scaling: Scaling, windows: np.ndarray) -> np.ndarray:
    """The model as morphnas runs it (fused kernels allowed), the scaling applied outside it in
    float64 as the run's scoring does: what the exported file must reproduce."""
    scaled = (windows - scaling.input_mean) / scaling.input_scale
    with torch.no_grad():
        forecasts = forecaster(torch.as_tensor(scaled, dtype=torch.float32)).numpy()
    return forecasts * scaling.output_scale + scaling.output_mean


def _parity(exported: np.ndarray, reference: np.ndarray, scale: np.ndarray) -> dict[str, Any]:
    """The largest difference, absolute and relative to each series' scale; an error above
    ``TOLERANCE``."""
    diff = np.abs(exported.astype(np.float64) - reference)
    relative = float((diff / scale).max())
    absolute = float(diff.max())
    if not relative <= TOLERANCE:  # NaN too
        raise UserError(
            f"the exported model's forecasts differ from the PyTorch model's by up to "
            f"{absolute:.3g} ({relative:.3g} of a series' scale, more than {TOLERANCE:g}); "
            "the export was not written: please report this run's genotype and config"
        )
    return {"parity_max_abs_diff": absolute, "parity_max_rel_diff": relative}


def _interface(
    trained: api.TrainedRun,
    name: str,
    fmt: str,
    path: Path,
    scaling: Scaling,
    parity: dict[str, float],
) -> dict[str, Any]:
    """What a user of the file needs to call it, and how it was checked."""
    data = trained.data
    inputs, targets = list(data.input_columns), list(data.columns)
    kind = next(k for n, k, _ in trained.models if n == name)
    row = next((r for r in trained.summary["results"] if r["model"] == name), {})
    calendar = data.layout.calendar if data.layout is not None else ()
    return {
        "file": path.name,
        "format": fmt,
        **({"opset": OPSET} if fmt == "onnx" else {}),
        "model": name,
        "model_kind": kind,
        "genotype": trained.genotype.to_dict() if kind == "genotype" and trained.genotype else None,
        "run": str(trained.dir),
        "input": {
            "name": INPUT,
            "shape": ["batch", data.window, len(inputs)],
            "dtype": "float32",
            "columns": inputs,
            "meaning": f"the last {data.window} rows, oldest first, in original units",
        },
        "output": {
            "name": OUTPUT,
            "shape": ["batch", len(targets)],
            "dtype": "float32",
            "columns": targets,
            "meaning": f"each series {data.horizon} step(s) after the window's last row, "
            "in original units",
        },
        "columns": targets,
        "window": data.window,
        "horizon": data.horizon,
        **({"calendar": _calendar(data, calendar)} if calendar else {}),
        "scaling": {
            "kind": data.scaler.kind,
            "folded": True,
            "note": "inside the exported graph: (x - input_mean) / input_scale before the "
            "model, y * output_scale + output_mean after; feed raw values, read raw forecasts",
            **{key: values.tolist() for key, values in dataclasses.asdict(scaling).items()},
        },
        "valid_rse": row.get("valid_rse"),
        "test_rse": row.get("test_rse"),
        **parity,
        "parity_tolerance": TOLERANCE,
        "torch_version": torch.__version__,
    }


def _calendar(data: WindowedSplits, features: tuple[str, ...]) -> dict[str, Any]:
    """The calendar inputs a caller computes itself: they come from timestamps, not values."""
    shift = data.layout.calendar_shift if data.layout is not None else 0
    return {
        "features": list(features),
        "shift": shift,
        "note": f"the input columns after the series are sin/cos calendar features "
        "(morphnas.data.calendar.calendar_features), unscaled; input row t carries those of "
        f"step t + {shift}",
    }
