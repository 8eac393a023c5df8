"""Checks of router gradient estimators against the exact gradient of the expected loss, on enumerable problems.

Problem: E experts with fixed outputs e_i (vectors), router logits z, a smooth scalar loss f of the mixed output
y = sum_k w_k e_{D_k}. Expert choices follow SparseMixer's sampling: D_1 ~ p = MaskedSoftmax(z) and each later D_k
from the masked softmax of the experts not chosen yet; the weight of slot k is its own probability. The expected loss

    L(z) = sum over ordered choices (D_1..D_K) of  P(D_1..D_K) * f(sum_k p^(k)_{D_k} e_{D_k})

is enumerated exactly (E!/(E-K)! terms) and differentiated with autograd; the masks count as constants, as in the
router. Two objectives (paper, appendix A):
- `"sampling"`: the weights inside f are detached, so z acts only through the choice probabilities. This is the
  objective SparseMixer-v2 optimises (Eq. 7/8, the corrected derivation);
- `"full"`: z acts through the probabilities and the weights, the v2* objective (Eq. 4).
Estimators, each averaged over many tokens that share z:
- `sparsemixer_v2`: the router gradient of `sparsemixer_v2` in training mode (sampling + Heun factor, Bern(1/4));
- `sparsemixer_v2_star`: the same with Bern(5/8), the direction of v2*'s estimator (its factor 2 does not change it);
- `sampled_first_order`: the same sampling and backward with the factor fixed to 1 (the Euler estimate);
- `softmax_topk_proxy`: GShard's gating proxy: deterministic top-k of the plain softmax, gradient through the
  selected probabilities only (top-k held constant).
"""

import itertools
import math
from dataclasses import dataclass

import torch

from .sparsemixer import softmax_topk, sparsemixer_v2


@dataclass
class RoutingProblem:
    logits: torch.Tensor  # [E]
    expert_outputs: torch.Tensor  # [E, d]
    target: torch.Tensor  # [d]

    def loss(self, mixed: torch.Tensor) -> torch.Tensor:
        """A smooth, non-quadratic loss of the mixed output `[..., d]` -> `[...]`."""
        return (torch.tanh(mixed) - self.target).pow(2).sum(-1)


_HEUN_KEEP_PROB = {"sparsemixer_v2": 0.25, "sparsemixer_v2_star": 0.625, "sampled_first_order": 1.0}


def random_problem(
    num_experts: int, dim: int, generator: torch.Generator, logit_scale: float = 1.0, output_scale: float = 1.0
) -> RoutingProblem:
    return RoutingProblem(
        logits=torch.randn(num_experts, generator=generator, dtype=torch.float64) * logit_scale,
        expert_outputs=torch.randn(num_experts, dim, generator=generator, dtype=torch.float64) * output_scale,
        target=torch.rand(dim, generator=generator, dtype=torch.float64) * 2 - 1,
    )


def _masked_softmax(logits: torch.Tensor, available: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """SparseMixer's mask relative to the best available expert (mask constant), softmax over what survives."""
    remaining = logits.masked_fill(~available, float("-inf"))
    with torch.no_grad():
        best = remaining.max()
        outside = (best - logits) / logits.abs().clamp(min=best) > 2 * jitter_eps
    return remaining.masked_fill(outside, float("-inf")).softmax(-1)


OBJECTIVES = ("sampling", "full")


def exact_gradient(problem: RoutingProblem, top_k: int, jitter_eps: float, objective: str) -> torch.Tensor:
    """d L / d z of `objective` ("sampling" or "full", see the module note) by enumerating every ordered choice."""
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}")
    logits = problem.logits.clone().requires_grad_(True)
    num_experts = logits.shape[0]
    expected_loss = logits.new_zeros(())
    for choice in itertools.permutations(range(num_experts), top_k):
        available = torch.ones(num_experts, dtype=torch.bool)
        probability, mixed = logits.new_ones(()), 0
        for expert in choice:
            p = _masked_softmax(logits, available, jitter_eps)[expert]
            probability = probability * p
            weight = p.detach() if objective == "sampling" else p
            mixed = mixed + weight * problem.expert_outputs[expert]
            available[expert] = False
        if probability.detach() > 0:
            expected_loss = expected_loss + probability * problem.loss(mixed)
    (gradient,) = torch.autograd.grad(expected_loss, logits)
    return gradient


def estimated_gradient(
    problem: RoutingProblem, top_k: int, jitter_eps: float, estimator: str, num_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """Mean over `num_samples` tokens (all with logits z) of the per-token router gradient of `estimator`."""
    logits = problem.logits.float().expand(num_samples, -1).clone().requires_grad_(True)
    if estimator == "softmax_topk_proxy":
        weights, indices = softmax_topk(logits, top_k, renormalize=False)
    elif estimator in _HEUN_KEEP_PROB:
        keep = _HEUN_KEEP_PROB[estimator]
        weights, indices = sparsemixer_v2(logits, top_k, jitter_eps, True, generator=generator, heun_keep_prob=keep)
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    mixed = (weights.double().unsqueeze(-1) * problem.expert_outputs[indices]).sum(1)
    problem.loss(mixed).sum().backward()
    return logits.grad.double().mean(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


ESTIMATORS = ("sparsemixer_v2", "sparsemixer_v2_star", "sampled_first_order", "softmax_topk_proxy")


def compare_estimators(
    top_k: int,
    num_problems: int = 20,
    num_experts: int = 4,
    dim: int = 8,
    num_samples: int = 20000,
    jitter_eps: float = 1.0,
    logit_scale: float = 1.0,
    output_scale: float = 1.0,
    seed: int = 0,
) -> dict[tuple[str, str], tuple[float, float]]:
    """Mean and standard error over random problems of the cosine between each estimator and each objective's exact
    gradient, keyed by `(estimator, objective)`.

    `output_scale` sets the size of the expert outputs: small outputs keep f near its Taylor expansion, where the
    Euler/Heun approximations behind SparseMixer are accurate. `jitter_eps >= 1` masks nothing (the mask ratio never
    exceeds 2), so the sampling distribution is the plain softmax that the top-k proxy uses too and all estimators
    are compared on the same objective.
    """
    # Separate streams: the same problems for any `num_samples`, so results at several sample counts compare.
    problem_generator = torch.Generator().manual_seed(seed)
    sample_generator = torch.Generator().manual_seed(seed + 1)
    cosines = {(name, objective): [] for name in ESTIMATORS for objective in OBJECTIVES}
    for _ in range(num_problems):
        problem = random_problem(num_experts, dim, problem_generator, logit_scale, output_scale)
        exact = {objective: exact_gradient(problem, top_k, jitter_eps, objective) for objective in OBJECTIVES}
        for name in ESTIMATORS:
            estimate = estimated_gradient(problem, top_k, jitter_eps, name, num_samples, sample_generator)
            for objective in OBJECTIVES:
                cosines[name, objective].append(cosine(estimate, exact[objective]))
    summary = {}
    for key, values in cosines.items():
        values = torch.tensor(values, dtype=torch.float64)
        summary[key] = (values.mean().item(), (values.std() / math.sqrt(len(values))).item())
    return summary
