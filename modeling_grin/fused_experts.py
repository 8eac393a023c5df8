"""The `fused` experts implementation: (token, expert) pairs sorted once, one GEMM per expert, a hand-written backward.

The N = tokens x top_k routed pairs are laid out as expert-contiguous *rows* (a `_Plan`, built once per call and
reused by the backward), in one of two layouts:

* batched: every expert gets the same number M of rows (the largest expert load; pad rows carry routing weight 0),
  so every GEMM is one `torch.bmm` over the experts' 3-D weights (views, never copies). On CPU this runs whole
  per-expert GEMMs on each thread instead of splitting each small GEMM over the threads, which is what makes it
  faster than a loop of per-expert GEMMs or `torch._grouped_mm` (see `PADDING_SLACK`). It costs E x M - N extra rows.
* looped: the sorted pairs exactly (no padding), one `torch.mm` per expert that was hit, over its contiguous slice,
  written in place (`out=`); empty experts cost nothing. Used when padding would waste too much: skewed routing and
  small batches (decode: 1 token x top-2 touches 2 experts, the batched layout would read all 16).
  On CUDA the looped layout runs `torch._grouped_mm` (no host synchronisation).
Expert ids >= E are the sentinels of transformers' expert parallelism (the pair's expert lives on another rank): they
get no row and no compute, their (token, slot) output is zero and so is their routing-weight gradient.

Forward, rows r of expert e:
    xs[r] = x[token(r)]                     one gather into the row buffer
    gate_up = xs @ W_gate_up[e]^T           [R, 2I]
    h = act(gate) * up                      [R, I]
    ys = h @ W_down[e]^T                    [R, H]
    out[t] = sum_k w[t, k] * ys[row(t, k)]  one gather to [T, k, H], the routing weights applied by a batched dot
Backward (same rows): gs[r] = grad_out[token(r)] (one gather); g = gs @ W_down[e] [R, I]; dh = w(r) * g; the SwiGLU
derivative by hand for SiLU (`torch.func.vjp` of the activation alone for any other act_fn), which also recomputes h
from gate_up; the routing weight gradient <grad_out[t], ys[t, k]> = <g, h> per row; dW_down = gs^T (w h) and
dW_gate_up = dgate_up^T xs per expert (xs gathered again); dx rows = dgate_up @ W_gate_up[e], summed over k by a
gather and a batched dot.
Saved for the backward: gate_up only (the [R, 2I] pre-activations), as in the Triton kernels; the inputs are kept by
reference.
"""

import itertools
import re

import torch
from torch import nn
from transformers.activations import ACT2FN, SiLUActivation
from transformers.integrations.moe import ExpertsInterface

from .triton_experts import runs_here, triton_swiglu_experts

# The batched (padded `bmm`) layout is used when E x M padded rows are at most PADDING_SLACK x the N routed pairs and
# torch runs more than one thread; otherwise the looped one. Measured on this project's 2-core CPU (shared with other
# jobs, so medians of 4-30 interleaved runs; fp32, H=512, I=800, E=16, top-2), batched vs looped:
#   forward, 2 threads:  T=1 (pad 8.0) 17-20 vs 1.8-3.3 ms; T=2 (4.0) 24 vs 8-9 ms; T=4 (4.0) 28-30 vs 38-40 ms;
#                        T=8 (3.0) 26-47 vs 29-204 ms; T=32 (1.75) 42-52 vs 81-404 ms; T=64 (1.75) 75-112 vs 352-761 ms
#   forward+backward, 2 threads, 1024 tokens, skewed routing: pad 1.23: 867-1824 vs 1837-3488 ms; 1.73: 1129 vs
#                        1905; 2.56: 1492-1672 vs 1517-1957; 3.39: 1887-2319 vs 1992-2138; 3.98: 2154-2639 vs
#                        2029-2089; 5.08: 2709-3240 vs 1040-1726 ms
#   one thread: the loop is never slower (forward T=1..128: 2.0-42 vs 10-47 ms; 1024 tokens fwd+bwd pad 1.23: 588
#                        vs 705 ms; 2.56: 570 vs 1318 ms), so a single-threaded run always loops.
# With two threads each small per-expert GEMM is split over both threads and waits in their barriers, which a busy
# machine makes expensive; one bmm over 16 experts gives each thread whole GEMMs. Between pad 2.5 and 4 the two
# layouts are within the noise; below 2 the batched one wins every run, above 4 the loop does.
PADDING_SLACK = 3.0


def use_batched_layout(num_experts: int, largest_load: int, num_pairs: int, num_threads: int | None = None) -> bool:
    """The CPU layout choice: batched (padded bmm) or looped (one mm per expert that was hit), see PADDING_SLACK."""
    num_threads = torch.get_num_threads() if num_threads is None else num_threads
    return num_threads > 1 and num_experts * largest_load <= PADDING_SLACK * num_pairs


class _Plan:
    """Where each routed pair lives in the row buffers: built by the forward, and again by the backward."""

    def __init__(self, expert_index, routing_weights, num_experts: int, dtype, num_rows: int | None = None):
        """`num_rows`: the row count of the forward's plan, given by the backward to get the same layout again."""
        num_tokens, top_k = expert_index.shape
        num_pairs = num_tokens * top_k
        device = expert_index.device
        # Expert ids >= num_experts are expert-parallel sentinels (pairs whose expert lives on another rank): clamped
        # to num_experts they sort after every routed pair, get no row, and their (token, slot) outputs are zero.
        flat_index = expert_index.reshape(-1).clamp(max=num_experts)
        # Plain index_select / scatter_ below: advanced indexing (tensor[index]) of a few thousand elements costs
        # milliseconds on the CPU (it is spread over the threads), index_select microseconds.
        sorted_expert, order = torch.sort(flat_index, stable=True)  # order: sorted position -> pair
        counts = torch.bincount(flat_index, minlength=num_experts + 1)[:num_experts]
        self.num_tokens, self.top_k, self.num_experts = num_tokens, top_k, num_experts
        self.on_cpu = device.type == "cpu"
        self.batched = False
        if self.on_cpu:
            counts_list = counts.tolist()
            self.bounds = [0, *itertools.accumulate(counts_list)]
            num_routed = self.bounds[-1]
            most = max(counts_list)
            if num_rows is None:
                self.batched = num_routed > 0 and use_batched_layout(num_experts, most, num_routed)
            else:  # (when E x M == N the two layouts are the same rows in the same order)
                self.batched = num_rows != num_routed
            self.skipped = (flat_index == num_experts).unsqueeze(1) if num_routed < num_pairs else None
            order, sorted_expert = order[:num_routed], sorted_expert[:num_routed]
        else:  # no host synchronisation: sentinel rows stay at the tail, where grouped_mm never reads or writes
            self.offsets = counts.cumsum(0).to(torch.int32)
            num_routed = num_pairs
            self.skipped = (flat_index == num_experts).unsqueeze(1)
        sorted_weights = routing_weights.reshape(-1).index_select(0, order).to(dtype)
        positions = torch.arange(num_routed, device=device)
        if self.batched:
            self.rows_per_expert = most
            self.num_rows = num_experts * most
            # sorted position p of expert e (which starts at s_e) goes to row e * M + p - s_e
            shift = torch.arange(num_experts, device=device) * most - (counts.cumsum(0) - counts)
            row_of_sorted = positions + shift.index_select(0, sorted_expert)
            # Pad rows read token 0, carry weight 0 and are then zeroed (`pad_rows`): zero inputs and zero gradient
            # rows stay zero through every GEMM, so pads add exact zeros to the weight gradients, whatever the data.
            self.row_token = order.new_zeros(self.num_rows).scatter_(0, row_of_sorted, order // top_k)
            is_pad = torch.ones(self.num_rows, dtype=torch.bool, device=device).index_fill_(0, row_of_sorted, False)
            self.pad_rows = is_pad.nonzero().squeeze(1)
            self.row_weight = sorted_weights.new_zeros(self.num_rows).scatter_(0, row_of_sorted, sorted_weights)
        else:
            self.num_rows = num_routed
            self.row_token = order // top_k
            self.row_weight = sorted_weights
            row_of_sorted = positions
        self.pair_row = order.new_zeros(num_pairs).scatter_(0, order, row_of_sorted)  # sentinels: row 0, zeroed

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor[token(r)]` for every row r, zero on pad rows."""
        rows = tensor.index_select(0, self.row_token)
        if self.batched:
            rows.index_fill_(0, self.pad_rows, 0)
        return rows

    def rows_matmul(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows of expert e times `weight[e]`: [R, K] x [E, K, M] -> [R, M]."""
        if self.batched:
            out = rows.new_empty(self.num_rows, weight.shape[2])
            shape = (self.num_experts, self.rows_per_expert, -1)
            torch.bmm(rows.view(shape), weight, out=out.view(shape))
            return out
        if not self.on_cpu:
            return torch._grouped_mm(rows, weight, offs=self.offsets)
        out = rows.new_empty(self.num_rows, weight.shape[2])
        for expert, (start, end) in enumerate(itertools.pairwise(self.bounds)):
            if end > start:
                torch.mm(rows[start:end], weight[expert], out=out[start:end])
        return out

    def weight_grad(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Per expert `left_e^T @ right_e`: [R, K1], [R, K2] -> [E, K1, K2] (zero for experts with no rows)."""
        if self.batched:
            shape = (self.num_experts, self.rows_per_expert)
            return torch.bmm(left.view(*shape, -1).transpose(1, 2), right.view(*shape, -1))
        if not self.on_cpu:
            return torch._grouped_mm(left.t(), right, offs=self.offsets)
        out = left.new_empty(self.num_experts, left.shape[1], right.shape[1])
        for expert, (start, end) in enumerate(itertools.pairwise(self.bounds)):
            if end > start:
                torch.mm(left[start:end].t(), right[start:end], out=out[expert])
            else:
                out[expert].zero_()
        return out

    def rows_to_pairs(self, rows: torch.Tensor) -> torch.Tensor:
        """[R, D] -> [T, k, D] in the (token, slot) order of `top_k_index`; zero for sentinel pairs."""
        if self.num_rows == 0:  # every pair was a sentinel
            return rows.new_zeros(self.num_tokens, self.top_k, rows.shape[1])
        pairs = rows.index_select(0, self.pair_row)
        if self.skipped is not None:
            pairs.masked_fill_(self.skipped, 0)
        return pairs.view(self.num_tokens, self.top_k, -1)


def _is_silu(act_fn) -> bool:
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation" or act_fn is nn.functional.silu


def _glu_forward(gate_up: torch.Tensor, act_fn) -> torch.Tensor:
    gate, up = gate_up.split(gate_up.shape[1] // 2, dim=1)  # views: no copies
    return act_fn(gate).mul_(up) if _is_silu(act_fn) else act_fn(gate) * up


def _glu_backward(gate_up: torch.Tensor, grad_h: torch.Tensor, act_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (h = act(gate) * up, d gate_up [R, 2I]), without autograd for SiLU."""
    intermediate = gate_up.shape[1] // 2
    gate, up = gate_up.split(intermediate, dim=1)
    grad_gate_up = torch.empty_like(gate_up)
    grad_gate, grad_up = grad_gate_up.split(intermediate, dim=1)
    if _is_silu(act_fn):
        sig = torch.sigmoid(gate)
        activated = gate * sig
        torch.mul(grad_h, activated, out=grad_up)
        # silu'(g) = sig * (1 + g * (1 - sig)) = sig + silu - silu * sig
        derivative = torch.addcmul(sig, activated, sig, value=-1).add_(activated)
        torch.mul(grad_h, up, out=grad_gate).mul_(derivative)
        return activated.mul_(up), grad_gate_up
    # any other activation: its derivative by torch.func (plain autograd is off inside a custom operator)
    activated, activation_vjp = torch.func.vjp(act_fn, gate)
    (grad_activated,) = activation_vjp(grad_h * up)
    grad_gate.copy_(grad_activated)
    torch.mul(grad_h, activated, out=grad_up)
    return activated * up, grad_gate_up


# The PyTorch path is a pair of custom operators (forward, backward) so that torch.compile treats each as one opaque
# call: the routing plan needs data-dependent shapes and, on the CPU, a host read of the expert loads, which would
# otherwise break the graph (with them, a model using `fused` compiles with fullgraph=True, as with grouped_mm).
# The backward rebuilds the plan from the routing (a sort and a bincount, small next to the GEMMs).
# The operators' namespace comes from this module's name ("modeling_grin_fused_experts" when imported from the
# package): a model folder exported with remote code imports its own copy of this file under another name, and a
# second registration of one operator name would replace the first, the two copies overwriting each other's.
OPERATOR_NAMESPACE = re.sub(r"\W", "_", __name__)


@torch.library.custom_op(f"{OPERATOR_NAMESPACE}::sorted_experts", mutates_args=())
def _sorted_experts(
    hidden_states: torch.Tensor,
    routing_weights: torch.Tensor,
    expert_index: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> output [T, H], and gate_up [R, 2I] for the backward."""
    dtype, act_fn = hidden_states.dtype, ACT2FN[activation]
    plan = _Plan(expert_index, routing_weights, gate_up_proj.shape[0], dtype)
    gate_up = plan.rows_matmul(plan.gather_rows(hidden_states), gate_up_proj.to(dtype).transpose(1, 2))
    expert_outputs = plan.rows_matmul(_glu_forward(gate_up, act_fn), down_proj.to(dtype).transpose(1, 2))
    pair_outputs = plan.rows_to_pairs(expert_outputs)  # [T, k, H]
    output = torch.bmm(routing_weights.to(dtype).unsqueeze(1), pair_outputs).squeeze(1)
    return output, gate_up


@_sorted_experts.register_fake
def _(hidden_states, routing_weights, expert_index, gate_up_proj, down_proj, activation):
    num_rows = torch.library.get_ctx().new_dynamic_size()  # N routed pairs, or E x M in the batched layout
    return hidden_states.new_empty(hidden_states.shape), hidden_states.new_empty(num_rows, gate_up_proj.shape[1])


@torch.library.custom_op(f"{OPERATOR_NAMESPACE}::sorted_experts_backward", mutates_args=())
def _sorted_experts_backward(
    grad_output: torch.Tensor,
    hidden_states: torch.Tensor,
    routing_weights: torch.Tensor,
    expert_index: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> gradients w.r.t. hidden_states, routing_weights, gate_up_proj, down_proj (empty where `needs` is False)."""
    need_hidden, need_weights, need_gate_up, need_down = needs
    dtype, act_fn = gate_up.dtype, ACT2FN[activation]
    plan = _Plan(expert_index, routing_weights, gate_up_proj.shape[0], dtype, num_rows=gate_up.shape[0])
    nothing = grad_output.new_empty(0)
    grad_hidden = grad_routing = grad_gate_up_proj = grad_down = nothing

    grad_rows = plan.gather_rows(grad_output.to(dtype))  # dY[token(r)]
    grad_pre_weight = plan.rows_matmul(grad_rows, down_proj.to(dtype))  # dY W_down: d out / d h before weighting
    row_weight = plan.row_weight.unsqueeze(1)
    activated, grad_gate_up = _glu_backward(gate_up, grad_pre_weight * row_weight, act_fn)
    if need_weights:  # d out[t] / d w[t, k] = <dY[t], h W_down^T> = <dY[t] W_down, h>
        row_dots = (grad_pre_weight * activated).sum(1, keepdim=True)
        grad_routing = plan.rows_to_pairs(row_dots).view_as(routing_weights).to(routing_weights.dtype)
    del grad_pre_weight
    if need_down:  # sum_r (w_r dY_r)^T h_r = sum_r dY_r^T (w_r h_r)
        grad_down = plan.weight_grad(grad_rows, activated.mul_(row_weight)).to(down_proj.dtype)
    del activated, grad_rows
    if need_gate_up:  # the gathered input rows again: cheaper than keeping [R, H] from the forward
        rows = plan.gather_rows(hidden_states.to(dtype))
        grad_gate_up_proj = plan.weight_grad(grad_gate_up, rows).to(gate_up_proj.dtype)
        del rows
    if need_hidden:
        grad_pairs = plan.rows_to_pairs(plan.rows_matmul(grad_gate_up, gate_up_proj.to(dtype)))
        # the sum over k as a batched dot with ones: a strided .sum(1) takes twice as long on the CPU
        grad_hidden = torch.bmm(grad_pairs.new_ones(plan.num_tokens, 1, plan.top_k), grad_pairs).squeeze(1)
        grad_hidden = grad_hidden.to(hidden_states.dtype)
    return grad_hidden, grad_routing, grad_gate_up_proj, grad_down


@_sorted_experts_backward.register_fake
def _(grad_output, hidden_states, routing_weights, expert_index, gate_up, gate_up_proj, down_proj, activation, needs):
    shapes_and_dtypes = (
        (hidden_states.shape, hidden_states.dtype),
        (routing_weights.shape, routing_weights.dtype),
        (gate_up_proj.shape, gate_up_proj.dtype),
        (down_proj.shape, down_proj.dtype),
    )
    return tuple(
        grad_output.new_empty(shape if needed else (0,), dtype=dtype if needed else grad_output.dtype)
        for needed, (shape, dtype) in zip(needs, shapes_and_dtypes, strict=True)
    )


def _setup_context(ctx, inputs, output):
    hidden_states, routing_weights, expert_index, gate_up_proj, down_proj, activation = inputs
    ctx.activation = activation
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden_states, routing_weights, expert_index, output[1], gate_up_proj, down_proj)


def _backward(ctx, grad_output, _grad_gate_up):
    need_hidden, need_weights, _, need_gate_up, need_down, _ = ctx.needs_input_grad
    needs = [need_hidden, need_weights, need_gate_up, need_down]
    grads = _sorted_experts_backward(grad_output, *ctx.saved_tensors, ctx.activation, needs)
    grad_hidden, grad_routing, grad_gate_up_proj, grad_down = (
        grad if needed else None for grad, needed in zip(grads, needs, strict=True)
    )
    return grad_hidden, grad_routing, None, grad_gate_up_proj, grad_down, None


_sorted_experts.register_autograd(_backward, setup_context=_setup_context)


def sorted_swiglu_experts(
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    top_k_index: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """sum_k top_k_weights[t, k] * down_e(act(gate_e x_t) * up_e x_t) with e = top_k_index[t, k]: the PyTorch `fused`
    path on any device, `activation` a name of transformers' ACT2FN. Shapes and ids (sentinels >= E skipped) as for
    `triton_swiglu_experts`; differentiable w.r.t. hidden_states, top_k_weights and both weights."""
    return _sorted_experts(hidden_states, top_k_weights, top_k_index, gate_up_proj, down_proj, activation)[0]


def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """`experts_implementation="fused"`: Triton kernels for SiLU experts on CUDA (`triton_experts.py`), otherwise the
    sorted per-expert GEMM path above."""
    if self.is_transposed or self.has_bias or not self.has_gate:
        raise ValueError("the fused experts implementation supports gated experts without bias in [E, out, in] layout")
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)
    if isinstance(self.act_fn, SiLUActivation) and runs_here(hidden_states):
        return triton_swiglu_experts(
            hidden_states, top_k_weights, top_k_index, self.gate_up_proj, self.down_proj
        )
    return sorted_swiglu_experts(
        hidden_states, top_k_weights, top_k_index, self.gate_up_proj, self.down_proj, self.config.hidden_act
    )


ExpertsInterface.register("fused", fused_experts_forward)
