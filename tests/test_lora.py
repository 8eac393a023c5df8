import pytest
import torch
from conftest import tiny_model
from peft import PeftModel, get_peft_model
from test_mh_moe import tiny_mh_model

from modeling_grin.training import lora_config


def train_a_few_steps(model, input_ids, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("family", ["grin", "mh_moe"])
def test_lora_on_attention_and_experts_trains_merges_and_reloads(tmp_path, family):
    base = tiny_model(router_type="softmax_topk") if family == "grin" else tiny_mh_model()
    base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    extra = ("head_proj", "merge_proj") if family == "mh_moe" else ()
    model = get_peft_model(base, lora_config(base, r=4, extra_modules=extra))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("experts" in name for name in trainable) and any("q_proj" in name for name in trainable)

    input_ids = torch.randint(1, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    train_a_few_steps(model, input_ids)
    with torch.no_grad():
        adapted = model(input_ids).logits
    for name, tensor in model.get_base_model().state_dict().items():  # base weights untouched
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in base_state:
            assert torch.equal(tensor, base_state[key]), name

    model.save_pretrained(tmp_path / "adapter")
    fresh = tiny_model(router_type="softmax_topk") if family == "grin" else tiny_mh_model()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (reloaded(input_ids).logits - adapted).abs().max() <= 1e-5
        merged = model.merge_and_unload()
        assert (merged(input_ids).logits - adapted).abs().max() / adapted.abs().max() <= 1e-5


def test_targets_that_match_nothing_fail_before_training():
    model = tiny_model()
    with pytest.raises(ValueError, match="'head_proj' matches no module"):
        lora_config(model, extra_modules=("head_proj",))
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora_config(model, attention=False, experts=False)


@pytest.mark.parametrize("family", ["grin", "mh_moe"])
def test_attention_only_lora_trains_under_every_experts_implementation(family):
    """Frozen experts: the experts' backward computes the input gradient only (the hand-written one of the CPU
    default once returned one empty tensor for both weight gradients, which a custom operator may not do). Every
    implementation gives eager's LoRA gradients."""
    grads = {}
    for implementation in ("eager", "grouped_mm", "batched_mm", "fused"):
        base = tiny_model(router_type="softmax_topk") if family == "grin" else tiny_mh_model()
        model = get_peft_model(base, lora_config(base, r=4, experts=False))
        model.set_experts_implementation(implementation)
        model.train()
        input_ids = torch.randint(1, 60, (2, 10), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads[implementation] = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    lora_b = [grad for name, grad in grads["eager"].items() if "lora_B" in name]  # (lora_A's: zero while B is 0)
    assert lora_b and all(grad.abs().max() > 0 for grad in lora_b)
    for implementation, found in grads.items():
        for name, grad in grads["eager"].items():
            assert (found[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), (implementation, name)
