import json

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import modeling_grin.fused_experts as fused_experts
from modeling_grin.modeling_grin_moe import GrinMoeExperts

LAYOUTS = ["sorted", "few_pairs"]


@pytest.fixture
def layout(request, monkeypatch):
    """Force one of the two CPU paths, the sorted rows or the few-pairs (decoding) path (`auto` keeps the policy)."""
    choice = request.param
    if choice != "auto":
        monkeypatch.setattr(fused_experts, "FEW_PAIRS_PER_EXPERT", float("inf") if choice == "few_pairs" else 0.0)
    return choice


def make_experts(num_experts=8, top_k=2, hidden_act="silu", seed=0):
    config = tiny_config(num_local_experts=num_experts, num_experts_per_tok=top_k, hidden_act=hidden_act)
    torch.manual_seed(seed)
    experts = GrinMoeExperts(config)
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return experts


def run(experts, implementation, hidden, index, weights):
    """Output and gradients of `experts` under `implementation`: a name, or an experts forward function."""
    hidden = hidden.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    experts.zero_grad()
    if callable(implementation):
        output = implementation(experts, hidden, index, weights)
    else:
        experts.config._experts_implementation = implementation
        output = experts(hidden, index, weights)
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    (output * upstream).sum().backward()
    return {
        "output": output.detach(),
        "hidden": hidden.grad,
        "routing weights": weights.grad,
        "gate_up_proj": experts.gate_up_proj.grad.clone(),
        "down_proj": experts.down_proj.grad.clone(),
    }


def assert_matches_eager(experts, hidden, index, weights, tolerance=1e-5):
    reference = run(experts, "eager", hidden, index, weights)
    fused = run(experts, "fused", hidden, index, weights)
    for name, expected in reference.items():
        scale = expected.abs().max().clamp(min=1e-6)
        assert (fused[name] - expected).abs().max() / scale <= tolerance, name


def random_routing(tokens, num_experts, top_k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    return index, torch.rand(tokens, top_k, generator=generator)


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_matches_eager_forward_and_every_gradient(layout, top_k, tokens):
    experts = make_experts(top_k=top_k)
    index, weights = random_routing(tokens, 8, top_k)
    assert_matches_eager(experts, torch.randn(tokens, 32), index, weights)


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_all_tokens_to_one_expert_and_empty_experts(layout):
    experts = make_experts()
    index = torch.tensor([[5, 2]] * 40)  # experts 0, 1, 3, 4, 6, 7 get nothing
    assert_matches_eager(experts, torch.randn(40, 32), index, torch.rand(40, 2))
    weights_grad = run(experts, "fused", torch.randn(40, 32), index, torch.rand(40, 2))["gate_up_proj"]
    assert weights_grad[[0, 1, 3, 4, 6, 7]].abs().sum() == 0


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_skewed_routing_with_one_overloaded_expert(layout):
    experts = make_experts(top_k=2)
    index, weights = random_routing(50, 8, 2, seed=3)
    index[:30, 0] = 6  # expert 6 takes 30+ of the 100 pairs
    index[:30, 1] = torch.where(index[:30, 1] == 6, 1, index[:30, 1])
    assert_matches_eager(experts, torch.randn(50, 32), index, weights)


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize("activation", ["gelu", "linear"])
def test_other_activations_use_their_own_derivative(layout, activation):
    # "linear" (the bilinear GLU) returns the gate itself: multiplying it in place would overwrite the saved gate
    experts = make_experts(hidden_act=activation)
    index, weights = random_routing(30, 8, 2)
    assert_matches_eager(experts, torch.randn(30, 32), index, weights)


def with_sentinels(index, num_experts, seed=0):
    """Mark about a third of the pairs as expert-parallel sentinels (ids E and E + 3, as if on another rank)."""
    generator = torch.Generator().manual_seed(seed)
    off_rank = torch.rand(index.shape, generator=generator) < 0.35
    sentinel = torch.where(torch.rand(index.shape, generator=generator) < 0.5, num_experts, num_experts + 3)
    return torch.where(off_rank, sentinel, index)


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize("tokens", [1, 9, 64])
def test_expert_parallel_sentinels_are_skipped(layout, tokens):
    """Ids >= E (transformers' expert parallelism: the expert is on another rank) contribute nothing, like eager's."""
    experts = make_experts()
    index, weights = random_routing(tokens, 8, 2, seed=tokens)
    index = with_sentinels(index, 8, seed=tokens)
    index[0] = torch.tensor([8, 3])  # at least one sentinel and one routed pair (eager's output needs one)
    assert_matches_eager(experts, torch.randn(tokens, 32), index, weights)
    grads = run(experts, "fused", torch.randn(tokens, 32), index, weights)
    assert (grads["routing weights"][index >= 8] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_every_pair_a_sentinel_gives_zeros(layout):
    experts = make_experts()
    index = torch.full((5, 2), 8)
    grads = run(experts, "fused", torch.randn(5, 32), index, torch.rand(5, 2))
    for name, grad in grads.items():
        assert (grad == 0).all(), name


def test_sentinels_match_transformers_grouped_mm_under_expert_parallelism():
    """The peer check: transformers' grouped_mm experts with their expert-parallel flag on, same weights and ids."""
    experts = make_experts()
    index, weights = random_routing(48, 8, 2, seed=5)
    index = with_sentinels(index, 8, seed=5)
    weights = weights.masked_fill(index >= 8, 0.0)  # what transformers' dispatch hands the experts
    experts._is_expert_parallel = True
    hidden = torch.randn(48, 32)
    reference = run(experts, ALL_EXPERTS_FUNCTIONS["grouped_mm"], hidden, index, weights)
    fused = run(experts, "fused", hidden, index, weights)
    for name, expected in reference.items():
        assert (fused[name] - expected).abs().max() / expected.abs().max().clamp(min=1e-6) <= 1e-5, name


def test_few_pairs_path_is_taken_for_one_decoded_token_only(monkeypatch):
    """The policy: up to half a pair per expert (1 or 2 tokens x top-2 of 16 experts) takes the few-pairs path, 8
    tokens do not."""
    taken = []
    original = fused_experts.few_pairs_swiglu_experts
    monkeypatch.setattr(fused_experts, "few_pairs_swiglu_experts", lambda *args: taken.append(1) or original(*args))
    experts = make_experts(num_experts=16)
    experts.config._experts_implementation = "fused"
    for tokens, expected in ((1, 1), (2, 2), (8, 2)):
        index, weights = random_routing(tokens, 16, 2, seed=tokens)
        experts(torch.randn(tokens, 32), index, weights)
        assert len(taken) == expected, tokens


@pytest.mark.parametrize("layout", ["auto"], indirect=True)
@pytest.mark.parametrize("tokens", [1, 2, 160])
def test_automatic_choice_matches_eager(layout, tokens):
    experts = make_experts(num_experts=16)
    index, weights = random_routing(tokens, 16, 2, seed=tokens)
    assert_matches_eager(experts, torch.randn(tokens, 32), index, weights)


def test_empty_batch():
    experts = make_experts()
    experts.config._experts_implementation = "fused"
    output = experts(torch.randn(0, 32), torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2))
    assert output.shape == (0, 32)


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_bf16_is_close_to_fp32(layout):  # bf16 hidden states and experts, fp32 routing weights (as the router gives)
    experts = make_experts()
    index, weights = random_routing(64, 8, 2)
    hidden = torch.randn(64, 32)
    fp32 = run(experts, "fused", hidden, index, weights)["output"]
    experts = experts.to(torch.bfloat16)
    experts.config._experts_implementation = "fused"
    bf16 = experts(hidden.bfloat16(), index, weights).float()
    assert (bf16 - fp32).abs().max() / fp32.abs().max() < 0.02


def test_sorted_path_defaults_to_silu_without_quantization():
    experts = make_experts()
    index, weights = random_routing(20, 8, 2)
    hidden = torch.randn(20, 32)
    expected = run(experts, "eager", hidden, index, weights)["output"]
    output = fused_experts.sorted_swiglu_experts(hidden, weights, index, experts.gate_up_proj, experts.down_proj)
    assert (output - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("layout", ["flag is_transposed", "flag has_bias", "no gate"])
def test_experts_the_fused_path_cannot_run_raise(layout):
    experts = make_experts()
    experts.is_transposed, experts.has_bias, experts.has_gate = (
        layout == "flag is_transposed", layout == "flag has_bias", layout != "no gate")
    index, weights = random_routing(4, 8, 2)
    with pytest.raises(ValueError, match=r"^the fused experts implementation supports gated experts without bias in "
                                         r"\[E, out, in\] layout$"):
        fused_experts.fused_experts_forward(experts, torch.randn(4, 32), index, weights)


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_transformers_phimoe_under_fused_matches_its_eager(layout):
    """Other models' experts (no `bitnet` attribute) take the full-precision path."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    torch.manual_seed(0)
    model = PhimoeForCausalLM(PhimoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, max_position_embeddings=64)).eval()  # deterministic routing
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    assert not hasattr(model.model.layers[0].mlp.experts, "bitnet")
    input_ids = torch.randint(1, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    eager_logits, eager_grads = model_outputs_and_grads(model, "eager", input_ids)
    fused_logits, fused_grads = model_outputs_and_grads(model, "fused", input_ids)
    assert (fused_logits - eager_logits).abs().max() <= 1e-5 * eager_logits.abs().max()
    for name, grad in eager_grads.items():
        assert (fused_grads[name] - grad).abs().max() / grad.abs().max().clamp(min=1e-6) <= 1e-5, name


def model_outputs_and_grads(model, implementation, input_ids):
    model.set_experts_implementation(implementation)
    model.zero_grad()
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize("family", ["grin", "mh_moe"])
def test_both_model_families_match_eager(family, layout):
    if family == "grin":
        model = tiny_model(num_experts_per_tok=3)
    else:
        from test_mh_moe import tiny_mh_model

        model = tiny_mh_model()
    input_ids = torch.randint(1, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    eager_logits, eager_grads = model_outputs_and_grads(model, "eager", input_ids)
    fused_logits, fused_grads = model_outputs_and_grads(model, "fused", input_ids)
    assert (fused_logits - eager_logits).abs().max() <= 1e-5
    for name, grad in eager_grads.items():
        assert (fused_grads[name] - grad).abs().max() / grad.abs().max().clamp(min=1e-6) <= 1e-5, name


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize(("activation", "quantize_glu", "hidden_dtype"), [
    ("silu", False, torch.float32), ("silu", True, torch.float32), ("gelu", False, torch.float32),
    ("silu", False, torch.bfloat16),  # bf16 activations with fp32 weights and routing weights, as under autocast
])
def test_custom_operators_pass_opcheck(layout, activation, quantize_glu, hidden_dtype):
    """Schema, fake (meta) implementation with its data-dependent row count, autograd registration, AOT tracing; the
    fake implementation's dtypes (the output in the activations', each gradient in its input's) against the real."""
    generator = torch.Generator().manual_seed(0)
    index, weights = random_routing(9, 4, 2)
    index[0, 0] = 4  # a sentinel too
    gate_up_proj, down_proj = torch.randn(4, 24, 16, generator=generator), torch.randn(4, 16, 12, generator=generator)
    arguments = [torch.randn(9, 16, generator=generator).to(hidden_dtype), weights, index, gate_up_proj, down_proj,
                 activation, quantize_glu]
    for position in (0, 1, 3, 4):
        arguments[position] = arguments[position].clone().requires_grad_(True)
    # Other activations take their derivative with torch.func.vjp inside the backward, whose wrapped tensors opcheck's
    # cross-checking modes cannot inspect (they read every intermediate's storage): for them the autograd check only;
    # test_models_with_fused_experts_compile_into_one_graph compiles a GELU model.
    checks = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if activation != "silu":
        checks = ["test_autograd_registration"]
    torch.library.opcheck(fused_experts._sorted_experts, tuple(arguments), test_utils=checks)
    output, gate_up = fused_experts._sorted_experts(*arguments)
    backward_arguments = (torch.randn_like(output), arguments[0].detach(), weights, index, gate_up, gate_up_proj,
                          down_proj, activation, quantize_glu, [True, True, False, True])  # fmt: skip
    torch.library.opcheck(fused_experts._sorted_experts_backward, backward_arguments,
                          test_utils=checks)  # fmt: skip
    assert output.dtype == hidden_dtype
    grads = fused_experts._sorted_experts_backward(*backward_arguments[:-1], [True] * 4)
    assert [grad.dtype for grad in grads] == [hidden_dtype, weights.dtype, gate_up_proj.dtype, down_proj.dtype]


@pytest.mark.parametrize("family, activation", [("grin", "silu"), ("grin", "gelu"), ("mh_moe", "silu")])
def test_models_with_fused_experts_compile_into_one_graph(family, activation):
    """torch.compile(fullgraph=True) works with `fused` (the routing plan stays inside custom operators), and the
    compiled forward and backward equal eager's. aot_eager: the same tracing as inductor, without code generation."""
    if family == "grin":
        model = tiny_model(hidden_act=activation)
    else:
        from test_mh_moe import tiny_mh_model

        model = tiny_mh_model()
    input_ids = torch.randint(1, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    eager_logits, eager_grads = model_outputs_and_grads(model, "fused", input_ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_logits, compiled_grads = model_outputs_and_grads(compiled, "fused", input_ids)
    torch._dynamo.reset()
    assert (compiled_logits - eager_logits).abs().max() <= 1e-5
    for name, grad in eager_grads.items():
        assert (compiled_grads[f"_orig_mod.{name}"] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_flag_is_saved_and_reloaded(tmp_path):
    model = tiny_model()
    model.set_experts_implementation("fused")
    model.save_pretrained(tmp_path / "fused")
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["experts_implementation"] == "fused"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    assert reloaded.config._experts_implementation == "fused"
    assert reloaded.model.layers[0].mlp.experts.config._experts_implementation == "fused"
    overridden = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", experts_implementation="eager")
    assert overridden.config._experts_implementation == "eager"

    tiny_model().save_pretrained(tmp_path / "default")  # the default choice is not written
    assert "experts_implementation" not in json.loads((tmp_path / "default" / "config.json").read_text())
    chosen = AutoModelForCausalLM.from_pretrained(tmp_path / "default", experts_implementation="fused")
    assert chosen.config._experts_implementation == "fused"
