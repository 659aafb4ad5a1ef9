"""MICE-Bench judges for real images: IF (detector + VLM yes/no votes), CC (DINO-style features against the original
image), GA (VLM over the whole image sequence, cumulative), behind one small protocol.

Back-ends: local transformers models from a folder (`local.py`) or an OpenAI-compatible server (`http.py`). A judge
that fails is retried, then recorded as missing; it never returns a made-up score. transformers is imported only
when a local back-end is built.
"""

from .cc_judge import CCConfig, CCJudge
from .config import JudgeConfig, JudgeSet, build_judges, load_judge_config
from .ga_judge import GAConfig, GAJudge, parse_ga_answer
from .http import OpenAIChatConfig, OpenAIChatVLM
from .if_judge import IFConfig, IFJudge, parse_formatted_instruction
from .local import LocalDetectorConfig, LocalModelConfig, LocalVLMConfig
from .protocol import (
    BackendError,
    Judge,
    JudgeError,
    JudgeInputError,
    Judgement,
    JudgeParseError,
    RetryPolicy,
    TurnRequest,
    aggregate_votes,
    parse_yes_no,
)
from .rewards import REWARD_WEIGHTS, JudgeReward, mice_reward_functions

__all__ = [
    "BackendError", "CCConfig", "CCJudge", "GAConfig", "GAJudge", "IFConfig", "IFJudge", "Judge", "JudgeConfig",
    "JudgeError", "JudgeInputError", "JudgeParseError", "JudgeReward", "JudgeSet", "Judgement",
    "LocalDetectorConfig", "LocalModelConfig", "LocalVLMConfig", "OpenAIChatConfig", "OpenAIChatVLM",
    "REWARD_WEIGHTS", "RetryPolicy", "TurnRequest", "aggregate_votes", "build_judges", "load_judge_config",
    "mice_reward_functions", "parse_formatted_instruction", "parse_ga_answer", "parse_yes_no",
]
