"""Options that reproduce the released code exactly: the official MH-MoE training (GShard loss per layer on the top-1
assignment, tied embeddings, eps, initialisation) and GRIN's routing in the logits' dtype."""

import math

import pytest
import torch
from conftest import tiny_config
from test_mh_moe import tiny_mh_config, tiny_mh_model
from test_sparsemixer import QueuedNoise, logits_with_ties, routed_loss_and_grad
from transformers.models.phimoe import modeling_phimoe

from modeling_grin import GrinMoeConfig, MhMoeConfig, MhMoeForCausalLM
from modeling_grin.losses import gshard_load_balancing_loss, load_balancing_loss
from modeling_grin.presets import list_presets, load_preset
from modeling_grin.sparsemixer import sparsemixer_v2

# ----- the official MH-MoE balancing loss ----------------------------------------------------------------------------


def gshard_from_the_formula(layers, num_experts, row_mask=None):
    """tutel's gshard_loss written out row by row: per layer me = mean softmax, ce = mean one-hot of the top-1 expert,
    E * sum_i me_i ce_i (= mean(me * ce) * E * E as tutel writes it); the layers' losses summed."""
    total = 0.0
    for logits in layers:
        rows = [r for r in range(logits.shape[0]) if row_mask is None or row_mask[r]]
        me = [0.0] * num_experts
        ce = [0.0] * num_experts
        for r in rows:
            probabilities = [math.exp(v) for v in logits[r].tolist()]
            norm = sum(probabilities)
            for i in range(num_experts):
                me[i] += probabilities[i] / norm / len(rows)
            ce[max(range(num_experts), key=lambda i: logits[r, i].item())] += 1 / len(rows)
        total += num_experts * sum(m * c for m, c in zip(me, ce, strict=True))
    return total


def collapsed_layers(num_experts=8, rows=64, seed=0):
    """Two layers collapsed onto different experts (0 and 3), with some noise."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for favourite in (0, 3):
        logits = torch.randn(rows, num_experts, generator=generator)
        logits[:, favourite] += 4.0
        layers.append(logits)
    return layers


def test_gshard_loss_is_the_official_formula_per_layer_summed():
    layers = collapsed_layers()
    value = gshard_load_balancing_loss(tuple(layers), 8)
    assert value.item() == pytest.approx(gshard_from_the_formula(layers, 8), rel=1e-5)
    # each collapsed layer alone costs about E (its top-1 fraction and mean probability both near one expert)
    assert value.item() > 1.5 * 8 * 0.8
    # the pooled Switch loss sees two layers' loads averaged: it calls the pair much better balanced than it is
    pooled = load_balancing_loss(tuple(layers), 8, top_k=1)
    assert value.item() > 3 * pooled.item()
    # balanced routing: about one per layer
    uniform = (torch.zeros(64, 8), torch.zeros(64, 8))
    assert gshard_load_balancing_loss(uniform, 8).item() == pytest.approx(2.0, rel=1e-6)


def test_gshard_loss_uses_the_top1_assignment_and_leaves_out_padding():
    layers = collapsed_layers(rows=12, seed=1)
    mask = torch.tensor([[1] * 5 + [0], [0, 0] + [1] * 4])  # 12 tokens as [batch 2, seq 6]
    row_mask = mask.reshape(-1).bool().tolist()
    value = gshard_load_balancing_loss(tuple(layers), 8, attention_mask=mask)
    assert value.item() == pytest.approx(gshard_from_the_formula(layers, 8, row_mask), rel=1e-5)
    assert value.item() != pytest.approx(gshard_load_balancing_loss(tuple(layers), 8).item(), rel=1e-3)
    # MH-MoE: one mask value per token, repeated for its h sub-token rows
    sub_token_layers = [layer.repeat_interleave(2, dim=0) for layer in layers]
    expanded = [m for m in row_mask for _ in range(2)]
    value = gshard_load_balancing_loss(tuple(sub_token_layers), 8, attention_mask=mask)
    assert value.item() == pytest.approx(gshard_from_the_formula(sub_token_layers, 8, expanded), rel=1e-5)


def test_gshard_loss_of_a_single_real_token_and_of_padding_only():
    """One real token: its own probabilities times its one-hot, E * p(top-1); a layer of padding only adds nothing."""
    layers = collapsed_layers(rows=6, seed=2)
    one_real = torch.tensor([[0, 0, 1], [0, 0, 0]])
    value = gshard_load_balancing_loss(tuple(layers), 8, attention_mask=one_real)
    assert value.item() == pytest.approx(gshard_from_the_formula(layers, 8, [0, 0, 1, 0, 0, 0]), rel=1e-5)
    assert value.item() == pytest.approx(sum(8 * layer[2].softmax(-1).max().item() for layer in layers), rel=1e-5)
    assert gshard_load_balancing_loss(tuple(layers), 8, attention_mask=torch.zeros(2, 3)).item() == 0.0


def test_gshard_gradient_flows_through_the_mean_probability_only():
    logits = collapsed_layers()[0].requires_grad_(True)
    gshard_load_balancing_loss((logits,), 8).backward()
    probs = logits.detach().softmax(-1)
    ce = torch.bincount(probs.argmax(-1), minlength=8).float() / 64
    # d/dz of E * sum_i ce_i * mean_r p_ri, with ce constant: (E / R) * p_r * (ce - <p_r, ce>)
    expected = 8 / 64 * probs * (ce - (probs * ce).sum(-1, keepdim=True))
    assert torch.allclose(logits.grad, expected, atol=1e-7)


def test_the_model_adds_the_configured_balancing_loss():
    model = tiny_mh_model(aux_loss_type="gshard", router_aux_loss_coef=0.01)  # weights peaked enough to imbalance
    input_ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with_aux = model(input_ids, labels=input_ids, output_router_logits=True)
    expected = gshard_load_balancing_loss(with_aux.router_logits, model.config.num_local_experts)
    assert with_aux.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    lm_only = model(input_ids, labels=input_ids).loss
    assert (with_aux.loss - lm_only).item() == pytest.approx(0.01 * expected.item(), rel=1e-4)
    model.config.aux_loss_type = "switch"
    switch = model(input_ids, labels=input_ids, output_router_logits=True).aux_loss
    assert switch.item() != pytest.approx(expected.item(), rel=1e-2)


@pytest.mark.parametrize("overrides, field", [
    (dict(aux_loss_type="GShard"), "aux_loss_type"),
    (dict(aux_loss_type="gshard", load_balancing="global"), "load_balancing"),
    (dict(router_precision="bf16"), "router_precision"),
])
def test_invalid_fidelity_options_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GrinMoeConfig(**overrides)


def test_invalid_init_style_names_the_field():
    with pytest.raises(ValueError, match="init_style"):
        MhMoeConfig(init_style="kaiming")


# ----- the paper presets train as the official code does ------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name in list_presets() if name.startswith("mh-moe-paper")])
def test_paper_presets_follow_the_official_training(name):
    config = load_preset(name)
    assert (config.aux_loss_type, config.tie_word_embeddings, config.rms_norm_eps, config.init_style) == (
        "gshard", True, 1e-5, "official")


def test_tied_embeddings_share_one_matrix():
    model = MhMoeForCausalLM(tiny_mh_config(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = MhMoeForCausalLM(tiny_mh_config())
    tied_count = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in untied.parameters()) - tied_count == untied.lm_head.weight.numel()


def test_official_initialisation_is_the_linear_default_of_the_released_code():
    torch.manual_seed(0)
    config = tiny_mh_config(hidden_size=64, moe_heads=2, intermediate_size=96, num_local_experts=6,
                            init_style="official")
    model = MhMoeForCausalLM(config)
    block = next(m for m in model.modules() if hasattr(m, "head_proj"))
    sub_token = config.sub_token_size
    for tensor, fan_in in ((block.router.weight, sub_token), (block.experts.gate_up_proj, sub_token),
                           (block.experts.down_proj, config.intermediate_size), (block.head_proj.bias, 64)):
        bound = 1 / math.sqrt(fan_in)
        assert tensor.abs().max() <= bound
        assert tensor.abs().max() > 0.9 * bound  # uniform over the whole range, not normal(0, 0.02)
        assert tensor.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    assert (block.merge_proj.bias == 0).all()
    assert_xavier_head_and_merge(block, 64)
    torch.manual_seed(0)
    normal = MhMoeForCausalLM(tiny_mh_config(hidden_size=64, moe_heads=2, intermediate_size=96, num_local_experts=6))
    block = next(m for m in normal.modules() if hasattr(m, "head_proj"))
    assert (block.head_proj.bias == 0).all() and (block.merge_proj.bias == 0).all()
    assert block.router.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert_xavier_head_and_merge(block, 64)


def assert_xavier_head_and_merge(block, hidden):
    """Both styles: Xavier-uniform head (gain 1/sqrt(2)) and merge layers, bound gain * sqrt(6 / (2 d)). (Before
    the projections had classes of their own, transformers' per-module init gave them normal(0, 0.02).)"""
    for projection, gain in ((block.head_proj, 1 / math.sqrt(2)), (block.merge_proj, 1.0)):
        bound = gain * math.sqrt(6 / (2 * hidden))
        assert 0.95 * bound < projection.weight.abs().max() <= bound
        assert projection.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


# ----- routing precision ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_precision_is_bit_exact_with_transformers_sparsemixer_in_eval(dtype):
    logits = (100 + logits_with_ties(tokens=2000)).to(dtype)
    reference_weights, reference_indices = modeling_phimoe.sparsemixer(logits, 0.01, training=False)
    weights, indices = sparsemixer_v2(logits, 2, 0.01, training=False, precision="logits")
    assert torch.equal(indices, reference_indices)
    assert torch.equal(weights, reference_weights)


def test_float32_precision_differs_from_the_released_code_on_bf16_boundary_rows():
    """Why the option exists: in bf16 the released code's mask keeps a second candidate fp32 drops (or back)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200_000, 16, generator=generator).bfloat16()  # 16 rows of 200,000 differ
    reference = modeling_phimoe.sparsemixer(logits, 0.01, training=False)[0]
    ours = sparsemixer_v2(logits, 2, 0.01, training=False)[0]
    differing = (ours != reference).any(-1).sum().item()
    assert 0 < differing < 1e-3 * logits.shape[0]


def test_logits_precision_is_bit_exact_with_transformers_sparsemixer_in_bf16_training(monkeypatch):
    logits = (100 + logits_with_ties(tokens=256, seed=3)).bfloat16()
    noise = QueuedNoise(*logits.shape, top_k=2, seed=3)
    noise.exponential = [sample.bfloat16() for sample in noise.exponential]
    noise.uniform = [sample.bfloat16() for sample in noise.uniform]
    upstream = torch.randn(logits.shape[0], 2, generator=torch.Generator().manual_seed(3)).bfloat16()
    with monkeypatch.context() as patch:
        noise.patch_reference(patch)
        weights, indices, grad = routed_loss_and_grad(
            lambda z: modeling_phimoe.sparsemixer(z, 0.01, training=True), logits, upstream)
    with monkeypatch.context() as patch:
        noise.patch_ours(patch)
        ours_weights, ours_indices, ours_grad = routed_loss_and_grad(
            lambda z: sparsemixer_v2(z, 2, 0.01, training=True, precision="logits"), logits, upstream)
    assert torch.equal(ours_indices, indices)
    assert torch.equal(ours_weights, weights)
    assert torch.equal(ours_grad, grad)
    assert (ours_indices[:, 0] != logits.float().argmax(-1)).any()  # sampled, not only argmax


def test_model_routes_in_the_configured_precision():
    from modeling_grin import GrinMoeForCausalLM

    torch.manual_seed(0)
    model = GrinMoeForCausalLM(tiny_config(router_precision="logits")).to(torch.bfloat16).eval()
    router = model.model.layers[0].mlp.router
    hidden = (2 + 0.5 * torch.randn(4000, model.config.hidden_size)).bfloat16()
    logits, weights, indices = router(hidden)
    reference = modeling_phimoe.sparsemixer(logits, model.config.router_jitter_noise, training=False)
    assert torch.equal(weights, reference[0]) and torch.equal(indices, reference[1])
