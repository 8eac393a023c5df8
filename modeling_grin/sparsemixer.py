"""Expert routing: SparseMixer-v2 (GRIN-MoE's gradient-informed router), softmax top-k, and the router module.

SparseMixer-v2 for one expert slot (paper Algorithm 1, applied top_k times without replacement as in Algorithm 3):

1. Mask: expert i stays a candidate iff (z* - z_i) / max(|z_i|, z*) <= 2 * jitter_eps, where z* is the best logit
   among the experts not chosen yet and z the raw logits. p = softmax over the candidates (the "MaskedSoftmax").
2. Choose D: in training sample D ~ p (Gumbel-max), in eval take the argmax.
3. Weight: p_D. In training it is multiplied by the Heun factor c: 1 when D is the argmax of p, otherwise 1 with
   probability 1/4 and 1/3 with probability 3/4 (the third-order Heun estimate of the router gradient).
4. Router gradient in training: g * p_D * (onehot(D) - p) on the raw logits, for upstream gradient g, not scaled by c.
   In eval the weight is an ordinary differentiable p_D (the gating-proxy gradient).

Constants and masking follow GRIN's released code so that top-2 results agree with it bit for bit.
"""

import torch
from torch import nn

# Heun factor as in GRIN's released code: 0.3333 + 0.6667 * keep, kept for bit-exact agreement with it.
_HEUN_LOW, _HEUN_SPAN = 0.3333, 0.6667


def _exponential_like(reference: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Exp(1) samples are exactly 0 with tiny but non-zero probability; log(0) would turn Gumbel-max into NaN.
    sample = torch.empty_like(reference).exponential_(generator=generator)
    return sample.clamp_(min=torch.finfo(sample.dtype).tiny)


def _uniform_like(reference: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(reference.shape, dtype=reference.dtype, device=reference.device, generator=generator)


class SparseMixerGradient(torch.autograd.Function):
    """Returns `weight * heun_factor`; its backward gives the raw logits SparseMixer-v2's router gradient."""

    @staticmethod
    def forward(ctx, logits, weight, index, probs, heun_factor):
        ctx.save_for_backward(weight, index, probs)
        return weight * heun_factor

    @staticmethod
    def backward(ctx, grad_output):
        weight, index, probs = ctx.saved_tensors
        grad = grad_output * weight  # g * p_D
        grad_logits = (probs * grad.neg()).scatter_add_(-1, index, grad)  # g * p_D * (onehot(D) - p)
        return grad_logits, None, None, None, None


def _check_routing_inputs(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"router logits must be 2-D [tokens, num_experts], got shape {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"`top_k` must be an integer in 1..num_experts (1..{num_experts}), got {top_k!r}")
    if torch.compiler.is_compiling():
        return
    message = (
        "router logits contain NaN or inf; the hidden states feeding the router have diverged "
        "(check the learning rate, the loss scale, or fp16 overflow)"
    )
    if logits.device.type == "cpu":
        if not torch.isfinite(logits).all():
            raise ValueError(message)
    else:
        # A host-side check would synchronise with the GPU in every MoE layer; a device-side assert stops the
        # program just as loudly (at the next synchronisation) without stalling the launch queue.
        torch._assert_async(torch.isfinite(logits).all(), message)


def _routing_scores(logits: torch.Tensor, precision: str) -> torch.Tensor:
    if precision not in ("float32", "logits"):
        raise ValueError(f"`precision` must be 'float32' or 'logits', got {precision!r}")
    return logits.float() if precision == "float32" else logits


def _sparsemixer_v2_eval(scores: torch.Tensor, top_k: int, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode SparseMixer-v2 on the routing scores (`_routing_scores`): the argmax of each slot, weighted by the
    masked softmax, all slots' masks and softmaxes taken at once ([T, k, E]) instead of slot by slot: the same
    elementwise operations, so the same bits, in half the kernel launches (what a decoded token pays for in every
    MoE layer)."""
    remaining, remainings, best_logits, choices = scores, [], [], []
    for slot in range(top_k):  # the slots' argmaxes: ties broken as the slot-by-slot loop breaks them
        remainings.append(remaining)
        with torch.no_grad():
            best_logit, choice = remaining.max(dim=-1, keepdim=True)
        best_logits.append(best_logit)
        choices.append(choice)
        if slot + 1 < top_k:
            remaining = remaining.scatter(-1, choice, float("-inf"))
    best_logit, indices = torch.stack(best_logits, dim=1), torch.cat(choices, dim=-1)  # [T, k, 1], [T, k]
    with torch.no_grad():
        scale = scores.abs().unsqueeze(1).clamp(min=best_logit)
        outside = (best_logit - scores.unsqueeze(1)) / scale > 2 * jitter_eps
    candidates = torch.stack(remainings, dim=1).masked_fill(outside, float("-inf"))
    return candidates.softmax(dim=-1).gather(-1, indices.unsqueeze(-1)).squeeze(-1), indices


def sparsemixer_v2(
    logits: torch.Tensor,
    top_k: int,
    jitter_eps: float,
    training: bool,
    generator: torch.Generator | None = None,
    *,
    heun_keep_prob: float = 0.25,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to `top_k` experts with SparseMixer-v2.

    Args:
        logits: raw router logits, `[tokens, num_experts]`.
        top_k: experts per token, `1 <= top_k <= num_experts`, chosen without replacement.
        jitter_eps: mask threshold (`router_jitter_noise` in the config), `>= 0`.
        training: sample experts and use SparseMixer-v2's gradient estimator; otherwise deterministic argmax.
        generator: random source for the training-mode samples, for reproducibility.
        heun_keep_prob: probability that a non-argmax choice keeps factor 1 instead of 1/3: 1/4 is SparseMixer-v2's
            Bernoulli(1/4) (Eq. 8); 1.0 always keeps 1, a first-order (Euler-style) estimate, for comparisons.
        precision: `"float32"` computes the routing in fp32; `"logits"` in the logits' dtype, as GRIN's released
            code does (bit for bit the same in bf16 too).

    Returns:
        `(weights, indices)`, both `[tokens, top_k]`; weights in the dtype of `logits` (computed in `precision`), not
        renormalised (GRIN's weights are exactly 1.0 for most tokens), indices as int64.
    """
    _check_routing_inputs(logits, top_k)
    if jitter_eps < 0:
        raise ValueError(f"`jitter_eps` must be non-negative, got {jitter_eps!r}")
    if not 0 <= heun_keep_prob <= 1:
        raise ValueError(f"`heun_keep_prob` must be in [0, 1], got {heun_keep_prob!r}")
    if logits.shape[0] == 0:
        return logits.new_empty(0, top_k), torch.empty(0, top_k, dtype=torch.long, device=logits.device)

    with torch.autocast(device_type=logits.device.type, enabled=False):
        scores = _routing_scores(logits, precision)
        if not training:
            weights, indices = _sparsemixer_v2_eval(scores, top_k, jitter_eps)
            return weights.to(logits.dtype), indices
        remaining = scores  # logits with the experts already chosen for this token set to -inf
        weights, indices = [], []
        for _ in range(top_k):
            with torch.no_grad():
                best_logit = remaining.max(dim=-1, keepdim=True)[0]
                scale = scores.abs().clamp(min=best_logit)
                outside = (best_logit - scores) / scale > 2 * jitter_eps
            candidates = remaining.masked_fill(outside, float("-inf"))
            with torch.no_grad():
                gumbel = candidates - _exponential_like(candidates, generator).log()
                choice = gumbel.max(dim=-1, keepdim=True)[1]
                probs = candidates.softmax(dim=-1)
                weight = probs.gather(-1, choice)
                keep = (choice == probs.max(dim=-1, keepdim=True)[1]) | (
                    _uniform_like(weight, generator) > 1 - heun_keep_prob
                )
                heun_factor = torch.add(_HEUN_LOW, keep, alpha=_HEUN_SPAN).type_as(probs)
            weight = SparseMixerGradient.apply(scores, weight, choice, probs, heun_factor)
            weights.append(weight)
            indices.append(choice)
            remaining = remaining.scatter(-1, choice, float("-inf"))
    return torch.cat(weights, dim=-1).to(logits.dtype), torch.cat(indices, dim=-1)


def softmax_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, *, precision: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """GShard/Mixtral routing: top-k of the softmax (computed in `precision`, see `sparsemixer_v2`), optionally
    renormalised to sum to one."""
    _check_routing_inputs(logits, top_k)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        weights, indices = _routing_scores(logits, precision).softmax(dim=-1).topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


class GrinMoeRouter(nn.Module):
    """Linear gate without bias (GRIN: `Router(x) = x @ W.T`) followed by the configured routing rule.

    `input_size` defaults to `hidden_size`; MH-MoE passes the sub-token size.
    Returns `(router_logits [T, E], routing_weights [T, k], selected_experts [T, k])`.
    """

    def __init__(self, config, input_size: int | None = None):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router_type = config.router_type
        self.jitter_eps = config.router_jitter_noise
        self.renormalize = config.router_renormalize
        self.precision = config.router_precision
        self.weight = nn.Parameter(torch.empty(self.num_experts, input_size or config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = nn.functional.linear(hidden_states, self.weight)
        if self.router_type == "sparsemixer_v2":
            weights, indices = sparsemixer_v2(router_logits, self.top_k, self.jitter_eps, self.training,
                                              precision=self.precision)
        else:
            weights, indices = softmax_topk(router_logits, self.top_k, self.renormalize, precision=self.precision)
        return router_logits, weights, indices
