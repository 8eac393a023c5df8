"""Every config that validates runs on every experts implementation, equal to eager (forward and all gradients).

torch's grouped GEMM (transformers' `grouped_mm`) needs 16-byte-aligned rows; our default takes any shape (on the CPU
the sorted rows of `fused_experts.py`, elsewhere the eager loop where grouped GEMM cannot take it).
"""

import pytest
import torch
from conftest import peak_weights_, tiny_config
from test_mh_moe import tiny_mh_config

from modeling_grin import GrinMoeForCausalLM, MhMoeForCausalLM
from modeling_grin.experts import grouped_mm_takes_shape

IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "fused")
ODD_SHAPES = {  # none of them a multiple of 4 elements somewhere: grouped GEMM cannot take them in fp32
    "grin, expert size 47": lambda: GrinMoeForCausalLM(tiny_config(intermediate_size=47)),
    "grin, expert size 50": lambda: GrinMoeForCausalLM(tiny_config(intermediate_size=50)),
    "grin, hidden size 30": lambda: GrinMoeForCausalLM(tiny_config(hidden_size=30, num_attention_heads=3,
                                                                   num_key_value_heads=1)),
    "mh-moe, sub-tokens of 2": lambda: MhMoeForCausalLM(tiny_mh_config(hidden_size=16, moe_heads=8)),
    "mh-moe, sub-tokens of 1": lambda: MhMoeForCausalLM(tiny_mh_config(hidden_size=16, moe_heads=16)),
}


def loss_and_gradients(model, implementation, input_ids):
    model.set_experts_implementation(implementation)
    model.zero_grad()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_unaligned_shapes_run_on_every_implementation_like_eager(shape):
    torch.manual_seed(0)
    model = peak_weights_(ODD_SHAPES[shape]().eval())
    experts = next(module for name, module in model.named_modules() if name.endswith("mlp.experts"))
    assert not grouped_mm_takes_shape(experts, torch.float32)
    input_ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    reference_loss, reference_gradients = loss_and_gradients(model, "eager", input_ids)
    for implementation in IMPLEMENTATIONS:
        loss, gradients = loss_and_gradients(model, implementation, input_ids)
        assert (loss - reference_loss).abs() <= 1e-5, implementation
        for name, gradient in gradients.items():
            scale = reference_gradients[name].abs().max().clamp(min=1e-6)
            assert (gradient - reference_gradients[name]).abs().max() / scale <= 1e-5, (implementation, name)


def test_the_default_on_the_cpu_takes_the_measured_fastest_path_for_each_case(monkeypatch):
    """On the CPU every MoE layer of the default runs: the few-pairs path for a decoded token, the sorted rows with
    their own backward for training, transformers' grouped_mm for inference over many tokens."""
    from transformers.integrations.moe import ExpertsInterface

    import modeling_grin.fused_experts as fused_experts

    calls = []

    def spy(name, function):
        return lambda *args: calls.append(name) or function(*args)

    for name in ("few_pairs_swiglu_experts", "sorted_swiglu_experts"):
        monkeypatch.setattr(fused_experts, name, spy(name, getattr(fused_experts, name)))
    monkeypatch.setitem(ExpertsInterface._global_mapping, "grouped_mm",
                        spy("transformers", ExpertsInterface._global_mapping["grouped_mm"]))
    model = GrinMoeForCausalLM(tiny_config(num_local_experts=8)).eval()
    assert model.config._experts_implementation == "grouped_mm"  # the default
    layers = model.config.num_hidden_layers
    cases = {
        "decoding one token": (lambda: model(torch.randint(1, 60, (1, 1))), "few_pairs_swiglu_experts"),
        "training": (lambda: model(torch.randint(1, 60, (2, 7)), labels=torch.randint(1, 60, (2, 7))).loss.backward(),
                     "sorted_swiglu_experts"),
        "inference over 14 tokens": (lambda: model(torch.randint(1, 60, (2, 7))), "transformers"),
    }
    for case, (run_model, expected) in cases.items():
        calls.clear()
        with torch.set_grad_enabled(case == "training"):
            run_model()
        assert calls == [expected] * layers, case
    # off the CPU the default keeps transformers' grouped_mm where torch's grouped GEMM takes the shape
    assert grouped_mm_takes_shape(model.model.layers[0].mlp.experts, torch.bfloat16)
    assert not grouped_mm_takes_shape(GrinMoeForCausalLM(tiny_config(hidden_size=36, num_attention_heads=2))
                                      .model.layers[0].mlp.experts, torch.bfloat16)  # 36 bf16 = 72 bytes


@pytest.mark.parametrize("shape", ["small", "h512", "mhmoe"])
def test_benchmark_shapes_match_eager_on_every_implementation(shape):
    """The whole-model benchmark's shapes (two layers of each): the loss and every gradient."""
    from modeling_grin.model_bench import MODEL_SHAPES, _configs

    config, _ = _configs({**MODEL_SHAPES[shape], "num_hidden_layers": 2})
    config.vocab_size = 128
    model_class = MhMoeForCausalLM if MODEL_SHAPES[shape]["family"] == "mh_moe" else GrinMoeForCausalLM
    torch.manual_seed(0)
    model = model_class(config).eval()
    input_ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    reference_loss, reference_gradients = loss_and_gradients(model, "eager", input_ids)
    for implementation in ("grouped_mm", "fused"):
        loss, gradients = loss_and_gradients(model, implementation, input_ids)
        assert (loss - reference_loss).abs() <= 1e-5, implementation
        for name, gradient in gradients.items():
            scale = reference_gradients[name].abs().max().clamp(min=1e-6)
            assert (gradient - reference_gradients[name]).abs().max() / scale <= 1e-5, (implementation, name)
