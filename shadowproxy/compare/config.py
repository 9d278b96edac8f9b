"""The `compare:` section of a route: how `shadowproxy report` reads predictions and inputs.

The proxy itself never reads these settings; they live next to the route so that one file
describes a shadow deployment end to end.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureConfig(_Frozen):
    """One model input, read from the request JSON with a PostgreSQL jsonpath."""

    path: str
    type: Literal["numeric", "categorical", "sparse"] | None = None
    allowed: list[str | int | float | bool] | None = None
    min: float | None = None
    max: float | None = None
    na_allowed: bool = True


class CompareConfig(_Frozen):
    """How to pair and compare the primary's and a shadow's responses for one route."""

    prediction: str = "$"
    task: Literal["regression", "classification"] | None = None
    ignore: list[str] = Field(default_factory=list)
    abs_tolerance: float = Field(default=0.0, ge=0)
    rel_tolerance: float = Field(default=0.0, ge=0)
    features: dict[str, FeatureConfig] = Field(default_factory=dict)
    slices: dict[str, str] = Field(default_factory=dict)
    baseline_shadow: str | None = None
