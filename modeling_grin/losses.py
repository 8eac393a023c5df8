"""Auxiliary router losses: Switch load balancing (local or data-parallel global, as GRIN), the official MH-MoE code's
per-layer GShard loss, and router z-loss."""

import torch


def _row_weights(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None, device) -> list:
    """Per layer, a weight per router row: 1, or the token's attention-mask value (repeated for MH-MoE sub-tokens)."""
    if attention_mask is None:
        return [torch.ones(logits.shape[0], device=device) for logits in router_logits]
    token_mask = attention_mask.reshape(-1).to(device, torch.float32)
    return [token_mask.repeat_interleave(logits.shape[0] // token_mask.numel()) for logits in router_logits]


def _data_parallel_world() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | None,
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    global_balance: bool = False,
) -> torch.Tensor | None:
    """Switch Transformer load-balancing loss, `E * sum_i f_i * P_i`, over all MoE layers.

    f_i is the fraction of routed slots sent to expert i (top-k of the router softmax; each row routes `top_k` slots,
    so f sums to `top_k`) and P_i the mean router probability of expert i, both averaged over every layer's rows,
    the convention of transformers' Mixtral and Phimoe. Rows that are padding in `attention_mask` (`[batch, seq]`)
    are left out; when a layer routes several rows per token (MH-MoE sub-tokens), the mask is repeated per row.
    The gradient flows through P only. Returns None when there are no router logits.

    `global_balance=True` (GRIN's recipe) counts f_i and the number of rows over the whole data-parallel group with an
    all-reduce (no gradient). Each rank's value is then scaled so that the mean over ranks — what DDP/FSDP average —
    is exactly the loss, and its gradient, of one process holding the concatenated batch.
    """
    if not router_logits:
        return None
    device = router_logits[0].device
    slots_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probability_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    total_rows = torch.zeros((), dtype=torch.float32, device=device)
    row_weights = _row_weights(router_logits, attention_mask, device)
    for layer_logits, row_weight in zip(router_logits, row_weights, strict=True):
        probs = layer_logits.to(device).float().softmax(dim=-1)
        selected = probs.topk(top_k, dim=-1).indices
        slots_per_expert = slots_per_expert.scatter_add(0, selected.reshape(-1), row_weight.repeat_interleave(top_k))
        probability_per_expert = probability_per_expert + (probs * row_weight[:, None]).sum(dim=0)
        total_rows = total_rows + row_weight.sum()

    world = _data_parallel_world() if global_balance else 1
    if world > 1:
        counts = torch.cat([slots_per_expert, total_rows.reshape(1)]).detach()
        torch.distributed.all_reduce(counts)
        slots_per_expert, global_rows = counts[:-1], counts[-1]
        # mean over ranks of E·Σ f·(P_sum_r·W / N) = E·Σ f·(Σ_r P_sum_r / N): the concatenated batch's loss
        fraction = slots_per_expert / global_rows
        return num_experts * torch.sum(fraction * (probability_per_expert * world / global_rows))
    return num_experts * torch.sum((slots_per_expert / total_rows) * (probability_per_expert / total_rows))


def gshard_load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | None,
    num_experts: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """GShard's load-balancing loss as the official MH-MoE code computes it: per MoE layer `E * sum_i me_i * ce_i`,
    with me_i the mean router probability of expert i and ce_i the fraction of rows whose top-1 expert is i (whatever
    top_k the layer routes with), summed over the layers (`--moe-gate-loss-combine-method sum`).

    Unlike `load_balancing_loss`, layers are not pooled: each layer is pushed towards balance on its own, so with L
    layers the per-layer gradient is that of one layer's loss (the pooled Switch loss spreads 1/L of it to each).
    Padding rows of `attention_mask` are left out (repeated per sub-token for MH-MoE). The gradient flows through me
    only. Returns None when there are no router logits.
    """
    if not router_logits:
        return None
    device = router_logits[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    row_weights = _row_weights(router_logits, attention_mask, device)
    for layer_logits, row_weight in zip(router_logits, row_weights, strict=True):
        probs = layer_logits.to(device).float().softmax(dim=-1)
        rows = row_weight.sum().clamp(min=1)  # (a layer of padding only adds 0)
        mean_probability = (probs * row_weight[:, None]).sum(dim=0) / rows
        top1 = probs.argmax(dim=-1)
        top1_fraction = torch.zeros(num_experts, device=device).scatter_add(0, top1, row_weight) / rows
        total = total + num_experts * torch.sum(mean_probability * top1_fraction)
    return total


def router_z_loss(router_logits: tuple[torch.Tensor, ...] | None, attention_mask: torch.Tensor | None = None):
    """ST-MoE's router z-loss: mean over (non-padding) rows and layers of logsumexp(router logits)²."""
    if not router_logits:
        return None
    device = router_logits[0].device
    total, rows = torch.zeros((), device=device), torch.zeros((), device=device)
    row_weights = _row_weights(router_logits, attention_mask, device)
    for layer_logits, row_weight in zip(router_logits, row_weights, strict=True):
        total = total + (layer_logits.to(device).float().logsumexp(dim=-1).square() * row_weight).sum()
        rows = rows + row_weight.sum()
    return total / rows
