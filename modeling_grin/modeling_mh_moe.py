"""MH-MoE: GRIN-MoE's decoder with a multi-head MoE block (arXiv 2404.15045, 2411.16205).

The block projects each token (head layer), splits it into `moe_heads` sub-tokens that GRIN's router and experts
handle as tokens of their own, puts the outputs back in token order and projects them again (merge layer). Dense
SwiGLU layers fill the layers between MoE layers. Everything else (attention, norms, cache, outputs, aux loss) is
GRIN-MoE's, reused by subclassing.
"""

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation

from .bitnet import linear_class
from .configuration_mh_moe import MhMoeConfig
from .experts import EXPERTS_FUNCTIONS, SwiGLUExperts, bitnet_experts
from .modeling_grin_moe import (
    GrinMoeAttention,
    GrinMoeDecoderLayer,
    GrinMoeForCausalLM,
    GrinMoeForSequenceClassification,
    GrinMoeModel,
    GrinMoePreTrainedModel,
    GrinMoeSparseMoeBlock,
)
from .sparsemixer import GrinMoeRouter


@bitnet_experts
@use_experts_implementation(experts_interface=EXPERTS_FUNCTIONS)
class MhMoeExperts(SwiGLUExperts):
    """The shared expert pool, acting on sub-tokens of size hidden_size / moe_heads."""


class MhMoeMLP(nn.Module):
    """A dense SwiGLU feed-forward layer: the FFN of non-MoE layers and the optional shared expert."""

    def __init__(self, config: MhMoeConfig, intermediate_size: int):
        super().__init__()
        linear = linear_class(config)  # BitNetLinear under config.bitnet
        self.gate_proj = linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class MhMoeHeadProjection(nn.Linear):
    """The head layer (d -> d before the split into sub-tokens): its own class so that `_init_weights`, which
    transformers calls per module holding parameters, can give it the papers' initialisation."""


class MhMoeMergeProjection(nn.Linear):
    """The merge layer (d -> d after the sub-tokens are put back together)."""


class MhMoeSparseMoeBlock(GrinMoeSparseMoeBlock):
    """head projection -> split into h sub-tokens -> GRIN's router + experts per sub-token -> merge -> merge projection.

    Sub-tokens of one token are contiguous, so routing rows, router logits and the load-balancing statistics are in
    token order, h rows per token. With h=1 and both projections off it is exactly GRIN's MoE block.
    """

    experts_class = MhMoeExperts

    def __init__(self, config: MhMoeConfig):
        super().__init__(config, input_size=config.sub_token_size)
        self.moe_heads = config.moe_heads
        hidden, bias = config.hidden_size, config.head_merge_bias
        self.head_proj = MhMoeHeadProjection(hidden, hidden, bias=bias) if config.use_head_projection else None
        self.merge_proj = MhMoeMergeProjection(hidden, hidden, bias=bias) if config.use_merge_projection else None
        shared = config.shared_expert_intermediate_size
        self.shared_expert = MhMoeMLP(config, shared) if shared > 0 else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        heads_in = self.head_proj(hidden_states) if self.head_proj is not None else hidden_states
        sub_tokens = heads_in.reshape(batch, length * self.moe_heads, hidden // self.moe_heads)
        output = super().forward(sub_tokens).reshape(batch, length, hidden)
        if self.merge_proj is not None:
            output = self.merge_proj(output)
        if self.shared_expert is not None:
            output = output + self.shared_expert(hidden_states)
        return output


class MhMoeDecoderLayer(GrinMoeDecoderLayer):
    def build_mlp(self, config: MhMoeConfig, layer_idx: int) -> nn.Module:
        if config.is_moe_layer(layer_idx):
            return MhMoeSparseMoeBlock(config)
        return MhMoeMLP(config, config.dense_intermediate_size)


class MhMoePreTrainedModel(GrinMoePreTrainedModel):
    config: MhMoeConfig
    _no_split_modules = ["MhMoeDecoderLayer"]
    _can_record_outputs = {
        "router_logits": GrinMoePreTrainedModel._can_record_outputs["router_logits"],
        "hidden_states": MhMoeDecoderLayer,
        "attentions": GrinMoeAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        official = self.config.init_style == "official"
        # As the papers: Xavier-uniform head layer with gain 1/sqrt(2), Xavier merge layer, merge bias 0; the head
        # bias is 0 too, or, as the official code leaves it, at nn.Linear's default.
        if isinstance(module, MhMoeHeadProjection):
            init.xavier_uniform_(module.weight, gain=1 / math.sqrt(2))
            if module.bias is not None:
                if official:
                    _linear_default_(module.bias, fan_in=module.in_features)
                else:
                    init.zeros_(module.bias)
        elif isinstance(module, MhMoeMergeProjection):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif official and isinstance(module, GrinMoeRouter):
            _linear_default_(module.weight, fan_in=module.weight.shape[1])
        elif official and isinstance(module, SwiGLUExperts):  # each expert's fc1/fc3 (gate_up) and fc2 (down)
            _linear_default_(module.gate_up_proj, fan_in=module.hidden_dim)
            _linear_default_(module.down_proj, fan_in=module.intermediate_dim)


def _linear_default_(tensor: torch.Tensor, fan_in: int) -> None:
    """PyTorch's nn.Linear initialisation (kaiming-uniform with a=sqrt(5) for weights, the same bound for biases):
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with fan_in given (a 3-D expert tensor's own fan-in rule would count E)."""
    bound = 1 / math.sqrt(fan_in)
    init.uniform_(tensor, -bound, bound)


class MhMoeModel(MhMoePreTrainedModel, GrinMoeModel):
    decoder_layer_class = MhMoeDecoderLayer


class MhMoeForCausalLM(MhMoePreTrainedModel, GrinMoeForCausalLM, GenerationMixin):
    model_class = MhMoeModel


class MhMoeForSequenceClassification(MhMoePreTrainedModel, GrinMoeForSequenceClassification):
    model_class = MhMoeModel


__all__ = [
    "MhMoePreTrainedModel",
    "MhMoeModel",
    "MhMoeForCausalLM",
    "MhMoeForSequenceClassification",
]
