import pytest
import torch
from conftest import assert_informative, peak_weights_, run_script, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from modeling_grin import MhMoeConfig, MhMoeForCausalLM, MhMoeForSequenceClassification
from modeling_grin.configuration_mh_moe import mh_moe_parity, moe_layer_cost
from modeling_grin.losses import load_balancing_loss
from modeling_grin.modeling_grin_moe import GrinMoeSparseMoeBlock
from modeling_grin.modeling_mh_moe import MhMoeMLP, MhMoeSparseMoeBlock
from modeling_grin.presets import load_preset

TINY = dict(
    vocab_size=64, hidden_size=24, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, moe_heads=3, moe_layer_frequency=1,
    dense_intermediate_size=32, max_position_embeddings=64, pad_token_id=0, eos_token_id=63,
)


def tiny_mh_config(**overrides) -> MhMoeConfig:
    return MhMoeConfig(**{**TINY, **overrides})


def tiny_mh_model(seed=0, **overrides) -> MhMoeForCausalLM:
    torch.manual_seed(seed)
    model = MhMoeForCausalLM(tiny_mh_config(**overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def informative_mh_model(seed=0, **overrides) -> MhMoeForCausalLM:
    """`tiny_mh_model` with conftest's peaked weights, for generation and routing checks."""
    return peak_weights_(MhMoeForCausalLM(tiny_mh_config(**overrides)).eval(), seed)


def inputs(batch=2, length=9, seed=0):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- parity helpers


def test_parity_rule_reproduces_the_papers_configurations():
    h2 = mh_moe_parity(768, 2048, 8, 1, heads=2, top_k=2, experts_multiple_of=8)
    h3 = mh_moe_parity(768, 2048, 8, 1, heads=3, top_k=3, experts_multiple_of=8)
    assert (h2.expert_size, h2.num_experts) == (768, 40) and h2.exact_num_experts == pytest.approx(41.333, abs=1e-3)
    assert (h3.expert_size, h3.num_experts) == (512, 96) and h3.exact_num_experts == pytest.approx(93.0)
    assert h2.flops_ratio == h3.flops_ratio == 1.0
    assert h2.mh_moe.parameters == 36_569_088 and h3.mh_moe.parameters == 38_928_384
    assert mh_moe_parity(768, 2048, 8, 1, heads=2, top_k=2).num_experts == 41  # nearest parameter parity


def test_paper_setups_have_equal_flops_and_parameters_within_3_2_percent():
    smoe = moe_layer_cost(768, 2048, 8, 1)
    setups = {
        "fine-grained": moe_layer_cost(768, 1024, 16, 2),
        "h2": moe_layer_cost(768, 768, 40, 2, heads=2),
        "h3": moe_layer_cost(768, 512, 96, 3, heads=3),
    }
    assert smoe.flops_per_token == 2 * 4_718_592 and smoe.parameters == 37_748_736
    for name, cost in setups.items():
        assert cost.flops_per_token == smoe.flops_per_token, name
        assert abs(cost.parameters / smoe.parameters - 1) <= 0.032, name


def test_presets_match_the_parity_helpers():
    setups = ("smoe", "fine-grained", "h2", "h3")
    costs = {name: load_preset(f"mh-moe-paper-{name}").moe_layer_cost() for name in setups}
    assert len({cost.flops_per_token for cost in costs.values()}) == 1
    assert costs["h2"] == mh_moe_parity(768, 2048, 8, 1, 2, 2, experts_multiple_of=8).mh_moe
    shared = load_preset("mh-moe-paper-h3-shared").moe_layer_cost()
    assert shared.flops_per_token - costs["h3"].flops_per_token == 2 * 3 * 768 * 2048
    dense = load_preset("mh-moe-paper-dense")
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))
    assert [load_preset("mh-moe-paper-h2").is_moe_layer(i) for i in range(4)] == [False, True, False, True]


def test_parity_without_an_integer_solution_raises():
    with pytest.raises(ValueError, match="FLOPs parity"):
        mh_moe_parity(768, 2048, 8, 1, heads=2, top_k=5)


# ----------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(dtype):
    model = tiny_mh_model().to(dtype)
    out = model(inputs(), output_router_logits=True)
    assert out.logits.shape == (2, 9, 64) and out.logits.dtype == dtype
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2 * 9 * 3, 6)  # one row per sub-token


def test_sub_tokens_are_routed_independently_in_token_order():
    model = tiny_mh_model()
    block = model.model.layers[0].mlp
    seen = {}
    block.router.register_forward_hook(lambda module, args, output: seen.update(rows=args[0], indices=output[2]))
    x = torch.randn(2, 5, 24)
    block(x)
    expected_rows = block.head_proj(x).reshape(2 * 5 * 3, 8)  # token t's sub-tokens are rows 3t, 3t+1, 3t+2
    assert torch.equal(seen["rows"], expected_rows)
    per_token = seen["indices"].reshape(10, 3, 2)
    assert (per_token[:, 0] != per_token[:, 1]).any()  # sub-tokens of one token pick different experts


def manual_block(block, x):
    """shared_expert(x) + merge(experts(split(head(x)))), from the block's weights and the formulas alone."""
    linear = torch.nn.functional.linear
    silu = torch.nn.functional.silu
    rows = linear(x, block.head_proj.weight, block.head_proj.bias).reshape(-1, 8)  # 3 sub-tokens of 8 per token
    _, weights, indices = block.router(rows)
    manual = torch.zeros_like(rows)
    for row in range(rows.shape[0]):
        for slot in range(2):
            expert = indices[row, slot]
            gate, up = (block.experts.gate_up_proj[expert] @ rows[row]).chunk(2)
            manual[row] = manual[row] + weights[row, slot] * (block.experts.down_proj[expert] @ (silu(gate) * up))
    merged = linear(manual.reshape(x.shape), block.merge_proj.weight, block.merge_proj.bias)
    if block.shared_expert is None:
        return merged, indices
    shared = block.shared_expert
    hidden = silu(linear(x, shared.gate_proj.weight)) * linear(x, shared.up_proj.weight)
    return merged + linear(hidden, shared.down_proj.weight), indices


@pytest.mark.parametrize("shared", [0, 8])
def test_block_equals_a_manual_sub_token_computation_in_value_and_gradient(shared):
    block = informative_mh_model(shared_expert_intermediate_size=shared).model.layers[0].mlp
    assert (block.shared_expert is not None) == (shared > 0)
    x = torch.randn(2, 4, 24, generator=torch.Generator().manual_seed(0))
    expected, indices = manual_block(block, x)
    assert indices.unique().numel() >= 4  # several experts take part
    expected_grads = torch.autograd.grad(expected.square().sum(), list(block.parameters()))
    output = block(x)
    assert torch.allclose(output, expected, atol=1e-5)
    grads = torch.autograd.grad(output.square().sum(), list(block.parameters()))
    for (name, _), grad, expected_grad in zip(block.named_parameters(), grads, expected_grads, strict=True):
        assert torch.allclose(grad, expected_grad, atol=1e-4, rtol=1e-4), name
    if shared:  # the shared expert reads the block input, not the head layer's output
        head_fed = block.shared_expert(block.head_proj(x))
        assert (head_fed - block.shared_expert(x)).abs().max() > 0.1


def test_head_and_merge_switches_change_the_parameter_set():
    names = {}
    for head, merge in ((True, True), (True, False), (False, True), (False, False)):
        model = MhMoeForCausalLM(tiny_mh_config(use_head_projection=head, use_merge_projection=merge))
        names[head, merge] = {name for name, _ in model.named_parameters()}
        assert sum(p.numel() for p in model.parameters()) == sum(
            p.numel() for p in MhMoeForCausalLM(tiny_mh_config(use_head_projection=False, use_merge_projection=False))
            .parameters()
        ) + 2 * (int(head) + int(merge)) * (24 * 24 + 24)
    assert "model.layers.0.mlp.head_proj.weight" in names[True, False] - names[False, False]
    assert "model.layers.0.mlp.merge_proj.bias" in names[False, True] - names[False, False]
    no_bias = {n for n, _ in MhMoeForCausalLM(tiny_mh_config(head_merge_bias=False)).named_parameters()}
    for projection in ("head_proj", "merge_proj"):
        assert f"model.layers.0.mlp.{projection}.bias" not in no_bias
        assert f"model.layers.0.mlp.{projection}.weight" in no_bias


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_mlp_bias_switches_the_biases_of_dense_layers_and_shared_expert_together(mlp_bias):
    # layer 0 is a dense FFN, layer 1 a MoE layer with a one-unit shared expert (the smallest that exists)
    config = tiny_mh_config(mlp_bias=mlp_bias, moe_layer_frequency=2, shared_expert_intermediate_size=1)
    model = MhMoeForCausalLM(config)
    dense, shared = model.model.layers[0].mlp, model.model.layers[1].mlp.shared_expert
    assert isinstance(dense, MhMoeMLP) and isinstance(shared, MhMoeMLP)
    assert shared.gate_proj.out_features == 1 and dense.gate_proj.out_features == 32
    for mlp in (dense, shared):
        assert [projection.bias is not None for projection in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == (
            [mlp_bias] * 3)


@pytest.mark.parametrize("training", [False, True])
def test_one_head_without_projections_equals_the_grin_block(training):
    config = tiny_mh_config(moe_heads=1, use_head_projection=False, use_merge_projection=False)
    grin_config = tiny_config(hidden_size=24, intermediate_size=16, num_local_experts=6, num_attention_heads=4,
                              router_type=config.router_type, router_renormalize=False, input_jitter_noise=0.0)
    torch.manual_seed(0)
    mh_block, grin_block = MhMoeSparseMoeBlock(config), GrinMoeSparseMoeBlock(grin_config)
    for parameter in grin_block.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    loaded = mh_block.load_state_dict(grin_block.state_dict())
    assert not loaded.missing_keys and not loaded.unexpected_keys
    mh_state = mh_block.state_dict()
    assert mh_state.keys() == grin_block.state_dict().keys()
    assert all(torch.equal(mh_state[name], tensor) for name, tensor in grin_block.state_dict().items())
    mh_block.train(training), grin_block.train(training)
    x = torch.randn(3, 7, 24)
    torch.manual_seed(1)  # the same training-mode samples for both
    mh_output = mh_block(x)
    torch.manual_seed(1)
    assert torch.equal(mh_output, grin_block(x))
    assert mh_output.abs().max() > 0.1


def test_one_head_sparsemixer_block_equals_grin_in_training_with_the_same_samples():
    config = tiny_mh_config(moe_heads=1, use_head_projection=False, use_merge_projection=False,
                            router_type="sparsemixer_v2", router_jitter_noise=0.5)
    grin_config = tiny_config(hidden_size=24, intermediate_size=16, num_local_experts=6, num_attention_heads=4,
                              router_jitter_noise=0.5, input_jitter_noise=0.0)
    mh_block, grin_block = MhMoeSparseMoeBlock(config), GrinMoeSparseMoeBlock(grin_config)
    for parameter in grin_block.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    mh_block.load_state_dict(grin_block.state_dict())
    x = torch.randn(3, 7, 24)
    torch.manual_seed(5)
    first = mh_block.train()(x)
    torch.manual_seed(5)
    assert torch.equal(first, grin_block.train()(x))


def test_gradients_reach_head_merge_router_experts_and_dense_layers():
    model = tiny_mh_model(moe_layer_frequency=2, shared_expert_intermediate_size=8).train()
    assert isinstance(model.model.layers[0].mlp, MhMoeMLP)
    assert isinstance(model.model.layers[1].mlp, MhMoeSparseMoeBlock)
    input_ids = inputs()
    model(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
    block = model.model.layers[1].mlp
    for name, parameter in [
        ("head", block.head_proj.weight), ("merge", block.merge_proj.weight), ("router", block.router.weight),
        ("experts", block.experts.gate_up_proj), ("shared", block.shared_expert.up_proj.weight),
        ("dense", model.model.layers[0].mlp.down_proj.weight),
    ]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_load_balancing_counts_sub_tokens_and_skips_padding():
    model = informative_mh_model()
    input_ids = inputs()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    first = model(input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
    changed = input_ids.masked_fill(attention_mask == 0, 7)
    second = model(changed, attention_mask=attention_mask, output_router_logits=True).aux_loss
    assert torch.allclose(first, second) and first > 0
    # Independently: the loss of the router rows of the non-padding tokens only, 3 sub-token rows per token.
    out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    rows = attention_mask.reshape(-1).bool().repeat_interleave(3)
    assert torch.allclose(first, load_balancing_loss(tuple(r[rows] for r in out.router_logits), 6, 2), atol=1e-6)
    unmasked = model(input_ids, output_router_logits=True)
    assert torch.allclose(unmasked.aux_loss, load_balancing_loss(unmasked.router_logits, 6, 2))
    assert not torch.allclose(unmasked.aux_loss, first)
    dense = tiny_mh_model(moe_layer_frequency=0)
    assert dense(input_ids, output_router_logits=True).aux_loss is None


def test_save_load_round_trip(tmp_path):
    model = tiny_mh_model(shared_expert_intermediate_size=8)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is MhMoeForCausalLM and reloaded.config.moe_heads == 3
    input_ids = inputs()
    assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_cache_generate_gradient_checkpointing_and_experts_implementations():
    model = tiny_mh_model()
    input_ids = inputs(length=12)
    with torch.no_grad():
        full = model(input_ids).logits
        prefix = model(input_ids[:, :8], use_cache=True)
        step = model(input_ids[:, 8:], cache=prefix.cache, use_cache=True)
        assert (torch.cat([prefix.logits, step.logits], 1) - full).abs().max() <= 1e-5
        model.set_experts_implementation("grouped_mm")
        assert (model(input_ids).logits - full).abs().max() <= 1e-5
    model.set_experts_implementation("eager")
    # Training with activation checkpointing: the same loss and gradients as without (the same samples, seeded).
    gradients = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(3)
        model(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() == {name for name, _ in model.named_parameters()}
    assert gradients[0]["model.layers.0.mlp.head_proj.weight"].abs().sum() > 0
    for name, grad in gradients[0].items():
        assert torch.allclose(gradients[1][name], grad, atol=1e-6), name


def test_greedy_generation_with_a_cache_matches_uncached_decoding_and_full_forwards():
    model = informative_mh_model()
    input_ids = inputs(length=8)
    assert_informative(model, input_ids)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids, **settings)
        assert torch.equal(cached, model.generate(input_ids, use_cache=False, **settings))
        sequence = input_ids  # greedy decoding by hand: a full forward per step, no cache
        for _ in range(8):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, sequence)


def test_sequence_classification(tmp_path):
    classifier = AutoModelForSequenceClassification.from_config(tiny_mh_config(num_labels=2)).eval()
    assert type(classifier) is MhMoeForSequenceClassification
    peak_weights_(classifier)
    input_ids = inputs()
    input_ids[1, 6:] = 0  # right padding: the second row is pooled at its last real token, position 5
    labels = torch.tensor([0, 1])
    out = classifier(input_ids, labels=labels)
    with torch.no_grad():
        hidden = classifier.model(input_ids).last_hidden_state
    expected = classifier.score(hidden[torch.arange(2), torch.tensor([8, 5])])
    assert out.logits.shape == (2, 2) and torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(expected, labels), atol=1e-5)
    out.loss.backward()
    assert classifier.score.weight.grad.abs().sum() > 0
    assert classifier.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"moe_heads": 5}, "moe_heads"),
        ({"moe_heads": 0}, "moe_heads"),
        ({"num_experts_per_tok": 7}, "num_experts_per_tok"),
        ({"moe_layer_frequency": -1}, "moe_layer_frequency"),
        ({"norm_type": "batchnorm"}, "norm_type"),
        ({"dense_intermediate_size": 0}, "dense_intermediate_size"),
        ({"shared_expert_intermediate_size": -8}, "shared_expert_intermediate_size"),
    ],
)
def test_invalid_configs_raise(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_mh_config(**overrides)


def test_checkpoint_with_another_sub_token_size_does_not_load_silently(tmp_path):
    tiny_mh_model(moe_heads=3).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch|mismatch"):
        MhMoeForCausalLM.from_pretrained(tmp_path, moe_heads=2)


def test_parity_table_script_prints_every_paper_setup(capsys):
    run_script("benchmarks/mh_moe_parity.py")
    printed = capsys.readouterr().out
    assert ("| mh-moe-paper-h3 | 3 | 96 × 512 | 3 | - | 9,437,184 | +0.0% | 38,928,384 | +3.1% | 24,576 | 147,456 "
            "| +1.43% |") in printed
    # the router: d x E multiply-accumulates per token (h sub-tokens of d/h), twice for FLOPs
    for name, experts in (("smoe", 8), ("h2", 40), ("h3", 96)):
        assert load_preset(f"mh-moe-paper-{name}").moe_layer_cost().router_flops_per_token == 2 * 768 * experts
    assert printed.count("mh-moe-paper-") == 8
