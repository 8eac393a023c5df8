"""Inputs the models cannot run get an error that says why, not a failure somewhere downstream (issue 14)."""

import logging

import pytest
import torch
from conftest import tiny_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import logging as transformers_logging

import modeling_grin.modeling_grin_moe as modeling
from modeling_grin import MhMoeConfig, MhMoeForCausalLM


def test_an_empty_sequence_is_refused_naming_the_shape():
    """A (1, 0) batch stopped in the rotary embedding with an unrelated RuntimeError."""
    mh_moe = MhMoeForCausalLM(MhMoeConfig(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                          dense_intermediate_size=24))
    for model in (tiny_model(), mh_moe):
        with pytest.raises(ValueError, match=r"the input holds no tokens \(shape \(1, 0\)\)"):
            model(torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(ValueError, match=r"holds no tokens \(shape \(2, 0, 32\)\)"):
            model(inputs_embeds=torch.zeros(2, 0, 32))


def test_a_sequence_beyond_max_position_embeddings_warns_once(caplog):
    # transformers' warning_once remembers every message for the process: forget them, so that this test also passes
    # after one that warned the same (or after itself, as in mutmut's runs, which run the tests twice in one process)
    transformers_logging.warning_once.cache_clear()
    model = tiny_model(max_position_embeddings=37)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(torch.randint(0, 96, (1, 37)))
        assert not caplog.records
        model(torch.randint(0, 96, (1, 40)))
        model(torch.randint(0, 96, (1, 41)))
    message = ("This sequence is longer than max_position_embeddings (37): the model was not trained on those "
               "positions and its outputs past them may be meaningless")
    assert [record.getMessage() for record in caplog.records] == [message]


def test_the_position_warning_counts_cached_tokens_and_only_host_lengths(caplog):
    model = tiny_model(max_position_embeddings=37)
    prompt = torch.randint(1, 96, (1, 30))
    for count_as_tensor in (False, True):
        transformers_logging.warning_once.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING), torch.no_grad():
            model(torch.randint(1, 96, (1, 37)), use_cache=False)  # at the limit, without a cache: no warning
            assert not caplog.records
            if count_as_tensor:  # a static cache's length on the device: not read (it would synchronise)
                modeling._warn_beyond_trained_positions(model.config, 10, torch.tensor(30))
                assert not caplog.records
            else:  # 30 cached + 1 new token per step: the 38th position warns
                model.generate(prompt, max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None)
                ours = [record.getMessage() for record in caplog.records if record.name.startswith("modeling_grin")]
                assert len(ours) == 1 and "max_position_embeddings (37)" in ours[0]  # generate warns too


def _nan_attention(module, query, key, value, attention_mask, **kwargs):
    """Stands in for an implementation that fails on finite input, as flex_attention can on CPU."""
    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return torch.full_like(output, float("nan")), weights


def test_nan_from_the_attention_implementation_names_it_not_the_learning_rate():
    AttentionInterface.register("test_nan_attention", _nan_attention)
    model = tiny_model()
    model.set_attn_implementation("test_nan_attention")
    with pytest.raises(ValueError, match="attention implementation 'test_nan_attention' returned NaN or inf in "
                                         "layer 0 for finite queries, keys and values"):
        model(torch.randint(0, 96, (1, 5)))


def test_diverged_weights_still_get_the_router_message():
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="router logits contain NaN or inf"):
        model(torch.randint(0, 96, (1, 5)))
