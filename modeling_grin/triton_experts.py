"""Triton kernels for SwiGLU experts: gather + grouped GEMMs over (token, expert) pairs sorted by expert.

The design follows the idea of ScatterMoE (only indices are sorted; hidden rows are read in place by token index and
results are written straight to their (token, slot) position), written for this package's weight layout:
`gate_up_proj` [E, 2I, H] with the gate rows first, `down_proj` [E, H, I], activation SiLU.

Routing metadata (PyTorch, once per call, no host synchronisation):
    the T*k pairs p = t*k + slot are sorted by expert (stable), giving `order` (pair of each sorted row), `token`
    (= order // k) and per-expert row ranges. Each expert's rows are cut into blocks of BLOCK_M rows that never cross
    an expert boundary, so every row-block program multiplies with exactly one expert's weights (no per-block loop
    over experts, no masked dots for neighbouring experts). The grid has the upper bound cdiv(T*k, BLOCK_M) + E
    blocks; the unused tail blocks return at once.

Forward (two kernels):
    1. `_gate_up_swiglu_kernel`: h = silu(x[token] W_gate^T) * (x[token] W_up^T), in sorted row order. The gate and up
       accumulators live side by side, SwiGLU is the epilogue; gate_up [N, 2I] is written only when a backward will
       need it.
    2. `_rows_to_pairs_kernel`: y = h W_down^T times the routing weight, written to row `order[r]` of a [T*k, H]
       buffer, i.e. in (token, slot) order; the output is that buffer summed over k. No atomics: bit-identical runs.

Backward (three kernels):
    3. `_down_swiglu_backward_kernel`: g = dY[token] W_down (gathered rows), then in the epilogue the SwiGLU backward
       (d_gate_up = w * g through silu(gate) * up), h recomputed from gate_up for dW_down, and the routing-weight
       gradient dL/dw = <dY[token], y> = <g, h> as per-column-block partial sums (summed afterwards, deterministic).
    4. `_rows_to_pairs_kernel` again: dX pairs = d_gate_up W_gate_up, written in (token, slot) order, summed over k.
    5. `_expert_xty_kernel`: weight gradients dW_e = X_e^T Y_e per expert, reading the gathered rows (dY[token] times
       the routing weight for dW_down, x[token] for dW_gate_up) in place.

Memory: the forward keeps gate_up [T*k, 2I] (input dtype) for the backward and nothing else beyond the inputs and the
int32 routing tensors: h is recomputed in kernel 3 and the expert outputs y are never stored (the routing-weight
gradient uses <g, h> instead), like the PyTorch `fused` path: I per routed row less than keeping h as well.
Transient buffers: forward h [T*k, I] and the [T*k, H] pair buffer (input
dtype); backward d_gate_up [T*k, 2I], h [T*k, I] (only if dW_down is needed), the [T*k, H] pair buffer for dX and
the fp32 routing-gradient partials [cdiv(I, BLOCK_N), T*k]. Weight gradients are written in the weights' dtype.

All GEMMs accumulate in fp32; fp16/bf16 operands go to tl.dot as they are (tensor cores), fp32 operands use TF32 only
when `torch.backends.cuda.matmul.allow_tf32` is set. Tensors must be contiguous (the entry point makes them so); expert
ids >= E (expert-parallel sentinels) are sorted after every expert's rows and skipped.

CPU: with TRITON_INTERPRET=1 in the environment *before triton is first imported* the same kernels run through
Triton's numpy interpreter (the tests use that). `triton.jit` decides at decoration time, and Triton's own helpers
(tl.zeros, tl.sum, tl.sigmoid) are @triton.jit functions made when `triton` is imported, which torch._dynamo,
transformers and so this package already do: setting the variable later does not work (triton_available() then
says False on a machine without CUDA). Interpreter notes: it has no bf16, so bf16 runs on CUDA only; the
weight-gradient kernel loops over a runtime range (an expert's rows), which numpy >= 2.4 broke in older Triton
interpreters (`tensor.__index__` on a 1-element array); Triton 3.9.0 squeezes the value and runs it with numpy 2.4.6.
No atomics anywhere (the interpreter's fp16 atomic_add fails, and atomics would make results order-dependent). No
autotuning: one fixed configuration per device kind.
"""

import os
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; triton_available() is False and no kernel is ever launched
    triton = None
    tl = SimpleNamespace(constexpr=None)  # the kernels' annotations read it

_jit = triton.jit if triton is not None else (lambda fn: fn)


def triton_available() -> bool:
    """Triton is importable and can run here: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1 set before
    triton was first imported)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRETED)


def runs_here(tensor: torch.Tensor) -> bool:
    """Whether the kernels can run on `tensor`'s device: CUDA with triton, or any device under the interpreter."""
    return triton is not None and ((tensor.is_cuda and torch.cuda.is_available()) or _INTERPRETED)


@dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. Row-blocked kernels: `rows` sorted pairs x `cols` output columns, reduction steps of `inner`.
    Weight-gradient kernel: `cols` x `cols` weight tiles, reduction over an expert's rows in steps of `inner`."""

    rows: int = 64
    cols: int = 64
    inner: int = 32
    num_warps: int = 4
    num_stages: int = 3


CUDA_BLOCKS = BlockSizes()
INTERPRETER_BLOCKS = BlockSizes(rows=16, cols=32, inner=32)  # the interpreter runs programs one by one: few, large


# ----------------------------------------------------------------------------------------------------------------------
# Kernels. Row-blocked programs: axis 0 = a block of sorted rows (one expert), axis 1 = a block of output columns.


@_jit
def _gate_up_swiglu_kernel(
    x_ptr,  # [T, H] hidden states
    w_ptr,  # [E, 2I, H] gate_up_proj
    token_ptr,  # [N] int32 token of each sorted row
    block_expert_ptr,
    block_start_ptr,
    block_end_ptr,  # [num_blocks] int32: expert and row range of each row block
    gate_up_ptr,  # [N, 2I] out (if SAVE_GATE_UP): gate and up pre-activations
    h_ptr,  # [N, INTER] out: silu(gate) * up
    H,
    INTER,
    SAVE_GATE_UP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_start = tl.load(block_start_ptr + tl.program_id(0))
    row_end = tl.load(block_end_ptr + tl.program_id(0))
    if row_start >= row_end:  # a tail block of the upper-bound grid
        return
    expert = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < INTER
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * H + ks[None, :]  # [BLOCK_M, BLOCK_K], gathered rows
    gate_ptrs = w_ptr + expert * (2 * INTER * H) + cols[None, :].to(tl.int64) * H + ks[:, None]  # W_gate^T tile
    up_ptrs = gate_ptrs + INTER * H  # the up rows follow the INTER gate rows
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        k_mask = ks < H - k
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        gate = tl.dot(x, tl.load(gate_ptrs, mask=w_mask, other=0.0), gate, input_precision=PRECISION)
        up = tl.dot(x, tl.load(up_ptrs, mask=w_mask, other=0.0), up, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K

    out_mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    if SAVE_GATE_UP:
        gate_up_ptrs = gate_up_ptr + rows[:, None] * (2 * INTER) + cols[None, :]
        tl.store(gate_up_ptrs, gate.to(gate_up_ptr.dtype.element_ty), mask=out_mask)
        tl.store(gate_up_ptrs + INTER, up.to(gate_up_ptr.dtype.element_ty), mask=out_mask)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + rows[:, None] * INTER + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)


@_jit
def _rows_to_pairs_kernel(
    a_ptr,  # [N, K] sorted rows
    w_ptr,  # expert weights; element (e, k, n) at e * stride_we + k * stride_wk + n * stride_wn
    order_ptr,  # [N] int32 pair (t * top_k + slot) of each sorted row
    scale_ptr,  # [T * top_k] routing weights, read if SCALE
    block_expert_ptr,
    block_start_ptr,
    block_end_ptr,
    out_ptr,  # [T * top_k, N_OUT] out, rows in pair order
    K,
    N_OUT,
    stride_we,
    stride_wk,
    stride_wn,
    SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[order[r]] = (a[r] @ W_e) * (routing weight of the pair if SCALE): the down projection in the forward
    (W_e = down_proj[e]^T) and the input gradient in the backward (W_e = gate_up_proj[e])."""
    row_start = tl.load(block_start_ptr + tl.program_id(0))
    row_end = tl.load(block_end_ptr + tl.program_id(0))
    if row_start >= row_end:
        return
    expert = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    pairs = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_OUT
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
    w_ptrs = w_ptr + expert * stride_we + ks[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = ks < K - k
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    if SCALE:
        acc *= tl.load(scale_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pairs[:, None] * N_OUT + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@_jit
def _down_swiglu_backward_kernel(
    grad_ptr,  # [T, H] gradient of the output
    w_ptr,  # [E, H, INTER] down_proj
    gate_up_ptr,  # [N, 2I] saved pre-activations
    token_ptr,
    order_ptr,
    scale_ptr,  # [T * top_k] routing weights
    block_expert_ptr,
    block_start_ptr,
    block_end_ptr,
    grad_gate_up_ptr,  # [N, 2I] out: gradient of the pre-activations
    h_ptr,  # [N, INTER] out (if STORE_H): silu(gate) * up, for dW_down
    grad_scale_ptr,  # [num column blocks, T * top_k] fp32 out: partial routing-weight gradients
    H,
    INTER,
    num_pairs,
    STORE_H: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_start = tl.load(block_start_ptr + tl.program_id(0))
    row_end = tl.load(block_end_ptr + tl.program_id(0))
    if row_start >= row_end:
        return
    expert = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    pairs = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < INTER
    ks = tl.arange(0, BLOCK_K)

    # g = dY[token] @ W_down[e]: the gradient of h before the routing weight
    grad_ptrs = grad_ptr + tokens[:, None] * H + ks[None, :]
    w_ptrs = w_ptr + expert * (H * INTER) + ks[:, None].to(tl.int64) * INTER + cols[None, :]
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        k_mask = ks < H - k
        dy = tl.load(grad_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        g = tl.dot(dy, w, g, input_precision=PRECISION)
        grad_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * INTER

    mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    gate_up_ptrs = gate_up_ptr + rows[:, None] * (2 * INTER) + cols[None, :]
    gate = tl.load(gate_up_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptrs + INTER, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = silu * up  # zero outside the mask, so the partial dot below needs no extra masking

    # dL/dw for the pair = <dY[token], h @ W_down^T> = <g, h>; this program's share, summed over column blocks later
    tl.store(grad_scale_ptr + tl.program_id(1).to(tl.int64) * num_pairs + pairs, tl.sum(g * h, axis=1), mask=row_mask)
    scale = tl.load(scale_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
    dh = g * scale[:, None]
    grad_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))  # d silu(x) / dx = sig(x) (1 + x (1 - sig(x)))
    grad_up = dh * silu
    grad_gate_up_ptrs = grad_gate_up_ptr + rows[:, None] * (2 * INTER) + cols[None, :]
    tl.store(grad_gate_up_ptrs, grad_gate.to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_gate_up_ptrs + INTER, grad_up.to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + rows[:, None] * INTER + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@_jit
def _expert_xty_kernel(
    x_ptr,  # [*, M] left rows (sorted, or gathered by token if X_GATHER)
    y_ptr,  # [*, N] right rows (sorted, or gathered by token if Y_GATHER)
    token_ptr,
    order_ptr,
    scale_ptr,  # routing weights, multiplied into the x rows if X_SCALE
    expert_offsets_ptr,  # [E + 1] int32 row range of each expert in sorted order
    out_ptr,  # [E, M, N] out
    M,
    N,
    X_GATHER: tl.constexpr,
    X_SCALE: tl.constexpr,
    Y_GATHER: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[e] = sum over the rows r of expert e of x_r^T y_r (a weight gradient). Axis 0 = expert, axes 1, 2 = tile.
    An expert without rows gets zeros."""
    expert = tl.program_id(0)
    row_start = tl.load(expert_offsets_ptr + expert)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(row_start, row_end, BLOCK_K):  # runtime bounds: fine compiled, and interpreted on Triton 3.9
        rows = r + tl.arange(0, BLOCK_K)
        row_mask = rows < row_end
        if X_GATHER:
            x_rows = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            x_rows = rows.to(tl.int64)
        if Y_GATHER:
            y_rows = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            y_rows = rows.to(tl.int64)
        x = tl.load(x_ptr + x_rows[:, None] * M + ms[None, :], mask=row_mask[:, None] & m_mask[None, :], other=0.0)
        if X_SCALE:
            pairs = tl.load(order_ptr + rows, mask=row_mask, other=0)
            scale = tl.load(scale_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * scale[:, None]).to(x.dtype)
        y = tl.load(y_ptr + y_rows[:, None] * N + ns[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(x), y, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * M * N + ms[:, None].to(tl.int64) * N + ns[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Host side.


def _interpreted() -> bool:
    """Whether the kernels above, and Triton's own @triton.jit helpers they call, were built for the interpreter."""
    if triton is None or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(_gate_up_swiglu_kernel, InterpretedFunction) and not isinstance(tl.zeros, JITFunction)


_INTERPRETED = _interpreted()


@dataclass
class _Routing:
    order: torch.Tensor  # [N] int32 pair index of each sorted row
    token: torch.Tensor  # [N] int32 token of each sorted row
    expert_offsets: torch.Tensor  # [E + 1] int32
    block_expert: torch.Tensor  # [num_blocks] int32
    block_start: torch.Tensor
    block_end: torch.Tensor


def _route(top_k_index: torch.Tensor, num_experts: int, block_rows: int) -> _Routing:
    """Sort the T*k pairs by expert and cut each expert's rows into blocks of `block_rows` (no host sync)."""
    top_k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1).long().clamp(max=num_experts)  # sentinels (see triton_swiglu_experts) sort last
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    ends = counts.cumsum(0)
    starts = ends - counts
    blocks = (counts + block_rows - 1) // block_rows
    block_ends = blocks.cumsum(0)
    # sum_e ceil(c_e / B) < N / B + E, so this many blocks always suffice; the unused ones get an empty row range
    num_blocks = (flat.numel() + block_rows - 1) // block_rows + num_experts
    block = torch.arange(num_blocks, device=flat.device)
    expert = torch.searchsorted(block_ends, block, right=True)
    used = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    block_start = starts[expert] + (block - (block_ends[expert] - blocks[expert])) * block_rows
    zero = torch.zeros_like(block_start)
    return _Routing(
        order=order.to(torch.int32),
        token=(order // top_k).to(torch.int32),
        expert_offsets=torch.cat([ends.new_zeros(1), ends]).to(torch.int32),
        block_expert=expert.to(torch.int32),
        block_start=torch.where(used, block_start, zero).to(torch.int32),
        block_end=torch.where(used, ends[expert], zero).to(torch.int32),
    )


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: it matters for fp32 operands only (exact unless torch allows TF32 matmuls)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_options(blocks: BlockSizes) -> dict:
    return {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}


def _row_blocks(routing: _Routing):
    return routing.block_expert, routing.block_start, routing.block_end


def _gate_up_forward(x, gate_up_proj, routing, blocks, save_gate_up):
    num_rows, intermediate = routing.order.numel(), gate_up_proj.shape[1] // 2
    h = x.new_empty(num_rows, intermediate)
    # zeros: the rows of sentinel pairs (sorted last, in no block) are never written but leave the operator
    gate_up = x.new_zeros(num_rows, 2 * intermediate) if save_gate_up else h  # h: an unused placeholder pointer
    grid = (routing.block_expert.numel(), triton.cdiv(intermediate, blocks.cols))
    _gate_up_swiglu_kernel[grid](
        x, gate_up_proj, routing.token, *_row_blocks(routing), gate_up, h, x.shape[1], intermediate,
        SAVE_GATE_UP=save_gate_up, PRECISION=_precision(x.dtype),
        BLOCK_M=blocks.rows, BLOCK_N=blocks.cols, BLOCK_K=blocks.inner, **_launch_options(blocks),
    )  # fmt: skip
    return (gate_up if save_gate_up else None), h


def _rows_to_pairs(rows, weight, transposed, routing, scale, num_pairs, blocks):
    """[N, K] sorted rows times weight[e] ([E, K, N_OUT], or [E, N_OUT, K] if `transposed`) -> [num_pairs, N_OUT]."""
    if transposed:
        stride_we, stride_wn, stride_wk = weight.stride()
    else:
        stride_we, stride_wk, stride_wn = weight.stride()
    num_cols = weight.shape[1] if transposed else weight.shape[2]
    out = rows.new_zeros(num_pairs, num_cols)  # sentinel pairs are in no row block: their rows stay zero
    grid = (routing.block_expert.numel(), triton.cdiv(num_cols, blocks.cols))
    _rows_to_pairs_kernel[grid](
        rows, weight, routing.order, scale if scale is not None else rows, *_row_blocks(routing), out,
        rows.shape[1], num_cols, stride_we, stride_wk, stride_wn,
        SCALE=scale is not None, PRECISION=_precision(rows.dtype),
        BLOCK_M=blocks.rows, BLOCK_N=blocks.cols, BLOCK_K=blocks.inner, **_launch_options(blocks),
    )  # fmt: skip
    return out


def _expert_xty(x, y, routing, num_experts, blocks, out_dtype, x_gather=False, x_scale=None, y_gather=False):
    num_m, num_n = x.shape[1], y.shape[1]
    out = torch.empty(num_experts, num_m, num_n, device=x.device, dtype=out_dtype)
    grid = (num_experts, triton.cdiv(num_m, blocks.cols), triton.cdiv(num_n, blocks.cols))
    _expert_xty_kernel[grid](
        x, y, routing.token, routing.order, x_scale if x_scale is not None else x, routing.expert_offsets, out,
        num_m, num_n, X_GATHER=x_gather, X_SCALE=x_scale is not None, Y_GATHER=y_gather,
        PRECISION=_precision(x.dtype), BLOCK_M=blocks.cols, BLOCK_N=blocks.cols, BLOCK_K=blocks.inner,
        **_launch_options(blocks),
    )  # fmt: skip
    return out


def _forward(hidden_states, top_k_weights, routing, gate_up_proj, down_proj, blocks, save_gate_up):
    num_tokens, top_k = top_k_weights.shape
    gate_up, h = _gate_up_forward(hidden_states, gate_up_proj, routing, blocks, save_gate_up)
    pairs = _rows_to_pairs(h, down_proj, True, routing, top_k_weights, num_tokens * top_k, blocks)
    output = pairs.view(num_tokens, top_k, -1).sum(1)  # fixed order over k: deterministic
    return output, gate_up


# Forward and backward are custom operators, like the PyTorch `fused` path's (see fused_experts.py): torch.compile
# sees one opaque call (the routing's bincount has a data-dependent size), and a remote-code copy of this module
# registers its own operators under its own module name.
OPERATOR_NAMESPACE = re.sub(r"\W", "_", __name__)


@torch.library.custom_op(f"{OPERATOR_NAMESPACE}::swiglu_experts", mutates_args=())
def _swiglu_experts(
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    top_k_index: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    blocks: list[int],
    save_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> output [T, H], and gate_up [T*k, 2I] for the backward (empty unless `save_gate_up`)."""
    block_sizes = BlockSizes(*blocks)
    routing = _route(top_k_index, gate_up_proj.shape[0], block_sizes.rows)
    output, gate_up = _forward(
        hidden_states, top_k_weights, routing, gate_up_proj, down_proj, block_sizes, save_gate_up
    )
    return output, gate_up if save_gate_up else hidden_states.new_empty(0)


@_swiglu_experts.register_fake
def _(hidden_states, top_k_weights, top_k_index, gate_up_proj, down_proj, blocks, save_gate_up):
    gate_up_shape = (top_k_index.numel(), gate_up_proj.shape[1]) if save_gate_up else (0,)
    return hidden_states.new_empty(hidden_states.shape), hidden_states.new_empty(gate_up_shape)


@torch.library.custom_op(f"{OPERATOR_NAMESPACE}::swiglu_experts_backward", mutates_args=())
def _swiglu_experts_backward(
    grad_output: torch.Tensor,
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    top_k_index: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up: torch.Tensor,
    blocks: list[int],
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> gradients w.r.t. hidden_states, top_k_weights, gate_up_proj, down_proj (empty where `needs` is False)."""
    need_hidden, need_weights, need_gate_up, need_down = needs
    block_sizes = BlockSizes(*blocks)
    routing = _route(top_k_index, gate_up_proj.shape[0], block_sizes.rows)  # again: a few small kernels, no sync
    num_tokens, top_k = top_k_weights.shape
    num_experts, num_rows = gate_up_proj.shape[0], gate_up.shape[0]
    hidden, intermediate = hidden_states.shape[1], gate_up.shape[1] // 2
    grad_output = grad_output.to(hidden_states.dtype).contiguous()

    grad_gate_up = torch.empty_like(gate_up)
    h = gate_up.new_empty(num_rows, intermediate) if need_down else grad_gate_up  # placeholder if unused
    column_blocks = triton.cdiv(intermediate, block_sizes.cols)
    grad_weight_parts = torch.zeros(column_blocks, num_tokens * top_k, device=gate_up.device, dtype=torch.float32)
    grid = (routing.block_expert.numel(), column_blocks)
    _down_swiglu_backward_kernel[grid](
        grad_output, down_proj, gate_up, routing.token, routing.order, top_k_weights, *_row_blocks(routing),
        grad_gate_up, h, grad_weight_parts, hidden, intermediate, num_tokens * top_k,
        STORE_H=need_down, PRECISION=_precision(gate_up.dtype),
        BLOCK_M=block_sizes.rows, BLOCK_N=block_sizes.cols, BLOCK_K=block_sizes.inner, **_launch_options(block_sizes),
    )  # fmt: skip

    grad_hidden = grad_weights = grad_gate_up_proj = grad_down = grad_output.new_empty(0)
    if need_weights:
        grad_weights = grad_weight_parts.sum(0).view(num_tokens, top_k).to(top_k_weights.dtype)
    if need_hidden:
        pairs = _rows_to_pairs(grad_gate_up, gate_up_proj, False, routing, None, num_tokens * top_k, block_sizes)
        grad_hidden = pairs.view(num_tokens, top_k, hidden).sum(1)
    if need_down:  # dW_down[e] = sum_r (w_r dY[token_r])^T h_r
        grad_down = _expert_xty(
            grad_output, h, routing, num_experts, block_sizes, down_proj.dtype, x_gather=True, x_scale=top_k_weights
        )
    if need_gate_up:  # dW_gate_up[e] = sum_r d_gate_up_r^T x[token_r]
        grad_gate_up_proj = _expert_xty(
            grad_gate_up, hidden_states, routing, num_experts, block_sizes, gate_up_proj.dtype, y_gather=True
        )
    return grad_hidden, grad_weights, grad_gate_up_proj, grad_down


@_swiglu_experts_backward.register_fake
def _(grad_output, hidden_states, top_k_weights, top_k_index, gate_up_proj, down_proj, gate_up, blocks, needs):
    like = (hidden_states, top_k_weights, gate_up_proj, down_proj)
    return tuple(
        torch.empty_like(tensor) if needed else grad_output.new_empty(0)
        for needed, tensor in zip(needs, like, strict=True)
    )


def _setup_context(ctx, inputs, output):
    hidden_states, top_k_weights, top_k_index, gate_up_proj, down_proj, blocks, _ = inputs
    ctx.blocks = blocks
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden_states, top_k_weights, top_k_index, gate_up_proj, down_proj, output[1])


def _backward(ctx, grad_output, _grad_gate_up):
    need_hidden, need_weights, _, need_gate_up, need_down, _, _ = ctx.needs_input_grad
    needs = [need_hidden, need_weights, need_gate_up, need_down]
    grads = _swiglu_experts_backward(grad_output, *ctx.saved_tensors, ctx.blocks, needs)
    grad_hidden, grad_weights, grad_gate_up_proj, grad_down = (
        grad if needed else None for grad, needed in zip(grads, needs, strict=True)
    )
    return grad_hidden, grad_weights, None, grad_gate_up_proj, grad_down, None, None


_swiglu_experts.register_autograd(_backward, setup_context=_setup_context)


def triton_swiglu_experts(
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    top_k_index: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    activation: str = "silu",
    block_sizes: BlockSizes | None = None,
) -> torch.Tensor:
    """sum_k top_k_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t) with e = top_k_index[t, k], by Triton kernels.

    hidden_states `[T, H]`; top_k_weights `[T, k]` (any float dtype, read in fp32); top_k_index `[T, k]` int32/int64
    expert ids in [0, E), or >= E for a pair to skip (the sentinel of transformers' expert parallelism for an expert
    held by another rank: no compute, zero output and zero routing-weight gradient); gate_up_proj `[E, 2I, H]` (gate
    rows first); down_proj `[E, H, I]`. The weights are cast to the dtype of hidden_states (differentiably).
    Differentiable w.r.t. hidden_states, top_k_weights and both weights.
    Runs on CUDA tensors, or on CPU tensors when the kernels were built for the interpreter (see the module docstring).
    Results are deterministic: no atomics, and the top-k contributions are summed in a fixed order.
    """
    if activation != "silu":
        raise ValueError(f"the Triton experts kernels implement SiLU-gated experts only, not {activation!r}")
    if not triton_available():
        raise RuntimeError(
            "triton_swiglu_experts needs triton and a CUDA device, or TRITON_INTERPRET=1 set before triton is imported"
        )
    num_tokens, hidden = hidden_states.shape
    num_experts, double_intermediate, weight_hidden = gate_up_proj.shape
    if weight_hidden != hidden or down_proj.shape != (num_experts, hidden, double_intermediate // 2):
        raise ValueError(
            f"shapes do not match: hidden_states {tuple(hidden_states.shape)}, gate_up_proj "
            f"{tuple(gate_up_proj.shape)}, down_proj {tuple(down_proj.shape)}"
        )
    if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != num_tokens:
        raise ValueError(f"top_k_index {tuple(top_k_index.shape)} and top_k_weights must both be [T, k]")
    if num_tokens == 0 or top_k_index.shape[1] == 0:
        return torch.zeros_like(hidden_states)
    if block_sizes is None:
        block_sizes = INTERPRETER_BLOCKS if _INTERPRETED else CUDA_BLOCKS

    dtype = hidden_states.dtype
    hidden_states = hidden_states.contiguous()
    top_k_weights = top_k_weights.contiguous()
    top_k_index = top_k_index.contiguous()
    gate_up_proj = gate_up_proj.to(dtype).contiguous()
    down_proj = down_proj.to(dtype).contiguous()
    inputs = (hidden_states, top_k_weights, gate_up_proj, down_proj)
    save_gate_up = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs)  # else inference
    blocks = [block_sizes.rows, block_sizes.cols, block_sizes.inner, block_sizes.num_warps, block_sizes.num_stages]
    return _swiglu_experts(hidden_states, top_k_weights, top_k_index, gate_up_proj, down_proj, blocks, save_gate_up)[0]
