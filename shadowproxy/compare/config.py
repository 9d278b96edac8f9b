"""The `compare:` section of a route: how `shadowproxy report` reads predictions and inputs.

The proxy itself never reads these settings; they live next to the route so that one file
describes a shadow deployment end to end. Everything here is validated when the file is
loaded; whether PostgreSQL accepts a jsonpath or a slice's SQL is checked by the report.

Inputs come in three request shapes (``request_format``):

- ``json`` (default): each feature names a jsonpath, e.g. ``$.features.sqft``.
- ``instances`` (TF Serving / KServe V1): ``{"instances": [[1, 2], ...]}`` or
  ``[{"sqft": 1}, ...]``; a feature names a ``column`` (an index, or a key of object rows).
- ``v2`` (Open Inference Protocol): ``{"inputs": [{"name", "shape", "datatype", "data"}]}``;
  a feature names the tensor (``input``, default the first) and, for a 2-D tensor, the
  ``column``; flat and nested ``data`` both work, rows follow ``shape``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureConfig(_Frozen):
    """One model input: a jsonpath into the request JSON, or a column of an instances/V2 body."""

    path: str | None = None
    column: int | str | None = None
    input: str | None = None
    type: Literal["numeric", "categorical", "sparse"] | None = None
    allowed: list[str | int | float | bool] | None = None
    min: float | None = None
    max: float | None = None
    na_allowed: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> FeatureConfig:
        if self.path is not None and (self.column is not None or self.input is not None):
            raise ValueError("give either 'path' (a jsonpath) or 'column'/'input', not both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if isinstance(self.column, int) and self.column < 0:
            raise ValueError(f"column: expected an index from 0 (got {self.column})")
        return self


class SliceConfig(_Frozen):
    """A slice family from one feature: one slice per bin (numeric) or per value (categorical)."""

    feature: str
    bins: list[float] | None = Field(default=None, min_length=2)

    @model_validator(mode="after")
    def _sorted(self) -> SliceConfig:
        if self.bins is not None and sorted(set(self.bins)) != self.bins:
            raise ValueError(f"bins: expected increasing edges (got {self.bins})")
        return self


class Thresholds(_Frozen):
    """Where the verdict turns to warn or fail; the defaults are documented in docs/report.md."""

    alpha: float = Field(default=0.05, gt=0, lt=1)
    min_pairs: int = Field(default=100, ge=1)
    min_pair_completeness: float = Field(default=0.99, ge=0, le=1)
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1)
    max_latency_p99_ratio: float = Field(default=1.5, gt=0)
    min_status_agreement: float = Field(default=0.99, ge=0, le=1)
    min_agreement: float = Field(default=0.95, ge=0, le=1)
    min_kappa: float = Field(default=0.8, ge=-1, le=1)
    min_within_tolerance: float = Field(default=0.95, ge=0, le=1)
    max_distance: float = Field(default=0.1, ge=0)
    max_js_distance: float = Field(default=0.12, gt=0)
    max_drift_share: float = Field(default=0.5, gt=0, le=1)
    max_tv_distance: float = Field(default=0.05, ge=0, le=1)
    max_missing_share_change: float = Field(default=0.01, ge=0, le=1)
    max_mean_shift: float = Field(default=0.0, ge=0)
    max_rel_mean_shift: float = Field(default=0.0, ge=0)
    max_flip_share: float = Field(default=0.0, ge=0, le=1)
    min_slice_size: int = Field(default=30, ge=2)
    large_sample: int = Field(default=1000, ge=10)
    sample_max: int = Field(default=100_000, ge=1000)


class CompareConfig(_Frozen):
    """How to pair and compare the primary's and a shadow's responses for one route."""

    prediction: str = "$"
    score: str | None = None
    task: Literal["regression", "classification"] | None = None
    positive_class: str | int | float | bool | None = None
    ignore: list[str] = Field(default_factory=list)
    abs_tolerance: float = Field(default=0.0, ge=0)
    rel_tolerance: float = Field(default=0.0, ge=0)
    request_format: Literal["json", "instances", "v2"] = "json"
    features: dict[str, FeatureConfig] = Field(default_factory=dict)
    slices: dict[str, str | SliceConfig] = Field(default_factory=dict)
    baseline_shadow: str | None = None
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @model_validator(mode="after")
    def _features_fit_the_format(self) -> CompareConfig:
        for name, feature in self.features.items():
            if self.request_format == "json" and feature.path is None:
                raise ValueError(
                    f"features.{name}: expected 'path' (a jsonpath such as '$.features.{name}'); "
                    "'column'/'input' need request_format: instances or v2")
            if self.request_format == "instances" and feature.path is None:
                if feature.input is not None:
                    raise ValueError(f"features.{name}: 'input' names a V2 tensor; with "
                                     "request_format: instances give 'column'")
                if feature.column is None:
                    raise ValueError(f"features.{name}: expected 'column' (an index or a key "
                                     "of each instance) or 'path'")
            if self.request_format == "v2" and isinstance(feature.column, str):
                raise ValueError(f"features.{name}: a V2 tensor column is an index from 0 "
                                 f"(got {feature.column!r})")
        for name, spec in self.slices.items():
            if isinstance(spec, SliceConfig) and spec.feature not in self.features:
                raise ValueError(f"slices.{name}: feature {spec.feature!r} is not among the "
                                 f"features {sorted(self.features)}")
        return self
