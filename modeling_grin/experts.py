"""SwiGLU experts stored as 3-D parameters, so that every transformers experts implementation applies to them.

Each model file subclasses `SwiGLUExperts` under `@use_experts_implementation`: transformers only lets a model choose
its experts implementation when the model's own source file carries that decorator.
"""

import contextlib
import functools

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .bitnet import dequantize_ternary, packed_weight_state, quantize_activations, ternary_weight, unpack_ternary
from .fused_experts import (  # (registers experts_implementation="fused")
    cpu_swiglu_experts,
    decodes_few_pairs,
    grouped_mm_takes_shape,
)

# The implementations that compute the SwiGLU through `_apply_gate` or quantize it themselves, as BitNet needs.
BITNET_EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "fused")
_TERNARY = ("gate_up_proj", 2), ("down_proj", 1)  # BitNet's scales per expert: gate and up apart, and down


class SwiGLUExperts(nn.Module):
    """`num_local_experts` SwiGLU experts: y = down(act(gate(x)) * up(x)).

    Parameters (the layout of transformers' Mixtral/Phimoe experts):
        gate_up_proj `[E, 2 * I, H]`: the gate rows (GRIN's `w1`) then the up rows (`w3`);
        down_proj `[E, H, I]` (GRIN's `w2`).
    `input_size` defaults to `hidden_size`; MH-MoE passes the sub-token size.

    The forward below is the `eager` implementation, the readable reference every faster one is tested against.
    With `config.bitnet` every implementation computes with ternary weights and int8 activations (see
    `bitnet_experts`); `pack_ternary_` then turns the latent weights into their 2-bit codes for inference.
    """

    def __init__(self, config, input_size: int | None = None):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = input_size or config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        self.bitnet = bool(getattr(config, "bitnet", False))

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up, the input of `down_proj`: int8-quantized per row under BitNet. transformers' grouped_mm
        and batched_mm call this too."""
        gate, up = gate_up.chunk(2, dim=-1)
        activated = self.act_fn(gate) * up
        return quantize_activations(activated) if self.bitnet else activated

    def __getattr__(self, name: str):
        # While a BitNet forward runs, `gate_up_proj` and `down_proj` are the ternary weights, so every experts
        # implementation (transformers' included) computes with them; the latent parameters keep their names in
        # the state dict and get the straight-through gradient.
        ternary = self.__dict__.get("_ternary_weights")
        if ternary is not None and name in ternary:
            return ternary[name]
        return super().__getattr__(name)

    @contextlib.contextmanager
    def ternary_weights(self, dtype: torch.dtype, top_k_index: torch.Tensor):
        """Within: the experts' weights are ternary times a scale per expert and matrix, from the latent parameters
        (training, with straight-through gradients) or from the packed codes (after `pack_ternary_`). Yields the
        expert ids to compute with: decoding from packed codes on the CPU (as few routed pairs as take
        `few_pairs_swiglu_experts`) unpacks only the experts that were hit, renumbered in order (sentinels stay
        >= E)."""
        if "gate_up_proj_codes" not in self._buffers:
            if nn.utils.parametrize.is_parametrized(self):  # a parametrization's property would bypass the swap
                raise ValueError("bitnet=True experts cannot be parametrized (PEFT LoRA on the experts, "
                                 "target_parameters): adapt the attention only, lora_config(model, experts=False)")
            weights = {name: ternary_weight(self._parameters[name], groups) for name, groups in _TERNARY}
        else:
            experts = slice(None)
            if top_k_index.device.type == "cpu" and decodes_few_pairs(top_k_index, self.num_experts):
                experts = torch.unique(top_k_index[top_k_index < self.num_experts])
                renumber = top_k_index.new_full((self.num_experts + 1,), self.num_experts)
                renumber[experts] = torch.arange(len(experts), device=experts.device)
                top_k_index = renumber[top_k_index.clamp(max=self.num_experts)]
            rows = {"gate_up_proj": 2 * self.intermediate_dim, "down_proj": self.hidden_dim}
            weights = {
                name: dequantize_ternary(unpack_ternary(self._buffers[f"{name}_codes"][experts], rows[name]),
                                         self._buffers[f"{name}_inverse_scale"][experts], dtype)
                for name, _ in _TERNARY
            }
        self.__dict__["_ternary_weights"] = weights
        try:
            yield top_k_index
        finally:
            del self.__dict__["_ternary_weights"]

    @torch.no_grad()
    def packed_state(self) -> dict[str, torch.Tensor]:
        """The 2-bit codes (`gate_up_proj_codes` `[E, ceil(2I / 4), H]`, `down_proj_codes`, uint8) and inverse scales
        (`*_inverse_scale` `[E, 2]` and `[E, 1]`, fp32) of the ternary weights."""
        if not self.bitnet:
            raise ValueError("only BitNet experts (config.bitnet=True) have ternary weights to pack")
        return {key: tensor for name, groups in _TERNARY
                for key, tensor in packed_weight_state(name, self._parameters[name], groups).items()}

    def pack_ternary_(self) -> None:
        """Replace the latent weights by `packed_state()`: inference only, the same outputs as the training forward
        in eval mode."""
        for key, tensor in self.packed_state().items():
            self.register_buffer(key, tensor)
        for name, _ in _TERNARY:
            del self._parameters[name]

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
            gate_up = nn.functional.linear(hidden_states[token_index], gate_up_proj)
            expert_output = nn.functional.linear(self._apply_gate(gate_up), down_proj)
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


def bitnet_experts(experts_class: type[SwiGLUExperts]) -> type[SwiGLUExperts]:
    """Wrap the forward that `use_experts_implementation` dispatches: under `config.bitnet` the chosen implementation
    runs on int8 inputs (per row) with the ternary weights in place of the latent ones (`ternary_weights`); the SwiGLU
    output is quantized by `_apply_gate` (or inside `fused`)."""
    dispatch = experts_class.forward

    @functools.wraps(dispatch)
    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not self.bitnet:
            return dispatch(self, hidden_states, top_k_index, top_k_weights)
        implementation = self.config._experts_implementation or "eager"
        if implementation not in BITNET_EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"bitnet=True runs the experts with experts_implementation one of "
                             f"{BITNET_EXPERTS_IMPLEMENTATIONS}, got {implementation!r}")
        with self.ternary_weights(hidden_states.dtype, top_k_index) as expert_index:
            return dispatch(self, quantize_activations(hidden_states), expert_index, top_k_weights)

    experts_class.forward = forward
    return experts_class
