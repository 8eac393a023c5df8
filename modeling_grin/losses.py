"""Auxiliary router losses."""

import torch


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | None,
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Switch Transformer load-balancing loss, `E * sum_i f_i * P_i`, over all MoE layers.

    f_i is the fraction of routed slots sent to expert i (top-k of the router softmax; each row routes `top_k` slots,
    so f sums to `top_k`) and P_i the mean router probability of expert i, both averaged over every layer's rows,
    the convention of transformers' Mixtral and Phimoe. Rows that are padding in `attention_mask` (`[batch, seq]`)
    are left out; when a layer routes several rows per token (MH-MoE sub-tokens), the mask is repeated per row.
    The gradient flows through P only. Returns None when there are no router logits.
    """
    if not router_logits:
        return None
    device = router_logits[0].device
    slots_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probability_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    total_rows = torch.zeros((), dtype=torch.float32, device=device)
    token_mask = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)

    for layer_logits in router_logits:
        probs = layer_logits.to(device).float().softmax(dim=-1)
        selected = probs.topk(top_k, dim=-1).indices
        if token_mask is None:
            row_weight = probs.new_ones(probs.shape[0])
        else:
            row_weight = token_mask.repeat_interleave(probs.shape[0] // token_mask.numel())
        slots_per_expert = slots_per_expert.scatter_add(0, selected.reshape(-1), row_weight.repeat_interleave(top_k))
        probability_per_expert = probability_per_expert + (probs * row_weight[:, None]).sum(dim=0)
        total_rows = total_rows + row_weight.sum()

    return num_experts * torch.sum((slots_per_expert / total_rows) * (probability_per_expert / total_rows))
