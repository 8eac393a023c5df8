"""BitNet b1.58 (config.bitnet): the quantizers, what is quantized, straight-through gradients, every experts
implementation, training, and the packed ternary export."""

import json

import pytest
import torch
from conftest import assert_informative, peak_weights_, tiny_config
from test_mh_moe import tiny_mh_config
from torch import nn
from transformers import AutoModelForCausalLM

from modeling_grin import GrinMoeForCausalLM, MhMoeForCausalLM
from modeling_grin.bitnet import (
    BitNetLinear,
    PackedTernaryLinear,
    int8_activations,
    pack_ternary,
    quantize_activations,
    ternary_codes,
    ternary_weight,
    unpack_ternary,
)
from modeling_grin.bitnet_export import TERNARY_FILE, export_ternary, load_ternary, pack_model_
from modeling_grin.conversion import ConversionError, convert_checkpoint
from modeling_grin.experts import SwiGLUExperts

FAMILIES = ("grin", "mh")


def bitnet_model(family: str, seed: int = 0, **overrides):
    """A peaked-weight BitNet model; MH-MoE with a dense layer and a shared expert, so every quantized kind is there."""
    if family == "grin":
        config = tiny_config(bitnet=True, **overrides)
        return peak_weights_(GrinMoeForCausalLM(config).eval(), seed)
    config = tiny_mh_config(bitnet=True, moe_layer_frequency=2, shared_expert_intermediate_size=8, **overrides)
    return peak_weights_(MhMoeForCausalLM(config).eval(), seed)


def ids(batch=2, length=9, seed=0):
    return torch.randint(1, 60, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----- the quantizers ------------------------------------------------------------------------------------------------


def _reference_ternary(matrix: list[list[float]]) -> list[list[float]]:
    """b1.58's absmean quantizer written out element by element (Python floats, fp64)."""
    mean = sum(abs(value) for row in matrix for value in row) / sum(len(row) for row in matrix)
    inverse = 1.0 / max(mean, 1e-5)
    return [[max(-1.0, min(1.0, round(value * inverse))) / inverse for value in row] for row in matrix]


def _reference_int8(row: list[float]) -> list[float]:
    scale = 127 / max(max(abs(value) for value in row), 1e-5)
    return [max(-128, min(127, round(value * scale))) / scale for value in row]


def test_quantizers_against_a_hand_written_reference():
    weight = torch.tensor([[0.3, -0.05, 1.2, 0.21], [-0.7, 0.0, 0.15, -0.17]], dtype=torch.float64)
    codes, inverse_scale = ternary_codes(weight)
    assert codes.tolist() == [[1, 0, 1, 1], [-1, 0, 0, 0]]  # mean|W| = 0.3475: 0.21 rounds to 1, 0.15 and -0.17 to 0
    assert inverse_scale.shape == (1, 1) and inverse_scale.item() == pytest.approx(1 / 0.3475, rel=1e-6)
    expected = torch.tensor(_reference_ternary(weight.tolist()))
    torch.testing.assert_close(ternary_weight(weight.float()), expected.float(), rtol=1e-6, atol=0)
    activations = torch.tensor([[0.5, -1.0, 0.25, 0.0039], [3.0, 0.0, -2.0, 1.0]])
    expected_rows = torch.tensor([_reference_int8(row) for row in activations.tolist()])
    torch.testing.assert_close(int8_activations(activations), expected_rows, rtol=1e-6, atol=0)
    assert int8_activations(activations)[0, 3] == pytest.approx(0.0 / 127)  # 0.0039 * 127 = 0.5 rounds to even 0
    batched = torch.stack([activations, activations.flip(0) * 2])  # [batch, tokens, features]: per token still
    torch.testing.assert_close(int8_activations(batched)[1], expected_rows.flip(0) * 2, rtol=1e-6, atol=0)
    # an all-zero matrix and an all-zero row (padding, empty sub-tokens) quantize to zeros, not NaN
    assert ternary_weight(torch.zeros(3, 4)).eq(0).all() and int8_activations(torch.zeros(2, 5)).eq(0).all()


def test_experts_get_a_scale_per_expert_and_per_matrix():
    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(3, 8, 5, generator=generator)
    gate_up[1] *= 1e-3  # a small-norm expert: one mean over all experts would round it to zeros
    gate_up[2, :4] *= 10  # a large gate half: its up half must keep its own scale
    codes, inverse_scale = ternary_codes(gate_up, groups=2)
    assert inverse_scale.shape == (3, 2)
    for expert in range(3):
        for half in (slice(0, 4), slice(4, 8)):
            alone, alone_scale = ternary_codes(gate_up[expert, half])
            assert torch.equal(codes[expert, half], alone)
            assert alone_scale.item() in inverse_scale[expert].tolist()
    assert codes[1].abs().sum() > 0 and codes[2, 4:].abs().sum() > 0
    one_scale = ternary_codes(gate_up.reshape(24, 5))[0].view(3, 8, 5)  # one mean|W| for the whole tensor
    assert one_scale[1].abs().sum() == 0


def test_quantizers_equal_transformers_bitnet_ones():
    """transformers' ActQuant (torch.compile'd) gives the same bits; its WeightQuant the same codes, with a scale that
    differs in its last bit (inductor sums mean|W| in another order)."""
    from transformers.integrations.bitnet import ActQuant, WeightQuant

    generator = torch.Generator().manual_seed(0)
    weight, activations = torch.randn(48, 40, generator=generator), torch.randn(7, 40, generator=generator) * 3
    ours, theirs = ternary_weight(weight), WeightQuant.apply(weight)
    assert torch.equal(ours.sign(), theirs.sign())  # the same codes
    torch.testing.assert_close(ours, theirs, rtol=2.4e-7, atol=0)  # one float32 ulp of the scale
    assert torch.equal(int8_activations(activations), ActQuant.apply(activations))


def test_packing_round_trips_and_uses_two_bits_per_weight():
    codes = torch.randint(-1, 2, (3, 10, 7), generator=torch.Generator().manual_seed(0)).float()
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 3, 7)  # ceil(10 / 4) rows of bytes per expert
    assert torch.equal(unpack_ternary(packed, 10), codes)
    from transformers.integrations.bitnet import unpack_weights  # the layout is transformers' (dim 0 per expert)

    assert torch.equal(unpack_ternary(packed[1], 10), unpack_weights(packed[1], torch.float32)[:10])
    assert torch.equal(codes, torch.randint(-1, 2, (3, 10, 7), generator=torch.Generator().manual_seed(0)).float())


# ----- the models ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_what_bitnet_quantizes(family):
    """Attention projections, dense FFNs (MH-MoE's dense layers, its shared expert) and the experts; not embeddings,
    norms, routers, lm_head, or MH-MoE's head and merge layers. The state-dict keys are the full-precision model's."""
    model = bitnet_model(family)
    quantized = {name for name, module in model.named_modules() if isinstance(module, BitNetLinear)}
    expected = {f"model.layers.{layer}.self_attn.{projection}" for layer in (0, 1) for projection in "qkvo"}
    expected = {name.replace(".q", ".q_proj").replace(".k", ".k_proj").replace(".v", ".v_proj")
                .replace(".o", ".o_proj") for name in expected}
    if family == "mh":
        expected |= {f"model.layers.0.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")}
        expected |= {f"model.layers.1.mlp.shared_expert.{name}" for name in ("gate_proj", "up_proj", "down_proj")}
    assert quantized == expected
    experts = [module for module in model.modules() if isinstance(module, SwiGLUExperts)]
    assert experts and all(module.bitnet for module in experts)
    plain = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    assert "lm_head" in plain and all("router" in name or name == "lm_head" for name in plain)
    if family == "mh":  # head and merge layers are their own nn.Linear subclasses, not BitNetLinear
        assert not isinstance(model.model.layers[1].mlp.head_proj, BitNetLinear)
        assert not isinstance(model.model.layers[1].mlp.merge_proj, BitNetLinear)
    full_precision = type(model)(model.config.__class__(**{**model.config.to_dict(), "bitnet": False}))
    assert set(model.state_dict()) == set(full_precision.state_dict())
    assert not any(isinstance(module, BitNetLinear) for module in full_precision.modules())
    assert not any(getattr(module, "bitnet", False) for module in full_precision.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_constant_within_a_quantization_cell(family):
    """Flipping the sign of every latent weight whose code is 0 keeps every mean|W| and every code: the eval logits
    stay the same bits (the full-precision model's change). Moving such weights to a full step changes them."""
    model = bitnet_model(family)
    input_ids = ids()
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        zero_coded = {}
        for module in model.modules():
            if isinstance(module, BitNetLinear):
                zero_coded[module.weight] = ternary_codes(module.weight)[0] == 0
            elif isinstance(module, SwiGLUExperts):
                zero_coded[module.gate_up_proj] = ternary_codes(module.gate_up_proj, 2)[0] == 0
                zero_coded[module.down_proj] = ternary_codes(module.down_proj)[0] == 0
        assert all(mask.any() and not mask.all() for mask in zero_coded.values())
        for weight, mask in zero_coded.items():
            weight[mask] = -weight[mask]
        assert torch.equal(model(input_ids=input_ids).logits, before)

        model.config.bitnet = False
        for module in model.modules():
            if isinstance(module, SwiGLUExperts):
                module.bitnet = False
        unquantized = model(input_ids=input_ids).logits  # the same weights as plain linear layers: not BitNetLinear's
        model.config.bitnet = True
        for module in model.modules():
            if isinstance(module, SwiGLUExperts):
                module.bitnet = True
        assert not torch.allclose(unquantized, before, atol=1e-3)

        for weight, mask in zero_coded.items():  # a step: the first zero-coded weight of each matrix becomes +-mean|W|
            first = mask.flatten().nonzero()[0]
            weight.view(-1)[first] = 3 * weight.abs().mean()
        assert (model(input_ids=input_ids).logits - before).abs().max() > 1e-3


def test_bitnet_linear_gradient_is_straight_through():
    torch.manual_seed(0)
    layer = BitNetLinear(6, 5, bias=True)
    inputs = torch.randn(4, 6, requires_grad=True)
    grad_output = torch.randn(4, 5)
    output = layer(inputs)
    output.backward(grad_output)
    ternary = ternary_weight(layer.weight.detach())
    torch.testing.assert_close(output, int8_activations(inputs.detach()) @ ternary.t() + layer.bias, rtol=1e-6,
                               atol=1e-6)
    # the latent weight gets d loss / d (ternary weight); the input d loss / d (int8 input)
    torch.testing.assert_close(layer.weight.grad, grad_output.t() @ int8_activations(inputs.detach()))
    torch.testing.assert_close(inputs.grad, grad_output @ ternary)
    weight = torch.randn(2, 6, 4, requires_grad=True)
    (ternary_weight(weight, 2) * 3).sum().backward()
    assert torch.equal(weight.grad, torch.full_like(weight, 3.0))
    activations = torch.randn(3, 4, requires_grad=True)
    (quantize_activations(activations) * 2).sum().backward()
    assert torch.equal(activations.grad, torch.full_like(activations, 2.0))


def _training_logits_and_grads(model, implementation: str, input_ids):
    model.train()
    model.set_experts_implementation(implementation)
    model.zero_grad()
    torch.manual_seed(1)  # the same routing noise for every implementation
    # with the load-balancing loss: SparseMixer's own router gradient vanishes where these peaked logits mask all
    # but one candidate
    output = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    output.loss.backward()
    model.eval()
    return output.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_experts_implementation_computes_the_same_bitnet_model(family):
    """fused and grouped_mm (our CPU paths) equal eager in fp32, logits and every gradient, each one reaching its latent
    weight. batched_mm rounds its batched GEMMs differently, and an int8 boundary turns a last-bit difference into a
    quantization step, so it is compared in fp64, where that does not happen."""
    input_ids = ids()
    model = bitnet_model(family)
    eager_logits, eager_grads = _training_logits_and_grads(model, "eager", input_ids)
    assert all(grad.abs().max() > 0 for grad in eager_grads.values())  # every parameter learns, the latent ones too
    for implementation in ("grouped_mm", "fused"):
        logits, grads = _training_logits_and_grads(model, implementation, input_ids)
        assert (logits - eager_logits).abs().max() <= 1e-5, implementation
        for name, grad in eager_grads.items():
            assert (grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), (implementation, name)
    model.double()
    eager_logits, eager_grads = _training_logits_and_grads(model, "eager", input_ids)
    logits, grads = _training_logits_and_grads(model, "batched_mm", input_ids)
    assert (logits - eager_logits).abs().max() <= 1e-9
    for name, grad in eager_grads.items():
        assert (grads[name] - grad).abs().max() <= 1e-9 * grad.abs().max(), name


def test_bitnet_training_lowers_the_loss_on_the_embedded_corpus(tmp_path):
    from modeling_grin.training.loop import train

    config = tiny_mh_config(bitnet=True, moe_layer_frequency=2, vocab_size=512, max_position_embeddings=64)
    result = train(tmp_path, config=config, vocab_size=512, steps=30, batch_size=4, block_size=32,
                   learning_rate=3e-3, eval_fraction=0.01, progress=False)  # a small held-out set: it is not checked
    losses = json.loads((tmp_path / "train_summary.json").read_text())["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses  # measured: 6.27 -> 6.11
    assert result.accelerator.unwrap_model(result.model).config.bitnet is True
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # latent weights, the usual way
    assert reloaded.config.bitnet and isinstance(reloaded.model.layers[0].self_attn.q_proj, BitNetLinear)


# ----- the packed export ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_export_reloads_with_the_same_logits_and_tokens(family, tmp_path):
    model = bitnet_model(family)
    input_ids = ids(batch=1, length=6, seed=3)
    assert_informative(model, input_ids)
    model.save_pretrained(tmp_path / "latent")
    summary = export_ternary(model, tmp_path / "packed")
    packed = load_ternary(tmp_path / "packed")
    assert not any(isinstance(module, BitNetLinear) for module in packed.modules())
    assert any(isinstance(module, PackedTernaryLinear) for module in packed.modules())
    experts = [module for module in packed.modules() if isinstance(module, SwiGLUExperts)]
    assert all("gate_up_proj" not in dict(module.named_parameters()) for module in experts)  # codes only
    assert all(module.gate_up_proj_codes.dtype == torch.uint8 for module in experts)
    for implementation in ("eager", "grouped_mm", "fused"):
        model.set_experts_implementation(implementation)
        packed.set_experts_implementation(implementation)
        with torch.no_grad():
            assert torch.equal(packed(input_ids=ids()).logits, model(input_ids=ids()).logits), implementation
    tokens = model.generate(input_ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(packed.generate(input_ids, max_new_tokens=10, do_sample=False), tokens)
    # 2 bits per ternary weight: the packed codes are 1/16 of their fp32 latent weights
    latent_bytes = (tmp_path / "latent" / "model.safetensors").stat().st_size
    full_precision_bytes = 4 * summary["full_precision_values"]
    assert summary["file_bytes"] < full_precision_bytes + summary["ternary_values"] / 4 + 64 * 1024
    assert summary["file_bytes"] < latent_bytes


def test_packed_linear_layers_keep_their_shape_and_dtype():
    """Output sizes that are not a multiple of 4 (the packing pads the rows), and packing a bf16 model in place: the
    same bits as its latent BitNet forward."""
    torch.manual_seed(0)
    layer = BitNetLinear(6, 5, bias=True)
    inputs = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(PackedTernaryLinear.from_bitnet(layer)(inputs), layer(inputs))
    from modeling_grin.bitnet_export import pack_model_

    model = bitnet_model("grin").to(torch.bfloat16)  # (GRIN's attention has biases)
    packed = bitnet_model("grin").to(torch.bfloat16)
    packed.load_state_dict(model.state_dict())
    pack_model_(packed)
    assert packed.model.layers[0].self_attn.q_proj.weight_codes.dtype == torch.uint8
    assert all(parameter.dtype == torch.bfloat16 for parameter in packed.parameters())  # biases included
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
        assert expected.dtype == torch.bfloat16 and torch.equal(packed(input_ids=ids()).logits, expected)


def test_export_refuses_what_it_cannot_write_and_leaves_nothing(tmp_path):
    model = bitnet_model("grin")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_ternary(model, occupied)
    assert [path.name for path in occupied.iterdir()] == ["notes.txt"]
    plain = GrinMoeForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="bitnet=True"):
        export_ternary(plain, tmp_path / "plain")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["occupied"]  # no temporary folder left
    with pytest.raises(FileNotFoundError, match=TERNARY_FILE):
        load_ternary(occupied)


def test_bitnet_is_a_checked_config_field_and_phimoe_cannot_take_it(tmp_path):
    with pytest.raises(Exception, match="bitnet"):
        tiny_config(bitnet="yes")
    model = bitnet_model("grin")
    model.save_pretrained(tmp_path / "source")
    with pytest.raises(ConversionError, match="bitnet"):
        convert_checkpoint(tmp_path / "source", tmp_path / "phimoe", to="phimoe")
    assert not (tmp_path / "phimoe").exists()


def test_export_ternary_command(tmp_path, capsys):
    from modeling_grin.cli import main

    model = bitnet_model("mh")
    model.save_pretrained(tmp_path / "model")
    assert main(["export-ternary", str(tmp_path / "model"), str(tmp_path / "packed")]) == 0
    assert "ternary weights in 2 bits" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(load_ternary(tmp_path / "packed")(input_ids=ids()).logits, model(input_ids=ids()).logits)
    assert main(["export-ternary", str(tmp_path / "model"), str(tmp_path / "packed")]) == 2  # not empty: refused
    assert "not an empty folder" in capsys.readouterr().err


def test_export_benchmark_reports_sizes_and_speeds():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bitnet_export.py"
    spec = importlib.util.spec_from_file_location("bitnet_export_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--model-shape", "tiny", "--rounds", "1", "--new-tokens", "4"])
    rows = {row["contestant"]: row for row in result["rows"]}
    assert list(rows) == ["fp32", "bf16", "bitnet latent", "bitnet packed"]
    assert rows["bf16"]["file_bytes"] < rows["fp32"]["file_bytes"] == pytest.approx(rows["bitnet latent"]["file_bytes"],
                                                                                      rel=0.01)
    assert rows["bitnet packed"]["in_memory_bytes"] < rows["bitnet latent"]["in_memory_bytes"]
    assert rows["fp32"]["decode_speed_vs_fp32"] == 1.0
    for name, row in rows.items():
        assert row["decode_speed_vs_fp32"] == pytest.approx(result["times"]["fp32"][0] / result["times"][name][0])


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm", "fused"])
def test_packed_experts_decode_from_the_experts_they_hit(implementation):
    """A decoded token (few routed pairs) unpacks only its experts, renumbered; an expert-parallel sentinel (id >= E)
    still contributes zero. The same bits as the latent experts, and as the packed ones over more tokens."""
    model = bitnet_model("grin")
    model.set_experts_implementation(implementation)
    latent = model.model.layers[0].mlp.experts
    packed = bitnet_model("grin")
    packed.load_state_dict(model.state_dict())
    packed.set_experts_implementation(implementation)
    packed = packed.model.layers[0].mlp.experts
    packed.pack_ternary_()
    hidden = torch.randn(1, latent.hidden_dim, generator=torch.Generator().manual_seed(0))
    cases = [[[3, 1]]]
    if implementation != "batched_mm":  # (transformers' batched_mm reads sentinels only under expert parallelism)
        cases.append([[2, latent.num_experts]])  # a sentinel in slot 2
    for index in cases:
        index, weights = torch.tensor(index), torch.tensor([[0.7, 0.4]])
        with torch.no_grad():
            expected = latent(hidden, index.clamp(max=latent.num_experts - 1), weights * (index < 4))
            assert torch.equal(packed(hidden, index, weights), expected), index
    many = torch.randn(6, latent.hidden_dim, generator=torch.Generator().manual_seed(1))
    index, weights = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]]), torch.rand(6, 2)
    with torch.no_grad():
        assert torch.equal(packed(many, index, weights), latent(many, index, weights))


def test_lora_on_a_bitnet_model_adapts_the_attention_and_refuses_the_experts():
    from peft import get_peft_model

    from modeling_grin.training import lora_config

    model = get_peft_model(bitnet_model("grin"), lora_config(bitnet_model("grin"), r=4, experts=False))
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    lora = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all(grad is not None for grad in lora.values())
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, BitNetLinear)
    with_experts = get_peft_model(bitnet_model("grin"), lora_config(bitnet_model("grin"), r=4))
    with pytest.raises(ValueError, match=r"^bitnet=True experts cannot be parametrized \(PEFT LoRA on the experts, "
                                         r"target_parameters\): adapt the attention only, "
                                         r"lora_config\(model, experts=False\)$"):
        with_experts(input_ids=ids())


def test_only_bitnet_experts_have_a_packed_state():
    from modeling_grin.modeling_grin_moe import GrinMoeExperts

    experts = GrinMoeExperts(tiny_config())
    with pytest.raises(ValueError, match=r"^only BitNet experts \(config.bitnet=True\) have ternary weights to pack$"):
        experts.packed_state()


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "fused"])
def test_packed_experts_whose_rows_are_not_a_multiple_of_four(implementation):
    """Four codes per byte: the gate/up rows (2 x 5) and the down rows (sub-tokens of 6) end in a part-filled byte
    whose padding slots must be cut after unpacking, over many tokens and for one decoded token."""
    model = bitnet_model("mh", moe_heads=4, intermediate_size=5)
    experts = next(module for module in model.modules() if isinstance(module, SwiGLUExperts))
    assert (2 * experts.intermediate_dim % 4, experts.hidden_dim % 4) == (2, 2)
    model.set_experts_implementation(implementation)
    latent_logits = [model(ids(length=length)).logits for length in (9, 1)]
    pack_model_(model)
    assert experts.gate_up_proj_codes.shape[-2:] == (3, 6)
    for length, expected in zip((9, 1), latent_logits, strict=True):
        torch.testing.assert_close(model(ids(length=length)).logits, expected, rtol=0, atol=1e-6)
