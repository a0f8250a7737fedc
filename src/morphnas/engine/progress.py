"""How the loops report progress without knowing about terminals."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives a phase's size, its steps and its end; the CLI implements it with rich."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, steps: int = 1, **status: float) -> None: ...

    def stop(self) -> None: ...


class Silent:
    """The default: report nothing."""

    def start(self, description: str, total: int) -> None:
        del description, total

    def advance(self, steps: int = 1, **status: float) -> None:
        del steps, status

    def stop(self) -> None:
        pass
