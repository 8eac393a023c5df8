"""SwiGLU experts stored as 3-D parameters, so that every transformers experts implementation applies to them.

Each model file subclasses `SwiGLUExperts` under `@use_experts_implementation`: transformers only lets a model choose
its experts implementation when the model's own source file carries that decorator.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .fused_experts import cpu_swiglu_experts, grouped_mm_takes_shape  # (registers experts_implementation="fused")


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


def default_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Our models' `grouped_mm` (the default experts implementation).

    On the CPU: `cpu_swiglu_experts`, the fastest path measured in whole models for each case (docs/benchmarks.md):
    decoding touches only the experts that were hit, training runs the sorted rows of `fused_experts.py`, other
    inference transformers' grouped_mm; any hidden and expert size. Elsewhere transformers' grouped_mm, and the eager
    loop where torch's grouped GEMM cannot take the shape: configs that validate (hidden size 30, expert size 47,
    MH-MoE sub-tokens of 2) would otherwise fail with "strides should be multiple of 16 bytes"."""
    if hidden_states.device.type == "cpu":
        return cpu_swiglu_experts(self, hidden_states, top_k_index, top_k_weights)
    if grouped_mm_takes_shape(self, hidden_states.dtype):
        # Looked up per call, as transformers' own models do: a kernel may register another grouped_mm.
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    return SwiGLUExperts.forward(self, hidden_states, top_k_index, top_k_weights)


# The experts implementations our models dispatch through: transformers' own, with grouped_mm replaced by ours.
EXPERTS_FUNCTIONS = ExpertsInterface()
EXPERTS_FUNCTIONS["grouped_mm"] = default_experts_forward
