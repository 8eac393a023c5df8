import pytest
import torch
from transformers.models.phimoe import modeling_phimoe

from modeling_grin import sparsemixer as sm
from modeling_grin.sparsemixer import softmax_topk, sparsemixer_v2


def logits_with_ties(tokens=512, experts=8, seed=0):
    """Coarse random logits: exact ties, near-ties inside the 2 * eps mask and clear winners all occur often."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator)
    coarse = (logits * 4).round() / 4
    near = coarse + 1e-3 * torch.randn(tokens, experts, generator=generator)
    return torch.cat([logits, coarse, near, -coarse.abs(), torch.zeros(4, experts)])


@pytest.mark.parametrize("jitter_eps", [0.01, 0.1, 0.5])
def test_eval_top2_is_bit_exact_with_transformers_sparsemixer(jitter_eps):
    logits = logits_with_ties()
    reference_weights, reference_indices = modeling_phimoe.sparsemixer(logits, jitter_eps, training=False)
    weights, indices = sparsemixer_v2(logits, 2, jitter_eps, training=False)
    assert torch.equal(indices, reference_indices)
    assert torch.equal(weights, reference_weights)
    # The data has both partial weights (ties, near-ties) and weights of exactly 1.
    assert (weights < 1).any() and (weights == 1).any()


class QueuedNoise:
    """Feeds the same Exp(1) and U(0, 1) draws to the reference and to our implementation."""

    def __init__(self, tokens, experts, top_k, seed):
        generator = torch.Generator().manual_seed(seed)
        self.exponential = [torch.empty(tokens, experts).exponential_(generator=generator) for _ in range(top_k)]
        self.uniform = [torch.rand(tokens, 1, generator=generator) for _ in range(top_k)]

    def patch_reference(self, monkeypatch):
        exponential, uniform = list(self.exponential), list(self.uniform)
        monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.copy_(exponential.pop(0)))
        monkeypatch.setattr(torch, "rand_like", lambda x, *a, **k: uniform.pop(0).clone())
        monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self)  # reference redraws once more

    def patch_ours(self, monkeypatch):
        exponential, uniform = list(self.exponential), list(self.uniform)
        monkeypatch.setattr(sm, "_exponential_like", lambda x, g: exponential.pop(0).clone())
        monkeypatch.setattr(sm, "_uniform_like", lambda x, g: uniform.pop(0).clone())


def routed_loss_and_grad(function, logits, upstream):
    logits = logits.clone().requires_grad_(True)
    weights, indices = function(logits)
    (weights * upstream).sum().backward()
    return weights.detach(), indices, logits.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_top2_matches_transformers_given_the_same_samples(monkeypatch, seed):
    # Logits near 100: the 2 * eps mask keeps every expert within ~2 of the best, so most tokens have several
    # candidates whose masked-softmax probabilities are far apart (not near-ties, where any sampling rule would pick
    # the same expert from the same noise); the ties of `logits_with_ties` survive the offset.
    logits = 100 + logits_with_ties(tokens=256, seed=seed)
    probs = masked_softmax(logits, logits.max(-1, keepdim=True).values)
    candidates = (probs > 0).sum(-1)
    spread = probs.max(-1).values - probs.masked_fill(probs == 0, 2).min(-1).values
    assert ((candidates >= 3) & (spread > 0.3)).float().mean() > 0.25
    upstream = torch.randn(logits.shape[0], 2, generator=torch.Generator().manual_seed(seed))
    noise = QueuedNoise(*logits.shape, top_k=2, seed=seed)

    with monkeypatch.context() as patch:
        noise.patch_reference(patch)
        reference = routed_loss_and_grad(
            lambda z: modeling_phimoe.sparsemixer(z, 0.01, training=True), logits, upstream
        )
    with monkeypatch.context() as patch:
        noise.patch_ours(patch)
        ours = routed_loss_and_grad(lambda z: sparsemixer_v2(z, 2, 0.01, training=True), logits, upstream)

    assert torch.equal(ours[1], reference[1])
    assert torch.equal(ours[0], reference[0])
    assert torch.allclose(ours[2], reference[2], rtol=0, atol=1e-7)
    # The comparison covers sampling (not only argmax choices) and both Heun branches (factor 1 and 1/3).
    assert (ours[1][:, 0] != logits.argmax(-1)).any()
    with monkeypatch.context() as patch:
        noise.patch_ours(patch)
        unscaled = sparsemixer_v2(logits, 2, 0.01, training=True, heun_keep_prob=1.0)[0]  # factor always 1
    factor = ours[0] / unscaled
    assert (factor < 0.5).any() and (factor == 1).any()
    assert torch.allclose(factor[factor < 0.5], torch.tensor(0.3333))


@pytest.mark.parametrize("top_k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("training", [False, True])
def test_any_top_k_returns_distinct_experts(top_k, training):
    logits = torch.randn(300, 8) * 0.02
    weights, indices = sparsemixer_v2(logits, top_k, 0.01, training, generator=torch.Generator().manual_seed(0))
    assert weights.shape == indices.shape == (300, top_k)
    assert indices.dtype == torch.long
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all()  # without replacement
    assert torch.isfinite(weights).all() and (weights > 0).all() and (weights <= 1).all()


def test_eval_top_k_takes_experts_in_logit_order():
    logits = torch.randn(100, 6)
    _, indices = sparsemixer_v2(logits, 4, 0.01, training=False)
    assert torch.equal(indices, logits.topk(4, dim=-1).indices)


def test_training_is_reproducible_from_a_generator():
    # Seeded logits near 100, so most tokens have several candidates (the process's global RNG is seeded at random:
    # unseeded small logits sometimes had a single candidate per slot everywhere, and every seed chose alike).
    logits = 100 + torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    first = sparsemixer_v2(logits, 2, 0.01, True, generator=torch.Generator().manual_seed(7))
    second = sparsemixer_v2(logits, 2, 0.01, True, generator=torch.Generator().manual_seed(7))
    other = sparsemixer_v2(logits, 2, 0.01, True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def assert_frequencies_match(counts: torch.Tensor, expected: torch.Tensor, sigmas: float = 5.0) -> None:
    """Observed counts against expected probabilities, within `sigmas` binomial standard errors per cell."""
    samples = counts.sum()
    frequency = counts.double() / samples
    standard_error = (expected * (1 - expected) / samples).sqrt()
    assert (frequency[expected == 0] == 0).all(), frequency
    excess = ((frequency - expected).abs() / standard_error.clamp(min=1e-12))[expected > 0]
    assert (excess <= sigmas).all(), (frequency, expected, excess)


SAMPLES = 40_000
# Candidates of the first slot (eps 0.01: within 2% of max(|z_i|, z*) = 100): 100, 99.5, 99, 98.2; 50 is masked.
# Their masked softmax, ~[0.45, 0.27, 0.17, 0.07], is far from uniform (0.25 each): 20+ standard errors apart.
SPREAD_LOGITS = torch.tensor([100.0, 99.5, 99.0, 98.2, 50.0], dtype=torch.float64)


def masked_softmax(logits: torch.Tensor, best: torch.Tensor, jitter_eps: float = 0.01) -> torch.Tensor:
    """SparseMixer-v2's candidate distribution from the formula: i is kept iff (z* - z_i) / max(|z_i|, z*) <= 2 eps."""
    outside = (best - logits) / logits.abs().clamp(min=best) > 2 * jitter_eps
    return logits.masked_fill(outside | logits.isinf(), float("-inf")).softmax(-1)


def test_training_sampling_follows_the_masked_softmax():
    expected = masked_softmax(SPREAD_LOGITS, SPREAD_LOGITS.max())
    assert (expected[:4] > 0).all() and expected[4] == 0
    assert (expected[:4] - 0.25).abs().max() > 0.15  # uniform sampling among the candidates would fail by far
    logits = SPREAD_LOGITS.float().expand(SAMPLES, 5)
    _, indices = sparsemixer_v2(logits, 1, 0.01, True, generator=torch.Generator().manual_seed(0))
    assert_frequencies_match(torch.bincount(indices[:, 0], minlength=5), expected)


def test_training_top2_samples_pairs_without_replacement_from_the_masked_softmax():
    """Second slot: masked softmax of the rest, its threshold the best remaining logit (Algorithm 3)."""
    first = masked_softmax(SPREAD_LOGITS, SPREAD_LOGITS.max())
    expected = torch.zeros(5, 5, dtype=torch.float64)
    for chosen in range(5):
        rest = SPREAD_LOGITS.clone()
        rest[chosen] = float("-inf")
        expected[chosen] = first[chosen] * masked_softmax(rest, rest.max())
    logits = SPREAD_LOGITS.float().expand(SAMPLES, 5)
    _, indices = sparsemixer_v2(logits, 2, 0.01, True, generator=torch.Generator().manual_seed(1))
    pairs = torch.bincount(indices[:, 0] * 5 + indices[:, 1], minlength=25)
    assert_frequencies_match(pairs, expected.flatten())


def test_exact_zero_exponential_draws_do_not_produce_nan(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.zero_())
    logits = torch.randn(32, 4).requires_grad_(True)
    weights, _ = sparsemixer_v2(logits, 2, 0.01, training=True)
    weights.sum().backward()
    assert torch.isfinite(weights).all() and torch.isfinite(logits.grad).all()


def test_router_gradient_is_the_masked_softmax_jacobian_row():
    logits = torch.tensor([[2.0, 1.99, 0.0, -1.0]], requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    weights, indices = sparsemixer_v2(logits, 1, 0.01, True, generator=generator)
    weights.sum().backward()
    probs = torch.tensor([2.0, 1.99]).softmax(-1)
    chosen = indices.item()
    expected = torch.zeros(4)
    expected[:2] = probs[chosen] * (torch.nn.functional.one_hot(torch.tensor(chosen), 2) - probs)
    assert torch.allclose(logits.grad[0], expected, atol=1e-7)


def test_routing_math_is_fp32_under_autocast():
    logits = (torch.randn(16, 8) * 0.01).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights, indices = sparsemixer_v2(logits, 2, 0.01, training=False)
    reference_weights, reference_indices = sparsemixer_v2(logits.float(), 2, 0.01, training=False)
    assert weights.dtype == torch.bfloat16
    assert torch.equal(indices, reference_indices)
    assert torch.equal(weights, reference_weights.bfloat16())


@pytest.mark.parametrize("top_k", [0, 9, 2.0])
def test_top_k_out_of_range_raises(top_k):
    with pytest.raises(ValueError, match="top_k"):
        sparsemixer_v2(torch.randn(3, 8), top_k, 0.01, training=False)
    with pytest.raises(ValueError, match="top_k"):
        softmax_topk(torch.randn(3, 8), top_k, renormalize=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_raise(bad):
    logits = torch.randn(4, 8)
    logits[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        sparsemixer_v2(logits, 2, 0.01, training=True)


def test_negative_jitter_raises():
    with pytest.raises(ValueError, match="jitter_eps"):
        sparsemixer_v2(torch.randn(3, 8), 2, -0.1, training=False)


@pytest.mark.parametrize("training", [False, True])
def test_empty_batch_returns_empty_outputs(training):
    weights, indices = sparsemixer_v2(torch.empty(0, 8), 3, 0.01, training)
    assert weights.shape == indices.shape == (0, 3) and indices.dtype == torch.long


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk(renormalize):
    logits = torch.randn(50, 8)
    weights, indices = softmax_topk(logits, 3, renormalize)
    probs = logits.softmax(-1)
    assert torch.equal(indices, probs.topk(3, dim=-1).indices)
    expected = probs.topk(3, dim=-1).values
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(weights, expected, atol=1e-7)


# Mutation testing (docs/testing.md): the boundaries of the argument checks and their messages.
def test_three_dimensional_logits_raise_with_the_shape():
    with pytest.raises(ValueError, match=r"2-D \[tokens, num_experts\], got shape \(2, 3, 8\)"):
        sparsemixer_v2(torch.randn(2, 3, 8), 2, 0.01, training=False)


def test_non_finite_message_says_what_to_check():
    logits = torch.randn(4, 8)
    logits[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^router logits contain NaN or inf; the hidden states feeding the router "
                                         r"have diverged \(check the learning rate, the loss scale, or fp16 "
                                         r"overflow\)$"):
        sparsemixer_v2(logits, 2, 0.01, training=False)


def test_zero_jitter_is_allowed_and_keeps_only_the_best_expert():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    weights, indices = sparsemixer_v2(logits, 1, 0.0, training=False)
    assert indices.item() == 0 and weights.item() == 1.0


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_heun_keep_prob_bounds_are_allowed(keep):
    weights, _ = sparsemixer_v2(100 + torch.randn(32, 8), 2, 0.01, True, heun_keep_prob=keep)
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("keep", [-0.1, 1.5])
def test_heun_keep_prob_out_of_range_raises_with_the_value(keep):
    with pytest.raises(ValueError, match=rf"`heun_keep_prob` must be in \[0, 1\], got {keep}"):
        sparsemixer_v2(torch.randn(3, 8), 2, 0.01, True, heun_keep_prob=keep)


def slot_by_slot_eval(logits, top_k, jitter_eps):
    """The eval rule written out one slot at a time (as the paper's Algorithm 3 reads): the reference for the
    batched eval path."""
    scores, weights, indices = logits.float(), [], []
    remaining = scores
    for _ in range(top_k):
        best_logit, choice = remaining.max(dim=-1, keepdim=True)
        outside = (best_logit - scores) / scores.abs().clamp(min=best_logit) > 2 * jitter_eps
        weights.append(remaining.masked_fill(outside, float("-inf")).softmax(dim=-1).gather(-1, choice))
        indices.append(choice)
        remaining = remaining.scatter(-1, choice, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(indices, dim=-1)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_eval_path_equals_the_slot_by_slot_rule_bit_for_bit_with_its_gradient(top_k):
    """All slots at once ([T, k, E]) gives the same bits, the same tie-breaking and the same logit gradient."""
    logits = logits_with_ties(tokens=300, experts=8, seed=top_k)  # ends with rows of eight tied zeros
    upstream = torch.randn(logits.shape[0], top_k, generator=torch.Generator().manual_seed(0))
    weights, indices, grad = routed_loss_and_grad(lambda x: sparsemixer_v2(x, top_k, 0.01, training=False),
                                                  logits, upstream)
    expected_weights, expected_indices, expected_grad = routed_loss_and_grad(
        lambda x: slot_by_slot_eval(x, top_k, 0.01), logits, upstream)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(weights, expected_weights)
    assert torch.equal(grad, expected_grad)
    assert (grad != 0).any()


# ----- router_precision: the routing math in fp32 (default) or in the logits' dtype, as the released code -----------


def bf16_logits(tokens=256, experts=8, seed=0):
    return (2 * torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))).bfloat16()


@pytest.mark.parametrize("jitter_eps", [0.01, 0.5])
def test_logits_precision_is_bit_exact_with_transformers_sparsemixer_in_bf16(jitter_eps):
    """Phimoe's port of the released router computes in the logits' dtype; "float32" rounds only the result (which
    differs from bf16 arithmetic where the 2 * eps mask leaves several candidates)."""
    logits = logits_with_ties().bfloat16()
    reference_weights, reference_indices = modeling_phimoe.sparsemixer(logits, jitter_eps, training=False)
    weights, indices = sparsemixer_v2(logits, 2, jitter_eps, training=False, precision="logits")
    assert torch.equal(indices, reference_indices) and torch.equal(weights, reference_weights)
    fp32_weights, fp32_indices = sparsemixer_v2(logits, 2, jitter_eps, training=False)
    expected_weights, expected_indices = sparsemixer_v2(logits.float(), 2, jitter_eps, training=False)
    assert fp32_weights.dtype == torch.bfloat16 and torch.equal(fp32_indices, expected_indices)
    assert torch.equal(fp32_weights, expected_weights.bfloat16())
    assert torch.equal(fp32_weights, weights) == (jitter_eps == 0.01)  # 0.5: many partial weights, rounded apart


@pytest.mark.parametrize("precision", ["float32", "logits"])
def test_training_weights_come_back_in_the_logits_dtype(precision):
    logits = bf16_logits(tokens=64)
    generator = torch.Generator().manual_seed(0)
    weights, indices = sparsemixer_v2(logits, 2, 0.01, training=True, generator=generator, precision=precision)
    assert weights.dtype == torch.bfloat16 and indices.dtype == torch.long
    scores = logits.float() if precision == "float32" else logits
    again = sparsemixer_v2(scores, 2, 0.01, training=True, generator=torch.Generator().manual_seed(0),
                           precision="logits")  # fmt: skip
    assert torch.equal(indices, again[1]) and torch.equal(weights, again[0].to(torch.bfloat16))


@pytest.mark.parametrize("precision", ["float32", "logits"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_precision(precision, renormalize):
    logits = bf16_logits()
    weights, indices = softmax_topk(logits, 2, renormalize, precision=precision)
    probs = (logits.float() if precision == "float32" else logits).softmax(dim=-1)
    expected, expected_indices = probs.topk(2, dim=-1)
    if renormalize:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    assert weights.dtype == torch.bfloat16
    assert torch.equal(indices, expected_indices) and torch.equal(weights, expected.bfloat16())


def test_an_unknown_precision_is_refused_with_the_allowed_ones():
    for route in (lambda: sparsemixer_v2(torch.randn(3, 4), 2, 0.01, False, precision="bf16"),
                  lambda: softmax_topk(torch.randn(3, 4), 2, True, precision="bf16")):  # fmt: skip
        with pytest.raises(ValueError) as error:
            route()
        assert str(error.value) == "`precision` must be 'float32' or 'logits', got 'bf16'"


@pytest.mark.parametrize("router_type", ["sparsemixer_v2", "softmax_topk"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_applies_its_configured_rule_precision_and_renormalisation(router_type, renormalize):
    from conftest import tiny_config

    config = tiny_config(router_type=router_type, router_renormalize=renormalize, router_precision="logits",
                         router_jitter_noise=0.5)  # (a wide mask: bf16 and fp32 routing differ often)
    router = sm.GrinMoeRouter(config).eval()
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(0)))
    router.bfloat16()
    hidden = torch.randn(256, config.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        logits, weights, indices = router(hidden)
        assert torch.equal(logits, torch.nn.functional.linear(hidden, router.weight))
        if router_type == "softmax_topk":
            expected = softmax_topk(logits, config.num_experts_per_tok, renormalize, precision="logits")
        else:
            expected = sparsemixer_v2(logits, config.num_experts_per_tok, 0.5, training=False, precision="logits")
    assert torch.equal(weights, expected[0]) and torch.equal(indices, expected[1])
