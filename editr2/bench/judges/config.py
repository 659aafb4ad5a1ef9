"""Typed judge configuration (a YAML file for the CLI) and the builder that turns it into judges.

Example (docs/mice_bench.md has more)::

    vlm:                      # needed by IF and GA
      backend: openai         # "openai" (an OpenAI-compatible server, e.g. vLLM) or "transformers" (a local folder)
      model: Qwen2.5-VL-32B-Instruct
      base_url_env: EDITR2_JUDGE_BASE_URL
      api_key_env: EDITR2_JUDGE_API_KEY
      max_concurrency: 16
    detector: {path: /models/grounding-dino-base, device: cuda}     # optional (IF checks, CC boxes)
    features: {path: /models/dinov2-base, device: cuda}             # needed by CC
    if: {num_votes: 4}
    ga: {num_votes: 4, temperature: 0.6}
    retry: {max_attempts: 3, initial_backoff_s: 0.5}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .cc_judge import CCConfig, CCJudge
from .ga_judge import GAConfig, GAJudge
from .http import OpenAIChatConfig
from .if_judge import IFConfig, IFJudge
from .local import LocalDetectorConfig, LocalModelConfig, LocalVLMConfig
from .protocol import Judgement, RetryPolicy, TurnRequest

JUDGE_METRICS = ("IF", "CC", "GA")
VLM_BACKENDS = ("openai", "transformers")


@dataclass
class JudgeConfig:
    """Which back-ends the judges use and how they vote.

    Attributes:
        vlm: `OpenAIChatConfig` or `LocalVLMConfig` (needed by IF and GA), or None.
        detector: `LocalDetectorConfig`, or None (IF then asks the VLM; CC skips the object term).
        features: `LocalModelConfig` of a DINO-style model (needed by CC), or None.
        if_judge, cc, ga: per-judge settings.
        retry: retry policy for unparsable answers and back-end calls.
        metrics: which of IF, CC, GA to compute.
    """

    vlm: OpenAIChatConfig | LocalVLMConfig | None = None
    detector: LocalDetectorConfig | None = None
    features: LocalModelConfig | None = None
    if_judge: IFConfig = field(default_factory=IFConfig)
    cc: CCConfig = field(default_factory=CCConfig)
    ga: GAConfig = field(default_factory=GAConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    metrics: tuple[str, ...] = JUDGE_METRICS

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in JUDGE_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(JUDGE_METRICS)}")
        if ("IF" in self.metrics or "GA" in self.metrics) and self.vlm is None:
            raise ValueError("IF and GA need a `vlm` section (backend: openai or transformers); or set `metrics` to "
                             "leave them out")
        if "CC" in self.metrics and self.features is None:
            raise ValueError("CC needs a `features` section (a DINO-style model path); or set `metrics` to leave it "
                             "out")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JudgeConfig":
        """Build from a plain dict (a parsed YAML file). Unknown keys raise a `ValueError` listing the known ones."""
        data = dict(data or {})
        sections = {"vlm", "detector", "features", "if", "cc", "ga", "retry", "metrics"}
        unknown = sorted(set(data) - sections)
        if unknown:
            raise ValueError(f"unknown judge config key(s) {unknown}; known: {sorted(sections)}")
        kwargs: dict[str, Any] = {}
        if data.get("vlm") is not None:
            vlm = dict(data["vlm"])
            backend = vlm.pop("backend", "openai")
            if backend not in VLM_BACKENDS:
                raise ValueError(f"vlm.backend must be one of {list(VLM_BACKENDS)}, got {backend!r}")
            kwargs["vlm"] = _build(OpenAIChatConfig if backend == "openai" else LocalVLMConfig, vlm, "vlm")
        if data.get("detector") is not None:
            kwargs["detector"] = _build(LocalDetectorConfig, data["detector"], "detector")
        if data.get("features") is not None:
            kwargs["features"] = _build(LocalModelConfig, data["features"], "features")
        for key, name, kind in (("if", "if_judge", IFConfig), ("cc", "cc", CCConfig), ("ga", "ga", GAConfig),
                                ("retry", "retry", RetryPolicy)):
            if data.get(key) is not None:
                kwargs[name] = _build(kind, data[key], key)
        if data.get("metrics") is not None:
            kwargs["metrics"] = tuple(data["metrics"])
        return cls(**kwargs)


def _build(kind, values: dict, section: str):
    if not isinstance(values, dict):
        raise ValueError(f"judge config section {section!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in judge config section {section!r}; known: {sorted(known)}")
    return kind(**values)


def load_judge_config(path: str | Path) -> JudgeConfig:
    """Read a YAML (or JSON) judge config file."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a judge config must be a mapping at the top level")
    try:
        return JudgeConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


# ---------------------------------------------------------------------------------------------------------------------
# The judges of one configuration
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class JudgeSet:
    """The IF, CC and GA judges of one configuration (None for a metric left out)."""

    if_judge: IFJudge | None = None
    cc_judge: CCJudge | None = None
    ga_judge: GAJudge | None = None

    @property
    def metrics(self) -> list[str]:
        pairs = (("IF", self.if_judge), ("CC", self.cc_judge), ("GA", self.ga_judge))
        return [name for name, judge in pairs if judge is not None]

    def judge_session(self, session, images: Sequence[Image.Image]) -> dict[str, list[Judgement]]:
        """All metrics for every turn of a `MiceSession`, given ``images = [source, out_1, ..., out_T]``."""
        requests = [TurnRequest.from_session(session, images, t) for t in range(session.num_turns)]
        results: dict[str, list[Judgement]] = {}
        if self.if_judge is not None:
            results["IF"] = self.if_judge.judge_many(requests)
        if self.cc_judge is not None:
            results["CC"] = self.cc_judge.judge_many(requests)
        if self.ga_judge is not None:
            results["GA"] = self.ga_judge.judge_session(list(images), list(session.instruction))
        return results


def build_vlm(config: OpenAIChatConfig | LocalVLMConfig):
    if isinstance(config, OpenAIChatConfig):
        from .http import OpenAIChatVLM

        return OpenAIChatVLM(config)
    from .local import TransformersVLM

    return TransformersVLM(config)


def build_judges(config: JudgeConfig, *, vlm=None, detector=None, features=None) -> JudgeSet:
    """Load the back-ends a config names and build its judges.

    Args:
        config: the `JudgeConfig`.
        vlm, detector, features: ready back-ends to use instead of loading the configured ones (tests, sharing).
    """
    from .local import TransformersDetector, TransformersFeatures

    if vlm is None and config.vlm is not None and ("IF" in config.metrics or "GA" in config.metrics):
        vlm = build_vlm(config.vlm)
    if detector is None and config.detector is not None:
        detector = TransformersDetector(config.detector)
    if features is None and config.features is not None and "CC" in config.metrics:
        features = TransformersFeatures(config.features)
    judges = JudgeSet()
    if "IF" in config.metrics:
        judges.if_judge = IFJudge(vlm, detector, config.if_judge, config.retry)
    if "CC" in config.metrics:
        judges.cc_judge = CCJudge(features, detector, config.cc, config.retry)
    if "GA" in config.metrics:
        judges.ga_judge = GAJudge(vlm, config.ga, config.retry)
    return judges
