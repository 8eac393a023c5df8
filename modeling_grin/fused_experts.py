"""The `fused` experts implementation: (token, expert) pairs sorted once, one GEMM per expert, a hand-written backward.

The N = tokens x top_k routed pairs are laid out as expert-contiguous *rows* (a `_Plan`, built once per call and
again by the backward), exactly N of them: no padding. On CUDA every GEMM over the rows is one `torch._grouped_mm`
(no host synchronisation); on the CPU one `torch.mm` per expert that was hit, over its contiguous slice, written in
place (`out=`), so empty experts cost nothing. (A padded layout, one `bmm` over all experts with E x largest-load
rows, was faster on one balanced layer but lost 1.5-2.5x the FLOPs to padding in whole models, whose routing is
never balanced: see docs/benchmarks.md.)
Few pairs (decoding) take `few_pairs_swiglu_experts` instead, on the CPU only: it touches only the experts that were
hit, without the plan's sort.
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
BitNet (`quantize_glu`): h is int8-quantized per row before W_down, in the forward and again (the same bits) in the
backward, whose gradient passes straight through it.
"""

import itertools
import re

import torch
from torch import nn
from transformers.activations import ACT2FN, SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .bitnet import int8_activations
from .triton_experts import runs_here, triton_swiglu_experts


class _Plan:
    """Where each routed pair lives in the row buffer: built by the forward, and again by the backward."""

    def __init__(self, expert_index, routing_weights, num_experts: int, dtype):
        num_tokens, top_k = expert_index.shape
        num_pairs = num_tokens * top_k
        device = expert_index.device
        # Expert ids >= num_experts are expert-parallel sentinels (pairs whose expert lives on another rank): clamped
        # to num_experts they sort after every routed pair, get no row, and their (token, slot) outputs are zero.
        flat_index = expert_index.reshape(-1).clamp(max=num_experts)
        # Plain index_select / scatter_ below: advanced indexing (tensor[index]) of a few thousand elements costs
        # milliseconds on the CPU (it is spread over the threads), index_select microseconds.
        order = torch.sort(flat_index, stable=True)[1]  # sorted position (= row) -> pair
        counts = torch.bincount(flat_index, minlength=num_experts + 1)
        self.num_tokens, self.top_k, self.num_experts = num_tokens, top_k, num_experts
        self.on_cpu = device.type == "cpu"
        if self.on_cpu:  # host reads cost no synchronisation here: rows of the experts that were hit, as slices
            loads = counts.tolist()
            ends = list(itertools.accumulate(loads))
            self.expert_rows = [(expert, ends[expert] - load, ends[expert])
                                for expert, load in enumerate(loads[:num_experts]) if load]
            self.unrouted_experts = [expert for expert, load in enumerate(loads[:num_experts]) if not load]
            self.num_rows = ends[num_experts - 1]
            self.skipped = (flat_index == num_experts).unsqueeze(1) if self.num_rows < num_pairs else None
            order = order[: self.num_rows]
        else:  # no host synchronisation: sentinel rows stay at the tail, where grouped_mm never reads or writes
            self.offsets = counts[:num_experts].cumsum(0).to(torch.int32)
            self.num_rows = num_pairs
            self.skipped = (flat_index == num_experts).unsqueeze(1)
        self.row_token = order // top_k
        self.row_weight = routing_weights.reshape(-1).index_select(0, order).to(dtype)
        rows = torch.arange(self.num_rows, device=device)
        self.pair_row = order.new_zeros(num_pairs).scatter_(0, order, rows)  # sentinels: row 0, zeroed

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor[token(r)]` for every row r."""
        return tensor.index_select(0, self.row_token)

    def rows_matmul(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows of expert e times `weight[e]`: [R, K] x [E, K, M] -> [R, M]."""
        if not self.on_cpu:
            return torch._grouped_mm(rows, weight, offs=self.offsets)
        out = rows.new_empty(self.num_rows, weight.shape[2])
        for expert, start, end in self.expert_rows:
            torch.mm(rows[start:end], weight[expert], out=out[start:end])
        return out

    def weight_grad(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Per expert `left_e^T @ right_e`: [R, K1], [R, K2] -> [E, K1, K2] (zero for experts with no rows)."""
        if not self.on_cpu:
            return torch._grouped_mm(left.t(), right, offs=self.offsets)
        out = left.new_empty(self.num_experts, left.shape[1], right.shape[1])  # (zero-filling it all cost 9 %)
        for expert, start, end in self.expert_rows:
            torch.mm(left[start:end].t(), right[start:end], out=out[expert])
        for expert in self.unrouted_experts:
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


def _is_bitnet(experts) -> bool:
    """Our experts under `config.bitnet` (other models' experts, e.g. transformers' Phimoe under `fused`, are not)."""
    return getattr(experts, "bitnet", False)


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
# The operators are registered by calling `custom_op` on plain functions, not as decorators: mutmut (docs/testing.md)
# does not mutate decorated functions, and these two hold the whole forward and backward.
OPERATOR_NAMESPACE = re.sub(r"\W", "_", __name__)


def _sorted_experts_impl(
    hidden_states: torch.Tensor,
    routing_weights: torch.Tensor,
    expert_index: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
    quantize_glu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> output [T, H], and gate_up [R, 2I] for the backward."""
    dtype, act_fn = hidden_states.dtype, ACT2FN[activation]
    plan = _Plan(expert_index, routing_weights, gate_up_proj.shape[0], dtype)
    gate_up = plan.rows_matmul(plan.gather_rows(hidden_states), gate_up_proj.to(dtype).transpose(1, 2))
    activated = _glu_forward(gate_up, act_fn)
    if quantize_glu:
        activated = int8_activations(activated)
    expert_outputs = plan.rows_matmul(activated, down_proj.to(dtype).transpose(1, 2))
    pair_outputs = plan.rows_to_pairs(expert_outputs)  # [T, k, H]
    output = torch.bmm(routing_weights.to(dtype).unsqueeze(1), pair_outputs).squeeze(1)
    return output, gate_up


_sorted_experts = torch.library.custom_op(
    f"{OPERATOR_NAMESPACE}::sorted_experts", _sorted_experts_impl, mutates_args=()
)


@_sorted_experts.register_fake
def _(hidden_states, routing_weights, expert_index, gate_up_proj, down_proj, activation, quantize_glu):
    num_rows = torch.library.get_ctx().new_dynamic_size()  # the routed pairs (N less the sentinels on the CPU)
    return hidden_states.new_empty(hidden_states.shape), hidden_states.new_empty(num_rows, gate_up_proj.shape[1])


def _sorted_experts_backward_impl(
    grad_output: torch.Tensor,
    hidden_states: torch.Tensor,
    routing_weights: torch.Tensor,
    expert_index: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
    quantize_glu: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> gradients w.r.t. hidden_states, routing_weights, gate_up_proj, down_proj (empty where `needs` is False)."""
    need_hidden, need_weights, need_gate_up, need_down = needs
    dtype, act_fn = gate_up.dtype, ACT2FN[activation]
    plan = _Plan(expert_index, routing_weights, gate_up_proj.shape[0], dtype)
    # one empty tensor per gradient not needed: a custom operator's outputs may not alias each other
    grad_hidden, grad_routing, grad_gate_up_proj, grad_down = (grad_output.new_empty(0) for _ in range(4))

    grad_rows = plan.gather_rows(grad_output.to(dtype))  # dY[token(r)]
    grad_pre_weight = plan.rows_matmul(grad_rows, down_proj.to(dtype))  # dY W_down: d out / d h before weighting
    row_weight = plan.row_weight.unsqueeze(1)
    activated, grad_gate_up = _glu_backward(gate_up, grad_pre_weight * row_weight, act_fn)
    if quantize_glu:  # what W_down multiplied in the forward
        activated = int8_activations(activated)
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


_sorted_experts_backward = torch.library.custom_op(
    f"{OPERATOR_NAMESPACE}::sorted_experts_backward", _sorted_experts_backward_impl, mutates_args=()
)


@_sorted_experts_backward.register_fake
def _(grad_output, hidden_states, routing_weights, expert_index, gate_up, gate_up_proj, down_proj, activation,
      quantize_glu, needs):
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
    hidden_states, routing_weights, expert_index, gate_up_proj, down_proj, activation, quantize_glu = inputs
    ctx.activation, ctx.quantize_glu = activation, quantize_glu
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden_states, routing_weights, expert_index, output[1], gate_up_proj, down_proj)


def _backward(ctx, grad_output, _grad_gate_up):
    need_hidden, need_weights, _, need_gate_up, need_down, _, _ = ctx.needs_input_grad
    needs = [need_hidden, need_weights, need_gate_up, need_down]
    grads = _sorted_experts_backward(grad_output, *ctx.saved_tensors, ctx.activation, ctx.quantize_glu, needs)
    grad_hidden, grad_routing, grad_gate_up_proj, grad_down = (
        grad if needed else None for grad, needed in zip(grads, needs, strict=True)
    )
    return grad_hidden, grad_routing, None, grad_gate_up_proj, grad_down, None, None


_sorted_experts.register_autograd(_backward, setup_context=_setup_context)


def sorted_swiglu_experts(
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    top_k_index: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str = "silu",
    quantize_glu: bool = False,
) -> torch.Tensor:
    """sum_k top_k_weights[t, k] * down_e(act(gate_e x_t) * up_e x_t) with e = top_k_index[t, k]: the PyTorch `fused`
    path on any device, `activation` a name of transformers' ACT2FN, `quantize_glu` BitNet's int8 SwiGLU output.
    Shapes and ids (sentinels >= E skipped) as for `triton_swiglu_experts`; differentiable w.r.t. hidden_states,
    top_k_weights and both weights."""
    return _sorted_experts(hidden_states, top_k_weights, top_k_index, gate_up_proj, down_proj, activation,
                           quantize_glu)[0]


def grouped_mm_takes_shape(experts, dtype: torch.dtype) -> bool:
    """torch's grouped GEMM needs every row of its operands to start on a 16-byte boundary: hidden and expert sizes
    that are multiples of 4 elements in fp32, 8 in bf16."""
    return all(size * dtype.itemsize % 16 == 0 for size in (experts.hidden_dim, experts.intermediate_dim))


def few_pairs_swiglu_experts(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The experts' output for a few routed pairs (decoding), on the CPU: the same sum as the eager forward, with one
    GEMV pair per routed pair and the rest batched over the pairs, so that only the experts that were hit are touched
    and a decoded token costs few kernel launches (what it pays for at these sizes: 2N + 5 for N pairs, against one
    GEMM per expert, hit or not, and a sort in transformers' grouped_mm). The expert ids are read on the host, which
    costs no synchronisation on the CPU. Expert-parallel sentinels (ids >= E) contribute zeros, as everywhere."""
    num_tokens, top_k = top_k_index.shape
    pair_experts = top_k_index.reshape(-1).tolist()
    if min(pair_experts) >= experts.num_experts:  # only sentinels: the sorted path's zeros carry (zero) gradients
        return sorted_swiglu_experts(hidden_states, top_k_weights, top_k_index, experts.gate_up_proj,
                                     experts.down_proj, experts.config.hidden_act, _is_bitnet(experts))
    gate_up_rows = [
        nn.functional.linear(hidden_states[pair // top_k].unsqueeze(0), experts.gate_up_proj[expert])
        if expert < experts.num_experts else hidden_states.new_zeros(1, experts.gate_up_proj.shape[1])  # h = 0
        for pair, expert in enumerate(pair_experts)
    ]
    activated = experts._apply_gate(torch.cat(gate_up_rows))
    outputs = torch.cat([
        nn.functional.linear(activated[pair].unsqueeze(0), experts.down_proj[expert])
        if expert < experts.num_experts else hidden_states.new_zeros(1, hidden_states.shape[1])
        for pair, expert in enumerate(pair_experts)
    ])
    weighted = torch.bmm(top_k_weights.to(outputs.dtype).unsqueeze(1), outputs.view(num_tokens, top_k, -1))
    return weighted.squeeze(1).to(hidden_states.dtype)


# At most this many routed pairs per expert (on average) take `few_pairs_swiglu_experts`. Measured on the CPU (medians
# of 30 interleaved calls, docs/benchmarks.md "Whole models"), few-pairs vs transformers' grouped_mm vs sorted rows:
# H=256, I=400, E=16, k=2: 1 token 323 vs 691 vs 485 us, 4 tokens 1372 vs 1614 vs 1857 us, 8 tokens 2481 vs 2519 vs
# 2838 us; H=512, I=800: 1 token 816 vs 1060 vs 907 us, 4 tokens 3245 vs 3479 vs 3622 us, 8 tokens 5868 vs 5355 vs
# 5575 us; the MH-MoE benchmark shape (sub-tokens of 64, I=128, E=24, k=3), one token: 427 vs 529 vs 731 us.
FEW_PAIRS_PER_EXPERT = 0.5


def decodes_few_pairs(top_k_index: torch.Tensor, num_experts: int) -> bool:
    """Whether the CPU path takes `few_pairs_swiglu_experts` for this routing (never while compiling: its host read
    of the expert ids would break the graph)."""
    return top_k_index.numel() <= FEW_PAIRS_PER_EXPERT * num_experts and not torch.compiler.is_compiling()


def cpu_swiglu_experts(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The CPU path of our models' default (`grouped_mm`) and of `fused`, each case the fastest measured:
    `few_pairs_swiglu_experts` when decoding touches a few experts; for training the sorted rows with the hand-written
    backward (as fast as transformers' grouped_mm and keeping half the memory for the backward); for inference over
    more tokens transformers' grouped_mm (3-6 % faster than the sorted rows there), or the sorted rows where torch's
    grouped GEMM cannot take the shape."""
    if decodes_few_pairs(top_k_index, experts.num_experts):
        return few_pairs_swiglu_experts(experts, hidden_states, top_k_index, top_k_weights)
    tensors = (hidden_states, top_k_weights, experts.gate_up_proj, experts.down_proj)
    needs_backward = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)
    if not needs_backward and grouped_mm_takes_shape(experts, hidden_states.dtype):
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, hidden_states, top_k_index, top_k_weights)
    return sorted_swiglu_experts(hidden_states, top_k_weights, top_k_index, experts.gate_up_proj, experts.down_proj,
                                 experts.config.hidden_act, _is_bitnet(experts))


def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """`experts_implementation="fused"`: Triton kernels for SiLU experts on CUDA (`triton_experts.py`), otherwise (and
    under BitNet, whose per-row quantization of the SwiGLU output the kernels do not do) the sorted per-expert GEMM
    path above."""
    if self.is_transposed or self.has_bias or not self.has_gate:
        raise ValueError("the fused experts implementation supports gated experts without bias in [E, out, in] layout")
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)
    if isinstance(self.act_fn, SiLUActivation) and runs_here(hidden_states) and not _is_bitnet(self):
        return triton_swiglu_experts(
            hidden_states, top_k_weights, top_k_index, self.gate_up_proj, self.down_proj
        )
    if hidden_states.device.type == "cpu":
        return cpu_swiglu_experts(self, hidden_states, top_k_index, top_k_weights)
    return sorted_swiglu_experts(
        hidden_states, top_k_weights, top_k_index, self.gate_up_proj, self.down_proj, self.config.hidden_act,
        _is_bitnet(self),
    )


ExpertsInterface.register("fused", fused_experts_forward)
