"""The RL run's figure: each model's episode returns over the frames it trained on."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from morphnas.report import DPI, check_output
from morphnas.rl.loop import Curve

# Updates in the running mean that smooths each curve.
SMOOTHING = 5


def per_update(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """The updates in which episodes ended, and the mean return of those episodes."""
    updates = np.asarray(curve.updates)
    returns = np.asarray(curve.returns, dtype=float)
    ended = np.unique(updates)
    return ended, np.array([returns[updates == u].mean() for u in ended])


def plot_returns(curves: Mapping[str, Curve], frames_per_update: int, path: Path) -> Path:
    """Per update, the mean return of the episodes that ended in it (dots) and its running mean
    over ``SMOOTHING`` updates (a line), against the frames played by the update's end; returns
    the PNG written."""
    out = check_output(path)
    fig = Figure(figsize=(7, 4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for name, curve in curves.items():
        if not curve.returns:
            continue
        updates, means = per_update(curve)
        frames = (updates + 1) * frames_per_update
        window = min(SMOOTHING, len(means))
        smooth = np.convolve(means, np.ones(window) / window, mode="valid")
        (line,) = ax.plot(frames[window - 1 :], smooth, label=name)
        ax.scatter(frames, means, s=6, alpha=0.3, color=line.get_color())
    ax.set_xlabel("frames")
    ax.set_ylabel(f"episode return (per update; line: mean of {SMOOTHING})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, format="png", dpi=DPI)
    return out
