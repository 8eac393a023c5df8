import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from modeling_grin import MhMoeConfig, MhMoeForCausalLM, MhMoeForSequenceClassification
from modeling_grin.configuration_mh_moe import mh_moe_parity, moe_layer_cost
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


def test_block_equals_a_manual_sub_token_computation():
    block = tiny_mh_model().model.layers[0].mlp
    x = torch.randn(2, 4, 24)
    rows = block.head_proj(x).reshape(-1, 8)
    _, weights, indices = block.router(rows)
    manual = torch.zeros_like(rows)
    for row in range(rows.shape[0]):
        for slot in range(2):
            expert = indices[row, slot]
            gate, up = (block.experts.gate_up_proj[expert] @ rows[row]).chunk(2)
            expert_output = block.experts.down_proj[expert] @ (torch.nn.functional.silu(gate) * up)
            manual[row] += weights[row, slot] * expert_output
    expected = block.merge_proj(manual.reshape(2, 4, 24))
    assert torch.allclose(block(x), expected, atol=1e-5)


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
    assert "model.layers.0.mlp.head_proj.bias" not in no_bias and "model.layers.0.mlp.head_proj.weight" in no_bias


@pytest.mark.parametrize("training", [False, True])
def test_one_head_without_projections_equals_the_grin_block(training):
    config = tiny_mh_config(moe_heads=1, use_head_projection=False, use_merge_projection=False)
    grin_config = tiny_config(hidden_size=24, intermediate_size=16, num_local_experts=6, num_attention_heads=4,
                              router_type=config.router_type, router_renormalize=False, input_jitter_noise=0.0)
    torch.manual_seed(0)
    mh_block, grin_block = MhMoeSparseMoeBlock(config), GrinMoeSparseMoeBlock(grin_config)
    for parameter in grin_block.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    assert mh_block.load_state_dict(grin_block.state_dict()) is not None
    mh_block.train(training), grin_block.train(training)
    x = torch.randn(3, 7, 24)
    assert torch.equal(mh_block(x), grin_block(x))


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
    model = tiny_mh_model()
    input_ids = inputs()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    first = model(input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
    changed = input_ids.masked_fill(attention_mask == 0, 7)
    second = model(changed, attention_mask=attention_mask, output_router_logits=True).aux_loss
    assert torch.allclose(first, second) and first > 0
    assert model(input_ids, output_router_logits=True).aux_loss is not None
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
        generated = model.generate(input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert generated.shape == (2, 17)
        model.set_experts_implementation("grouped_mm")
        assert (model(input_ids).logits - full).abs().max() <= 1e-5
    model.set_experts_implementation("eager")
    model.train().activation_checkpointing_enable()
    model(input_ids, labels=input_ids).loss.backward()
    assert model.model.layers[0].mlp.head_proj.weight.grad is not None


def test_sequence_classification(tmp_path):
    classifier = AutoModelForSequenceClassification.from_config(tiny_mh_config(num_labels=2))
    assert type(classifier) is MhMoeForSequenceClassification
    assert classifier(inputs(), labels=torch.tensor([0, 1])).loss.requires_grad


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


def test_parity_table_script_prints_every_paper_setup():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "mh_moe_parity.py"
    printed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert "| mh-moe-paper-h3 | 3 | 96 × 512 | 3 | - | 9,437,184 | +0.0% | 38,928,384 | +3.1% |" in printed
    assert printed.count("mh-moe-paper-") == 8
