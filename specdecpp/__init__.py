"""specdecpp: adaptive speculative decoding (SpecDec++) for Hugging Face draft/target pairs."""

from .decoding import Generation, speculative_generate
from .models import ModelPair, load_pair, self_draft
from .policies import (
    POLICY_NAMES,
    SVIP,
    AdaEDL,
    AdaptiveConfidence,
    Confidence,
    ConstantK,
    DraftToken,
    Heuristic,
    LengthPolicy,
    Margin,
    OnlineConfidence,
    Oracle,
    SpecDecPP,
    TargetOnly,
    make_policy,
)
from .sampling import SamplingConfig
from .stats import GenerationStats

__all__ = [
    "POLICY_NAMES", "SVIP", "AdaEDL", "AdaptiveConfidence", "Confidence", "ConstantK", "DraftToken", "Generation",
    "GenerationStats", "Heuristic", "LengthPolicy", "Margin", "ModelPair", "OnlineConfidence", "Oracle",
    "SamplingConfig", "SpecDecPP", "TargetOnly", "load_pair", "make_policy", "self_draft", "speculative_generate",
]
