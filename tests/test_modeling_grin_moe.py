import copy
import logging

import pytest
import torch
from conftest import LONGROPE_SCALING, informative_model, left_padded, rewrite_as_phimoe, tiny_config, tiny_model
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PhimoeConfig,
    PhimoeForCausalLM,
    PhimoeForSequenceClassification,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from modeling_grin import GrinMoeForCausalLM, GrinMoeForSequenceClassification, GrinMoeModel
from modeling_grin.losses import load_balancing_loss, router_z_loss
from modeling_grin.modeling_grin_moe import GrinMoeExperts, micro_batch_share


def inputs(batch=3, length=11, vocab=96, seed=0):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# The second configuration departs from GRIN's defaults where Phimoe has the same switches: no attention or LM-head
# biases, and a head_dim other than hidden_size // num_attention_heads (32 // 4).
PHIMOE_PARITY_CONFIGS = {
    "grin": {},
    "no biases, head_dim 16": dict(attention_bias=False, lm_head_bias=False, head_dim=16),
}


@pytest.fixture(params=list(PHIMOE_PARITY_CONFIGS))
def grin_and_phimoe(tmp_path, request):
    model = tiny_model(**PHIMOE_PARITY_CONFIGS[request.param])
    model.save_pretrained(tmp_path)
    rewrite_as_phimoe(tmp_path)
    phimoe = PhimoeForCausalLM.from_pretrained(tmp_path).eval()
    return model, phimoe


def test_logits_match_phimoe(grin_and_phimoe):
    model, phimoe = grin_and_phimoe
    input_ids = inputs()
    with torch.no_grad():
        difference = (model(input_ids).logits - phimoe(input_ids).logits).abs().max().item()
    assert difference <= 1e-5


def test_logits_match_phimoe_with_padding_and_mask(grin_and_phimoe):
    model, phimoe = grin_and_phimoe
    input_ids, attention_mask = left_padded(inputs())
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask).logits
        theirs = phimoe(input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max().item() <= 1e-5


def test_logits_match_phimoe_with_given_position_ids(grin_and_phimoe):
    """Position ids of two sequences packed in one row (what DataCollatorWithFlattening gives): RoPE reads them."""
    model, phimoe = grin_and_phimoe
    position_ids = torch.cat([torch.arange(5), torch.arange(6)]).expand(3, -1)
    with torch.no_grad():
        ours = model(inputs(), position_ids=position_ids).logits
        theirs = phimoe(inputs(), position_ids=position_ids).logits
        assert (ours - model(inputs()).logits).abs().max() > 1e-3  # the positions matter
    assert (ours - theirs).abs().max() <= 1e-5


def test_the_cache_keeps_what_phimoes_keeps(grin_and_phimoe):
    """A DynamicCache built from the config: sliding-window layers that hold the last window of keys, not all."""
    model, phimoe = grin_and_phimoe
    with torch.no_grad():
        ours, theirs = model(inputs(length=20)).cache, phimoe(inputs(length=20)).past_key_values
    assert [type(layer) for layer in ours.layers] == [type(layer) for layer in theirs.layers]
    assert [layer.keys.shape for layer in ours.layers] == [layer.keys.shape for layer in theirs.layers]
    assert ours.layers[0].keys.shape[-2] < 20


def test_greedy_generation_matches_phimoe(grin_and_phimoe):
    model, phimoe = grin_and_phimoe
    input_ids, attention_mask = left_padded(inputs(length=8))
    settings = dict(
        attention_mask=attention_mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(model.generate(input_ids, **settings), phimoe.generate(input_ids, **settings))


def test_gradients_match_phimoe_in_eval_mode(grin_and_phimoe):
    model, phimoe = grin_and_phimoe
    input_ids = inputs()
    input_ids[:, ::4] = model.config.pad_token_id  # the padding embedding gets no gradient, in both
    for network in (model, phimoe):
        network.zero_grad()
        network(input_ids, labels=input_ids).loss.backward()
    theirs = dict(phimoe.named_parameters())
    compared = 0
    for name, parameter in model.named_parameters():  # router included: eval-mode routing is the same function
        scale = theirs[name].grad.abs().max().clamp(min=1e-6)
        assert (parameter.grad - theirs[name].grad).abs().max() / scale <= 1e-5, name
        compared += 1
    assert compared == len(theirs)
    assert (model.model.embed_tokens.weight.grad[model.config.pad_token_id] == 0).all()


def test_save_load_round_trip_is_exact_and_writes_the_released_layout(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert {f"model.layers.1.block_sparse_moe.experts.3.w{i}.weight" for i in (1, 2, 3)} <= keys
    assert not any("gate_up_proj" in key or "router" in key for key in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is GrinMoeForCausalLM
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    assert not any(path.suffix in {".bin", ".pt", ".pth"} for path in tmp_path.iterdir())


def test_released_format_folder_loads_without_missing_or_unexpected_weights(released_grin_folder, caplog):
    with caplog.at_level(logging.WARNING):
        model, info = AutoModelForCausalLM.from_pretrained(released_grin_folder, output_loading_info=True)
    assert type(model) is GrinMoeForCausalLM and model.dtype == torch.bfloat16
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    messages = [record.getMessage().lower() for record in caplog.records]
    assert not [message for message in messages if "missing" in message or "unexpected" in message]
    with safe_open(released_grin_folder / "model.safetensors", "pt") as checkpoint:
        experts = model.model.layers[1].mlp.experts
        w1 = checkpoint.get_tensor("model.layers.1.block_sparse_moe.experts.2.w1.weight")
        w3 = checkpoint.get_tensor("model.layers.1.block_sparse_moe.experts.2.w3.weight")
        w2 = checkpoint.get_tensor("model.layers.1.block_sparse_moe.experts.2.w2.weight")
        gate = checkpoint.get_tensor("model.layers.1.block_sparse_moe.gate.weight")
    assert torch.equal(experts.gate_up_proj[2], torch.cat([w1, w3]))
    assert torch.equal(experts.down_proj[2], w2)
    assert torch.equal(model.model.layers[1].mlp.router.weight, gate)
    # It runs in bf16 and agrees with an fp32 run of the same (bf16-valued) weights: the difference is bf16's
    # rounding of the activations (unit roundoff 2**-8 ~ 0.4 %) accumulated over two layers; 3 % of the logits'
    # scale (about 4 bf16 epsilons) allows for that, while a wrong kernel, dtype mix-up or routing change is larger.
    reference = copy.deepcopy(model).float()
    input_ids = inputs()
    with torch.no_grad():
        bf16 = model(input_ids, labels=input_ids)
        fp32 = reference(input_ids, labels=input_ids)
    assert bf16.logits.dtype == torch.bfloat16 and fp32.logits.dtype == torch.float32
    scale = fp32.logits.abs().max()
    assert (bf16.logits.float() - fp32.logits).abs().max() <= 0.03 * scale
    assert abs(bf16.loss.item() - fp32.loss.item()) <= 0.01 * fp32.loss.item()


def test_outputs_follow_transformers_moe_conventions():
    model = tiny_model(router_aux_loss_coef=0.5)
    input_ids = inputs()
    plain = model(input_ids, labels=input_ids)
    with_router = model(input_ids, labels=input_ids, output_router_logits=True)
    assert isinstance(with_router, MoeCausalLMOutputWithPast)
    assert plain.aux_loss is None and plain.router_logits is None
    assert len(with_router.router_logits) == 2 and with_router.router_logits[0].shape == (3 * 11, 4)
    assert torch.allclose(with_router.loss, plain.loss + 0.5 * with_router.aux_loss)
    hidden = model(input_ids, output_hidden_states=True)
    assert len(hidden.hidden_states) == 3
    assert torch.equal(hidden.hidden_states[0], model.model.embed_tokens(input_ids))


def test_output_attentions_are_the_causal_sliding_window_probabilities(grin_and_phimoe):
    model, phimoe = grin_and_phimoe
    input_ids, attention_mask = left_padded(inputs())
    model.set_attn_implementation("eager")  # sdpa computes no probabilities (it returns none, as Phimoe's)
    phimoe.set_attn_implementation("eager")
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        theirs = phimoe(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    assert len(ours) == 2 and all(layer.shape == (3, 4, 11, 11) for layer in ours)
    query, key = torch.arange(11)[:, None], torch.arange(11)[None, :]
    window = model.config.sliding_window
    visible = (key <= query) & (query - key < window)  # causal, and the last `window` positions only
    for layer, reference in zip(ours, theirs, strict=True):
        assert (layer - reference).abs().max() <= 1e-6
        for row in range(3):
            valid = attention_mask[row].bool()
            allowed = visible & valid[None, :]  # padded keys are never attended
            probabilities = layer[row][:, valid]  # rows of the real (non-padding) queries
            assert torch.allclose(probabilities.sum(-1), torch.ones_like(probabilities[..., 0]), atol=1e-6)
            assert (probabilities[:, ~allowed[valid]] == 0).all()
            assert (probabilities[:, allowed[valid]] > 0).all()


def test_aux_loss_reaches_the_router():
    model = tiny_model().train()
    input_ids, attention_mask = left_padded(inputs())
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_router_outputs_during_cached_generation():
    model = tiny_model(output_router_logits=True)
    input_ids, attention_mask = left_padded(inputs(length=8))
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         eos_token_id=None, output_router_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (3, 12)
    step = model(out.sequences[:, -1:], attention_mask=torch.ones(3, 12, dtype=torch.long),
                 cache=model(out.sequences[:, :-1], use_cache=True).cache)
    assert len(step.router_logits) == 2 and step.router_logits[0].shape == (3, 4)  # the new token's rows only
    assert torch.allclose(step.aux_loss, load_balancing_loss(step.router_logits, 4, 2))


def test_aux_and_z_loss_with_a_cache_use_the_mask_of_the_new_tokens():
    """With a cache the 2-D mask covers past and new tokens; the router rows are the new tokens': the mask's tail."""
    model = informative_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    input_ids = inputs(batch=2, length=12)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding in the past tokens
    attention_mask[1, 10:] = 0  # right padding among the new ones
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    past, new = 8, 4
    labels = input_ids[:, past:].masked_fill(attention_mask[:, past:] == 0, -100)
    with torch.no_grad():
        prefix = model(input_ids[:, :past], attention_mask=attention_mask[:, :past], use_cache=True)
        step = model(input_ids[:, past:], attention_mask=attention_mask, cache=prefix.cache, labels=labels,
                     output_router_logits=True)
        # Independently: an uncached forward of the whole sequence, its router rows restricted to the new positions.
        full = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    new_rows = tuple(logits.reshape(2, 12, -1)[:, past:].reshape(2 * new, -1) for logits in full.router_logits)
    for cached, uncached in zip(step.router_logits, new_rows, strict=True):
        assert torch.allclose(cached, uncached, atol=1e-5)
    assert torch.cat([rows.topk(2, dim=-1).indices for rows in new_rows]).unique().numel() == 4  # all experts used
    tail, head = attention_mask[:, -new:], attention_mask[:, :new]
    expected_aux = load_balancing_loss(new_rows, 4, 2, tail)
    assert not torch.allclose(load_balancing_loss(new_rows, 4, 2, head), expected_aux, rtol=0, atol=1e-3)
    assert torch.allclose(step.aux_loss, expected_aux, rtol=0, atol=1e-5)
    expected_z = router_z_loss(new_rows, tail)
    assert not torch.allclose(router_z_loss(new_rows, head), expected_z, rtol=0, atol=1e-2)
    lm_loss = torch.nn.functional.cross_entropy(step.logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1))
    assert torch.allclose(step.loss, lm_loss + 0.5 * expected_aux + 0.1 * expected_z, rtol=0, atol=1e-4)


def test_sdpa_and_eager_attention_agree():
    model = tiny_model()
    input_ids, attention_mask = left_padded(inputs())
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    assert (sdpa[valid] - eager[valid]).abs().max() <= 1e-5


def test_kv_cache_decoding_matches_full_forward():
    model = tiny_model()
    input_ids = inputs(batch=2, length=14)
    with torch.no_grad():
        full = model(input_ids).logits
        prefix = model(input_ids[:, :9], use_cache=True)
        cache, steps = prefix.cache, [prefix.logits]
        for position in range(9, 14):
            step = model(input_ids[:, position : position + 1], cache=cache, use_cache=True)
            cache = step.cache
            steps.append(step.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_sliding_window_limits_attention():
    windowed, unlimited = tiny_model(sliding_window=3), tiny_model(sliding_window=None)
    input_ids = inputs(batch=1, length=10)
    changed = input_ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 96 or 1
    with torch.no_grad():
        # With one layer the last token sees only the last 3 positions; two layers reach 6 back at most.
        assert torch.allclose(windowed(input_ids).logits[0, -1], windowed(changed).logits[0, -1])
        assert not torch.allclose(unlimited(input_ids).logits[0, -1], unlimited(changed).logits[0, -1])


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids = inputs()
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model(input_jitter_noise=0.0, router_type="softmax_topk")
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(input_ids, labels=input_ids).loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


def routed(model, input_ids, seed):
    """Per MoE layer, the router logits it saw and the experts it chose, from one forward pass under `seed`."""
    seen = []
    hooks = [layer.mlp.router.register_forward_hook(lambda module, args, out: seen.append((out[0], out[2])))
             for layer in model.model.layers]
    torch.manual_seed(seed)
    loss = model(input_ids, labels=input_ids, output_router_logits=True).loss
    for hook in hooks:
        hook.remove()
    return loss, seen


def test_training_mode_samples_experts_and_trains_every_part():
    # jitter 0.2: the mask keeps the experts within 40 % of the best logit, so tokens have several candidates.
    model = informative_model(router_aux_loss_coef=0.01, router_jitter_noise=0.2)
    input_ids = inputs()
    with torch.no_grad():
        evaluated = [routed(model, input_ids, seed)[1] for seed in (0, 1)]
    for (logits, chosen), (_, again) in zip(*evaluated, strict=True):
        assert torch.equal(chosen, again) and torch.equal(chosen, logits.topk(2, dim=-1).indices)  # deterministic
    model.train()
    samples = []
    for seed in (0, 1, 2):
        model.zero_grad()
        loss, seen = routed(model, input_ids, seed)
        loss.backward()
        samples.append(torch.stack([chosen for _, chosen in seen]))
        # Sampling: some first choices are not the argmax of the logits the router saw (input jitter included).
        assert any((chosen[:, 0] != logits.argmax(-1)).any() for logits, chosen in seen), seed
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
        for layer in model.model.layers:  # every expert took tokens and learns
            for expert in range(4):
                assert layer.mlp.experts.gate_up_proj.grad[expert].abs().sum() > 0
                assert layer.mlp.experts.down_proj.grad[expert].abs().sum() > 0
    assert not torch.equal(samples[0], samples[1]) and not torch.equal(samples[1], samples[2])
    torch.manual_seed(0)
    first = model(input_ids).logits
    torch.manual_seed(0)
    assert torch.equal(first, model(input_ids).logits)  # the samples come from the seeded global generator


@pytest.mark.parametrize("norm_type, norm_class", [("layernorm", torch.nn.LayerNorm), ("rmsnorm", LlamaRMSNorm)])
def test_every_norm_has_the_configured_type_and_epsilon(norm_type, norm_class):
    model = tiny_model(norm_type=norm_type, rms_norm_eps=1e-3)
    norms = [module for name, module in model.named_modules() if name.endswith("norm")]
    assert len(norms) == 2 * 2 + 1  # two per layer and the final one
    for norm in norms:
        assert type(norm) is norm_class
        assert (norm.eps if norm_type == "layernorm" else norm.variance_epsilon) == 1e-3


def test_micro_batch_share_counts_the_label_tokens_after_the_shift():
    labels = torch.tensor([[5, -100, 7, 8], [-100, 1, 2, -100]])  # predicted: columns 1..3: 2 + 2 label tokens
    assert micro_batch_share(labels, None) == 1.0
    assert micro_batch_share(labels, 10).item() == pytest.approx(0.4)


def test_default_initialisation_is_normal_with_the_initializer_range():
    torch.manual_seed(0)
    model = GrinMoeForCausalLM(tiny_config(initializer_range=0.05))
    layer = model.model.layers[0]
    for name, tensor in (("q_proj", layer.self_attn.q_proj.weight), ("router", layer.mlp.router.weight),
                         ("gate_up_proj", layer.mlp.experts.gate_up_proj), ("down_proj", layer.mlp.experts.down_proj),
                         ("embed_tokens", model.model.embed_tokens.weight[1:])):
        assert tensor.std().item() == pytest.approx(0.05, rel=0.15), name
        assert abs(tensor.mean().item()) < 0.3 * 0.05, name


def test_attention_dropout_acts_in_training_only():
    attention = tiny_model(attention_dropout=0.5).model.layers[0].self_attn
    without = tiny_model(attention_dropout=0.0).model.layers[0].self_attn
    hidden = torch.randn(2, 7, 32)
    position_embeddings = tiny_model().model.rotary_emb(hidden, torch.arange(7).unsqueeze(0))
    eval_output = attention.eval()(hidden, position_embeddings)[0]
    assert torch.equal(eval_output, without.eval()(hidden, position_embeddings)[0])
    assert (attention.train()(hidden, position_embeddings)[0] - eval_output).abs().max() > 1e-3


def test_exactly_one_of_input_ids_and_inputs_embeds():
    model = tiny_model()
    message = r"^You must specify exactly one of input_ids or inputs_embeds$"
    with pytest.raises(ValueError, match=message):
        model(inputs(), inputs_embeds=torch.zeros(3, 11, 32))
    with pytest.raises(ValueError, match=message):
        model()


def test_loss_under_gradient_accumulation_is_normalised_by_the_whole_batch():
    """Trainer passes num_items_in_batch: the LM loss is the token sum over it, the router losses weighted by this
    micro-batch's share of the label tokens."""
    model = tiny_model(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    input_ids, attention_mask = left_padded(inputs())
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True,
                    num_items_in_batch=100)
    targets = labels[:, 1:]
    lm_sum = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 96), targets.reshape(-1),
                                               ignore_index=-100, reduction="sum")
    token_mask = attention_mask
    z_loss = router_z_loss(out.router_logits, token_mask)
    share = (targets != -100).sum() / 100
    expected = lm_sum / 100 + share * (0.1 * out.aux_loss + 0.01 * z_loss)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("load_balancing", ["local", "global"])
def test_load_balancing_setting_reaches_the_loss(monkeypatch, load_balancing):
    """One process cannot tell global from local balancing (tests/test_losses.py checks the loss over two): here,
    that the model asks for the one its config names."""
    import modeling_grin.modeling_grin_moe as modeling

    asked = []
    original = modeling.load_balancing_loss
    monkeypatch.setattr(modeling, "load_balancing_loss",
                        lambda *args, **kwargs: asked.append(kwargs["global_balance"]) or original(*args, **kwargs))
    tiny_model(load_balancing=load_balancing)(inputs(), output_router_logits=True)
    assert asked == [load_balancing == "global"]


@pytest.mark.parametrize("aux_loss_type", ["switch", "gshard"])
def test_aux_loss_ignores_padding(aux_loss_type):  # the padding's content changes nothing, the mask does
    model = tiny_model(aux_loss_type=aux_loss_type)
    input_ids, attention_mask = left_padded(inputs())
    changed = input_ids.masked_fill(attention_mask == 0, 5)
    with torch.no_grad():
        first = model(input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
        second = model(changed, attention_mask=attention_mask, output_router_logits=True).aux_loss
        unmasked = model(changed, output_router_logits=True).aux_loss
    assert torch.allclose(first, second) and not torch.allclose(first, unmasked)


def test_input_jitter_multiplies_the_block_input(monkeypatch):
    """With the noise fixed at 1 + eps, the training-mode block equals the unjittered block on 1.01 x (same draws)."""
    block = tiny_model(input_jitter_noise=0.01).train().model.layers[0].mlp
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, low=0.0, high=1.0, **kwargs: self.fill_(high))
    x = torch.randn(2, 5, 32)
    torch.manual_seed(3)
    jittered = block(x)
    block.input_jitter_noise = 0.0
    torch.manual_seed(3)
    assert torch.equal(jittered, block(x * 1.01))
    torch.manual_seed(3)
    assert not torch.allclose(jittered, block(x))


def test_input_jitter_is_applied_once(monkeypatch):
    model = tiny_model(input_jitter_noise=0.01).train()
    block = model.model.layers[0].mlp
    calls = []
    original_uniform = torch.Tensor.uniform_

    def counting_uniform(self, low=0.0, high=1.0, *args, **kwargs):
        calls.append((low, high))
        return original_uniform(self, low, high, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "uniform_", counting_uniform)
    block(torch.randn(2, 5, 32))
    assert calls == [(0.99, 1.01)]
    calls.clear()
    block.eval()(torch.randn(2, 5, 32))
    assert calls == []


def test_longrope_logits_match_phimoe(tmp_path):
    model = tiny_model(rope_scaling=LONGROPE_SCALING, sliding_window=None)
    model.save_pretrained(tmp_path)
    rewrite_as_phimoe(tmp_path)
    phimoe = PhimoeForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for length in (6, 20):  # short factors, then long factors
            input_ids = inputs(length=length)
            assert (model(input_ids).logits - phimoe(input_ids).logits).abs().max() <= 1e-5
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        prompt = inputs(batch=1, length=5)  # generation crosses the 8-token switch point
        assert torch.equal(model.generate(prompt, **settings), phimoe.generate(prompt, **settings))


def test_auto_classes_and_sequence_classification(tmp_path):
    config = tiny_config(num_labels=3)
    assert type(AutoModel.from_config(config)) is GrinMoeModel
    classifier = AutoModelForSequenceClassification.from_config(config)
    assert type(classifier) is GrinMoeForSequenceClassification
    input_ids = inputs()
    out = classifier(input_ids, labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 3) and out.loss.requires_grad
    classifier.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    classifier.eval()
    assert torch.equal(classifier(input_ids).logits, reloaded(input_ids).logits)
    # the peer: transformers' Phimoe classifier takes the same state dict, every key (its score has no bias either)
    rewrite_as_phimoe(tmp_path)
    phimoe = PhimoeForSequenceClassification(PhimoeConfig.from_pretrained(tmp_path, num_labels=3)).eval()
    phimoe.load_state_dict(classifier.state_dict(), strict=True)
    assert (phimoe(input_ids).logits - classifier(input_ids).logits).abs().max() <= 1e-5


def test_experts_stay_3d_and_accept_transformers_implementations():
    model = tiny_model()
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, GrinMoeExperts)
    assert experts.gate_up_proj.shape == (4, 48, 32) and experts.down_proj.shape == (4, 32, 24)
    input_ids = inputs()
    with torch.no_grad():
        eager = model(input_ids).logits
        for implementation in ("grouped_mm", "batched_mm"):
            model.set_experts_implementation(implementation)
            assert (model(input_ids).logits - eager).abs().max() <= 1e-5, implementation
