"""Every config that validates runs on every experts implementation, equal to eager (forward and all gradients).

torch's grouped GEMM (transformers' `grouped_mm`, the default) needs 16-byte-aligned rows; where a shape is not, our
models run the eager loop for it instead of failing.
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


def test_aligned_shapes_keep_transformers_grouped_mm(monkeypatch):
    from transformers.integrations.moe import ExpertsInterface

    calls = []
    original = ExpertsInterface._global_mapping["grouped_mm"]
    monkeypatch.setitem(ExpertsInterface._global_mapping, "grouped_mm", lambda *a: calls.append(1) or original(*a))
    model = GrinMoeForCausalLM(tiny_config()).eval()
    model.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        model(torch.randint(1, 60, (2, 7)))
    assert len(calls) == model.config.num_hidden_layers  # every MoE layer ran torch's grouped GEMM
    assert grouped_mm_takes_shape(model.model.layers[0].mlp.experts, torch.bfloat16)
    assert not grouped_mm_takes_shape(GrinMoeForCausalLM(tiny_config(hidden_size=36, num_attention_heads=2))
                                      .model.layers[0].mlp.experts, torch.bfloat16)  # 36 bf16 = 72 bytes
