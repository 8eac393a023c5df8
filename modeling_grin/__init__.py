"""Hugging Face transformers integration of GRIN-MoE (SparseMixer-v2 routing) and MH-MoE.

Importing the package registers the configs and models with transformers' Auto classes, so released checkpoints
(`model_type: "grinmoe"`) load through `AutoModelForCausalLM.from_pretrained` without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_grin_moe import GrinMoeConfig
from .configuration_mh_moe import MhMoeConfig
from .modeling_grin_moe import (
    GrinMoeForCausalLM,
    GrinMoeForSequenceClassification,
    GrinMoeModel,
    GrinMoePreTrainedModel,
)
from .modeling_mh_moe import MhMoeForCausalLM, MhMoeForSequenceClassification, MhMoeModel, MhMoePreTrainedModel

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    for config_class, base, causal_lm, classifier in (
        (GrinMoeConfig, GrinMoeModel, GrinMoeForCausalLM, GrinMoeForSequenceClassification),
        (MhMoeConfig, MhMoeModel, MhMoeForCausalLM, MhMoeForSequenceClassification),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base, exist_ok=True)
        AutoModelForCausalLM.register(config_class, causal_lm, exist_ok=True)
        AutoModelForSequenceClassification.register(config_class, classifier, exist_ok=True)


_register_auto_classes()

__all__ = [
    "GrinMoeConfig",
    "GrinMoePreTrainedModel",
    "GrinMoeModel",
    "GrinMoeForCausalLM",
    "GrinMoeForSequenceClassification",
    "MhMoeConfig",
    "MhMoePreTrainedModel",
    "MhMoeModel",
    "MhMoeForCausalLM",
    "MhMoeForSequenceClassification",
]
