"""The `fused` experts implementation: (token, expert) pairs sorted once, grouped GEMMs, a hand-written backward.

Forward, with N = tokens x top_k routed pairs sorted by expert:
    xs = x[token_of]                        gather the routed rows once
    gate_up = grouped_mm(xs, W_gate_up)     [N, 2I], one GEMM per expert over its contiguous rows
    h = act(gate) * up                      [N, I]
    ys = grouped_mm(h, W_down)              [N, H]
    out[t] = sum_k w[t, k] * ys[pair(t, k)] routing weights applied inside the combine
Backward reuses the same sort and offsets: dW_down and dW_gate_up are k-grouped GEMMs (X_e^T dY_e per expert), dX a
grouped GEMM plus one scatter-add, and the routing-weight gradient a row-wise dot product with the saved ys. Only
gate_up (for the activation's backward) and ys (for the routing-weight gradient) are kept from the forward; xs is
gathered again instead of stored.
"""

import torch
from transformers.integrations.moe import ExpertsInterface


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`a` [N, K] x `b` [E, K, M] -> [N, M] per row group; or `a` [K, N] x `b` [N, M] -> [E, K, M] (k-grouped)."""
    return torch._grouped_mm(a, b.to(a.dtype), offs=offsets)


class SortedSwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, routing_weights, expert_index, gate_up_proj, down_proj, act_fn):
        num_tokens, top_k = expert_index.shape
        num_experts = gate_up_proj.shape[0]
        flat_index = expert_index.reshape(-1)
        order = torch.argsort(flat_index, stable=True)
        token_of = order // top_k
        offsets = torch.bincount(flat_index, minlength=num_experts).cumsum(0).to(torch.int32)
        sorted_weights = routing_weights.reshape(-1)[order]

        gate_up = _grouped_mm(hidden_states.index_select(0, token_of), gate_up_proj.transpose(1, 2), offsets)
        gate, up = gate_up.chunk(2, dim=-1)
        expert_outputs = _grouped_mm(act_fn(gate) * up, down_proj.transpose(1, 2), offsets)
        weighted = expert_outputs * sorted_weights.to(expert_outputs.dtype).unsqueeze(-1)
        output = torch.zeros_like(hidden_states).index_add_(0, token_of, weighted.to(hidden_states.dtype))

        ctx.act_fn = act_fn
        ctx.routing_shape = routing_weights.shape
        ctx.save_for_backward(
            hidden_states, order, token_of, offsets, sorted_weights, gate_up, expert_outputs, gate_up_proj, down_proj
        )
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (hidden_states, order, token_of, offsets, sorted_weights, gate_up, expert_outputs, gate_up_proj, down_proj) = (
            ctx.saved_tensors
        )
        need_hidden, need_weights, _, need_gate_up, need_down, _ = ctx.needs_input_grad
        grad_rows = grad_output.index_select(0, token_of).to(expert_outputs.dtype)  # dL/d(weighted row), [N, H]

        grad_routing = None
        if need_weights:
            grad_sorted = (grad_rows * expert_outputs).sum(-1).to(sorted_weights.dtype)
            grad_routing = torch.empty_like(grad_sorted).index_put_((order,), grad_sorted).view(ctx.routing_shape)

        grad_expert_outputs = grad_rows * sorted_weights.to(grad_rows.dtype).unsqueeze(-1)
        with torch.enable_grad():  # the activation's backward, for any act_fn, by autograd on [N, 2I] elementwise work
            gate_up = gate_up.detach().requires_grad_(True)
            gate, up = gate_up.chunk(2, dim=-1)
            activated = ctx.act_fn(gate) * up
        grad_activated = _grouped_mm(grad_expert_outputs, down_proj, offsets)
        (grad_gate_up,) = torch.autograd.grad(activated, gate_up, grad_activated)

        grad_down = grad_gate_up_proj = None
        if need_down:
            grad_down = _grouped_mm(grad_expert_outputs.t(), activated.detach(), offsets).to(down_proj.dtype)
        if need_gate_up:
            rows = hidden_states.index_select(0, token_of).to(grad_gate_up.dtype)
            grad_gate_up_proj = _grouped_mm(grad_gate_up.t(), rows, offsets).to(gate_up_proj.dtype)
        grad_hidden = None
        if need_hidden:
            grad_rows_in = _grouped_mm(grad_gate_up, gate_up_proj, offsets)
            grad_hidden = torch.zeros_like(hidden_states).index_add_(0, token_of, grad_rows_in.to(hidden_states.dtype))
        return grad_hidden, grad_routing, None, grad_gate_up_proj, grad_down, None


def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """`experts_implementation="fused"`: the sorted grouped-GEMM path above (Triton kernels on CUDA are planned)."""
    if self.is_transposed or self.has_bias or not self.has_gate:
        raise ValueError("the fused experts implementation supports gated experts without bias in [E, out, in] layout")
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)
    return SortedSwiGLUExperts.apply(
        hidden_states, top_k_weights, top_k_index, self.gate_up_proj, self.down_proj, self.act_fn
    )


ExpertsInterface.register("fused", fused_experts_forward)
