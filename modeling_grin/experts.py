"""SwiGLU experts stored as 3-D parameters, so that every transformers experts implementation applies to them.

Each model file subclasses `SwiGLUExperts` under `@use_experts_implementation`: transformers only lets a model choose
its experts implementation when the model's own source file carries that decorator.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .fused_experts import fused_experts_forward  # noqa: F401  (registers experts_implementation="fused")


class SwiGLUExperts(nn.Module):
    """`num_local_experts` SwiGLU experts: y = down(act(gate(x)) * up(x)).

    Parameters (the layout of transformers' Mixtral/Phimoe experts):
        gate_up_proj `[E, 2 * I, H]`: the gate rows (GRIN's `w1`) then the up rows (`w3`);
        down_proj `[E, H, I]` (GRIN's `w2`).
    `input_size` defaults to `hidden_size`; MH-MoE passes the sub-token size.

    The forward below is the `eager` implementation, the readable reference every faster one is tested against.
    """

    def __init__(self, config, input_size: int | None = None):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = input_size or config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states `[T, H]`, top_k_index and top_k_weights `[T, k]` -> `sum_k weight_k * expert_k(x)` `[T, H]`."""
        output = torch.zeros_like(hidden_states)
        # unbind gives per-expert views whose backward is cheaper than indexing the 3-D parameter in the loop
        expert_weights = zip(self.gate_up_proj.unbind(0), self.down_proj.unbind(0), strict=True)
        for expert, (gate_up_proj, down_proj) in enumerate(expert_weights):
            token_index, slot = torch.where(top_k_index == expert)
            if token_index.numel() == 0:
                continue
            gate, up = nn.functional.linear(hidden_states[token_index], gate_up_proj).chunk(2, dim=-1)
            expert_output = nn.functional.linear(self.act_fn(gate) * up, down_proj)
            expert_output = expert_output * top_k_weights[token_index, slot, None]
            output.index_add_(0, token_index, expert_output.to(output.dtype))
        return output


def grouped_mm_takes_shape(experts: SwiGLUExperts, dtype: torch.dtype) -> bool:
    """torch's grouped GEMM needs every row of its operands to start on a 16-byte boundary: hidden and expert sizes
    that are multiples of 4 elements in fp32, 8 in bf16."""
    return all(size * dtype.itemsize % 16 == 0 for size in (experts.hidden_dim, experts.intermediate_dim))


def grouped_mm_or_eager(self, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped_mm, and the eager loop where torch's grouped GEMM cannot take the shape: configs that
    validate (hidden size 30, expert size 47, MH-MoE sub-tokens of 2) would otherwise fail with "strides should be
    multiple of 16 bytes" on the default implementation."""
    if grouped_mm_takes_shape(self, hidden_states.dtype):
        # Looked up per call, as transformers' own models do: a kernel (or a test) may register another grouped_mm.
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    return SwiGLUExperts.forward(self, hidden_states, top_k_index, top_k_weights)


# The experts implementations our models dispatch through: transformers' own, with grouped_mm made shape-safe.
EXPERTS_FUNCTIONS = ExpertsInterface()
EXPERTS_FUNCTIONS["grouped_mm"] = grouped_mm_or_eager
