"""The options of DNAL's channel stages: one typed model for ``morphnas prune`` and for
``--strategy dnal`` at ``level=channels`` (light, so a strategy can hold it without the engine)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChannelOptions(BaseModel):
    """How DNAL learns channels (the authors' VGG16 defaults where they apply, spec §4b)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The authors' ImageNet default is 1e-4; on networks of our sizes, where each channel's
    # gradient is larger, that prunes almost nothing (docs/method.md), so the default is 1e-2.
    lambdas: tuple[float, ...] = Field((1e-2,), min_length=1)
    arch_epochs: int = Field(10, ge=1)
    beta_start: float = Field(1.0, gt=0)
    beta_end: float = Field(1e4, gt=0)
    threshold: float = Field(0.9, gt=0, lt=1)
    penalty: Literal["unscaled", "scaled"] = "unscaled"
    arch_lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    finetune_epochs: int | None = Field(None, ge=0)
    # None: a tenth of the run's own learning rate (Adam from trained weights at the full rate
    # throws them away in the first epochs; the authors fine-tune at their training rate with
    # SGD, whose steps are not Adam's).
    finetune_lr: float | None = Field(None, gt=0)
    train_head: bool = False

    @field_validator("lambdas")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        bad = [lam for lam in value if not lam >= 0]
        if bad:
            raise ValueError(f"a sparsity λ must be >= 0, got {bad[0]!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"λ values must differ, got {list(value)}")
        return value

    def model_post_init(self, _: Any) -> None:
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be >= beta_start")
