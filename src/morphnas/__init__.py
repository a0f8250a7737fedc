"""morphnas: differentiable architecture search of recurrent cells, and forecasting with them.

``morphnas.Forecaster`` is the Python face (fit / predict / cross_validation / save / load);
it is imported on first use, so ``import morphnas.<module>`` stays as light as that module.
"""

from typing import Any

__all__ = ["Forecaster"]


def __getattr__(name: str) -> Any:
    if name == "Forecaster":
        from morphnas.forecaster import Forecaster

        return Forecaster
    raise AttributeError(f"module 'morphnas' has no attribute {name!r}")
