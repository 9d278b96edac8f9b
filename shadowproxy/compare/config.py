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

A route serving a generative model (OpenAI-compatible chat or text completions) is compared
as ``task: generation`` (inferred from the responses when ``task`` is absent), with the
settings of ``generation:`` (prices, an embeddings endpoint, text normalization, how many of
the most different pairs to show, built-in slices); docs/generative.md has the figures.
"""

from __future__ import annotations

import math
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shadowproxy.durations import finite_seconds


class FrozenModel(BaseModel):
    """The base of every configuration model, here and in ``shadowproxy.config``: unknown
    keys are refused (a misspelt key is an error, not a silent default) and values are
    frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic reads true as 1 and false as 0, and YAML reads yes/no and on/off as
        # true/false: `max_body_bytes: off` recorded no body, `queue_max_records: yes`
        # kept a queue of one record, `sample_rate: no` mirrored nothing, all silently.
        if isinstance(value, bool) and info.field_name is not None \
                and _number_only(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, not the boolean {str(value).lower()} "
                             "(YAML reads true/false, yes/no and on/off as booleans)")
        return value


def _number_only(annotation: Any) -> bool:
    """Whether a field takes numbers (or null) and nothing else: not ``bool`` itself, nor
    a union that has it (``positive_class``)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return bool(kinds) and all(a in (int, float) for a in kinds)
    return False


class FeatureConfig(FrozenModel):
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
        for name, bound in (("min", self.min), ("max", self.max)):
            # No value compares outside a NaN bound: the range check would pass everything.
            if bound is not None and math.isnan(bound):
                raise ValueError(f"{name}: expected a number, not NaN (leave the key out for "
                                 "no bound)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if isinstance(self.column, int) and self.column < 0:
            raise ValueError(f"column: expected an index from 0 (got {self.column})")
        return self


class SliceConfig(FrozenModel):
    """A slice family from one feature: one slice per bin (numeric) or per value (categorical)."""

    feature: str
    bins: list[float] | None = Field(default=None, min_length=2)

    @model_validator(mode="after")
    def _sorted(self) -> SliceConfig:
        # NaN orders with nothing (and hashes by identity, so the set test passed it or not
        # by chance); infinite outer edges are fine: an open-ended first or last bin.
        if self.bins is not None and (any(math.isnan(b) for b in self.bins)
                                      or sorted(set(self.bins)) != self.bins):
            raise ValueError(f"bins: expected increasing edges (got {self.bins})")
        return self


class Thresholds(FrozenModel):
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
    # Accepted so that files that set it stay valid; no rule reads it (drift of categories
    # is judged by max_tv_distance).
    max_js_distance: float = Field(default=0.12, gt=0)
    max_drift_share: float = Field(default=0.5, gt=0, le=1)
    max_tv_distance: float = Field(default=0.05, ge=0, le=1)
    max_missing_share_change: float = Field(default=0.01, ge=0, le=1)
    max_mean_shift: float = Field(default=0.0, ge=0)
    max_rel_mean_shift: float = Field(default=0.0, ge=0)
    max_flip_share: float = Field(default=0.0, ge=0, le=1)
    min_slice_size: int = Field(default=30, ge=2)
    # Accepted so that files that set it stay valid; no rule switches at a sample size.
    large_sample: int = Field(default=1000, ge=10)
    sample_max: int = Field(default=100_000, ge=1000)
    # compare.task: generation
    min_normalized_match: float = Field(default=0.9, ge=0, le=1)
    min_finish_reason_agreement: float = Field(default=0.95, ge=0, le=1)
    min_tool_call_agreement: float = Field(default=0.95, ge=0, le=1)
    max_json_validity_drop: float = Field(default=0.01, ge=0, le=1)
    max_reference_match_drop: float = Field(default=0.05, ge=0, le=1)
    max_ttft_p99_ratio: float = Field(default=1.5, gt=0)


class PriceConfig(FrozenModel):
    """What a model costs, per million tokens of input (prompt) and output (completion)."""

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)


class EmbeddingsConfig(FrozenModel):
    """An OpenAI-compatible embeddings endpoint for the semantic similarity of answers."""

    url: str
    model: str | None = None
    api_key_env: str | None = None
    """The environment variable holding the endpoint's API key (sent as a bearer token)."""
    timeout_s: float = Field(default=60.0, gt=0)
    max_pairs: int = Field(default=1000, ge=1)
    """At most this many pairs are embedded (a seeded sample of the compared ones)."""

    @field_validator("timeout_s")
    @classmethod
    def _timeout(cls, value: float) -> float:
        return finite_seconds(value, "a silent endpoint would hold the report for ever; "
                                     "give the longest a request may take, e.g. 300")

    @model_validator(mode="after")
    def _http(self) -> EmbeddingsConfig:
        if not self.url.startswith(("http://", "https://")):
            from shadowproxy.config import shown_url  # imports this module

            raise ValueError(f"url: expected an http:// or https:// URL such as "
                             f"http://127.0.0.1:8000/v1/embeddings (got "
                             f"{shown_url(self.url)!r})")
        return self


BuiltinSlice = Literal["prompt_length", "model", "stream"]
BUILTIN_SLICES: tuple[BuiltinSlice, ...] = ("prompt_length", "model", "stream")
"""Slice families every generation report can make from the request itself."""


class GenerationConfig(FrozenModel):
    """How ``task: generation`` compares answers (see docs/generative.md)."""

    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    """Per target: ``primary``, or a shadow's (or replayed target's) name."""
    embeddings: EmbeddingsConfig | None = None
    strip_punctuation: bool = False
    most_different: int = Field(default=10, ge=0, le=100)
    builtin_slices: list[BuiltinSlice] = Field(default_factory=lambda: list(BUILTIN_SLICES))


class CompareConfig(FrozenModel):
    """How to pair and compare the primary's and a shadow's responses for one route."""

    prediction: str = "$"
    score: str | None = None
    task: Literal["regression", "classification", "generation"] | None = None
    positive_class: str | int | float | bool | None = None
    ignore: list[str] = Field(default_factory=list)
    abs_tolerance: float = Field(default=0.0, ge=0)
    rel_tolerance: float = Field(default=0.0, ge=0)
    request_format: Literal["json", "instances", "v2"] = "json"
    features: dict[str, FeatureConfig] = Field(default_factory=dict)
    slices: dict[str, str | SliceConfig] = Field(default_factory=dict)
    baseline_shadow: str | None = None
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
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
