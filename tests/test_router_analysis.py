import pytest
import torch

from modeling_grin.router_analysis import (
    compare_estimators,
    estimated_gradient,
    exact_gradient,
    random_problem,
)


@pytest.mark.parametrize("objective", ["sampling", "full"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_exact_gradient_matches_finite_differences(objective, top_k):
    problem = random_problem(4, 5, torch.Generator().manual_seed(top_k))
    gradient = exact_gradient(problem, top_k, jitter_eps=1.0, objective=objective)

    def expected_loss(logits):
        # The same enumeration, perturbing z while the weights inside f stay at z0 for the sampling objective.
        import itertools

        total = 0.0
        for choice in itertools.permutations(range(4), top_k):
            available = torch.ones(4, dtype=torch.bool)
            probability, mixed = 1.0, 0.0
            for expert in choice:
                p = logits.masked_fill(~available, float("-inf")).softmax(-1)[expert]
                p0 = problem.logits.masked_fill(~available, float("-inf")).softmax(-1)[expert]
                probability = probability * p
                mixed = mixed + (p0 if objective == "sampling" else p) * problem.expert_outputs[expert]
                available[expert] = False
            total = total + probability * problem.loss(mixed)
        return total

    step = 1e-6
    numeric = torch.stack(
        [(expected_loss(problem.logits + step * e) - expected_loss(problem.logits - step * e)) / (2 * step)
         for e in torch.eye(4, dtype=torch.float64)]
    )
    assert torch.allclose(gradient, numeric, atol=1e-7)


def test_unknown_estimator_or_objective_raise():
    problem = random_problem(4, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="objective"):
        exact_gradient(problem, 1, 1.0, "other")
    with pytest.raises(ValueError, match="estimator"):
        estimated_gradient(problem, 1, 1.0, "other", 10, torch.Generator())


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparsemixer_gradient_points_along_the_exact_gradient_better_than_the_gating_proxy(top_k):
    summary = compare_estimators(top_k, num_problems=8, num_samples=4000, seed=0)
    sparsemixer, _ = summary["sparsemixer_v2", "sampling"]
    proxy, _ = summary["softmax_topk_proxy", "sampling"]
    assert sparsemixer > 0.6
    assert sparsemixer > proxy
    assert summary["sparsemixer_v2", "full"][0] > 0.9
