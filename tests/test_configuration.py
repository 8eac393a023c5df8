import json

import pytest
import torch
from conftest import RELEASED_GRIN_CONFIG, tiny_config
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig

from modeling_grin import GrinMoeConfig, GrinMoeForCausalLM
from modeling_grin.presets import list_presets, load_preset, preset_path


def test_released_config_loads_unchanged_without_remote_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_GRIN_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)  # no trust_remote_code although auto_map names remote files
    assert type(config) is GrinMoeConfig
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.sliding_window == 2047 and config.attention_bias and config.lm_head_bias
    assert config.num_local_experts == 16 and config.num_experts_per_tok == 2
    assert config.router_jitter_noise == 0.01 and config.input_jitter_noise == 0.01
    assert config.dtype == torch.bfloat16
    assert not hasattr(config, "auto_map")


def test_resaving_drops_the_stale_auto_map_and_round_trips(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_GRIN_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)
    config.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "auto_map" not in saved and saved["model_type"] == "grinmoe"
    reloaded = AutoConfig.from_pretrained(tmp_path / "resaved").to_dict()
    assert {k: v for k, v in reloaded.items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"
    }


def test_auto_map_of_our_own_remote_code_is_kept():
    auto_map = {"AutoConfig": "configuration_grin_moe.GrinMoeConfig"}
    assert GrinMoeConfig(auto_map=auto_map).auto_map == auto_map


def test_defaults_are_the_released_architecture():
    config = GrinMoeConfig()
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 6400, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 32064)
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.router_type == "sparsemixer_v2"


def test_phi35_longrope_config_reads():
    half_head = 4  # head_dim 8 -> 4 rotary frequencies
    config = tiny_config(
        max_position_embeddings=128,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.1, 1.2, 1.3][:half_head],
            "long_factor": [1.5, 2.0, 3.0, 4.0][:half_head],
            "short_mscale": 1.1,
            "long_mscale": 1.243163121016122,
            "original_max_position_embeddings": 16,
        },
    )
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["original_max_position_embeddings"] == 16
    with pytest.raises(ValueError, match="long_mscale"):
        tiny_config(rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
                                  "short_mscale": 1.0, "original_max_position_embeddings": 16})


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"num_local_experts": 0}, "num_local_experts"),
        ({"hidden_size": 30}, "hidden_size"),  # 4 heads: head_dim 7 is odd, RoPE cannot rotate it
        ({"hidden_size": 37}, "hidden_size"),  # head_dim 9
        ({"hidden_size": 6}, "hidden_size"),  # head_dim 1
        ({"hidden_size": 3}, "hidden_size"),  # head_dim 0
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"router_jitter_noise": -0.1}, "router_jitter_noise"),
        ({"input_jitter_noise": -0.01}, "input_jitter_noise"),
        ({"input_jitter_noise": 1.0}, "input_jitter_noise"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
        ({"router_type": "expert_choice"}, "router_type"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"hidden_act": "not_an_activation"}, "hidden_act"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"head_dim": 7}, "head_dim"),
        ({"num_experts": 0}, "num_local_experts"),  # the alias transformers maps onto num_local_experts
        ({"norm_type": "RMSNorm"}, "norm_type"),
        ({"rope_parameters": {"rope_type": "bogus", "rope_theta": 1e4}}, r"rope_parameters\['rope_type'\]"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
         r"rope_parameters\['rope_type'\]"),  # the rotary embedding would stop with a KeyError
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"rope_theta": -1e4}, "rope_theta"),
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"initializer_range": -0.02}, "initializer_range"),
        ({"initializer_range": float("nan")}, "initializer_range"),
        ({"initializer_range": float("inf")}, "initializer_range"),
        ({"pad_token_id": 96}, "pad_token_id"),  # vocab_size 96: nn.Embedding would stop with an AssertionError
        ({"pad_token_id": -97}, "pad_token_id"),
    ],
)
def test_invalid_fields_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(**overrides)


def test_head_dim_may_differ_from_hidden_over_heads():
    assert tiny_config(hidden_size=30, head_dim=8).head_dim == 8


def test_odd_head_dim_cannot_run_so_it_is_rejected():
    """The rule is as strict as the model: bypass the check and RoPE fails on head_dim 9 (as Phimoe's does)."""
    with pytest.raises(ValueError, match=r"`hidden_size` must be at least 2 \* num_attention_heads \(8\) with .* even"):
        tiny_config(hidden_size=37)
    config = tiny_config(hidden_size=32, head_dim=8)
    with pytest.raises(ValueError, match="`head_dim`"):
        config.head_dim = 9
    config.__dict__["head_dim"] = 9  # past the check
    with pytest.raises(RuntimeError):
        GrinMoeForCausalLM(config).eval()(torch.randint(0, 96, (1, 4)))


@pytest.mark.parametrize("heads, head_dim", [(2, 18), (8, 4)])
def test_hidden_size_not_a_multiple_of_the_heads_runs_end_to_end(heads, head_dim):
    """hidden_size 37: head_dim = 37 // heads; q_proj maps 37 -> heads * head_dim and o_proj back."""
    config = tiny_config(hidden_size=37, num_attention_heads=heads, num_key_value_heads=2)
    assert config.head_dim == head_dim
    torch.manual_seed(0)
    # eager experts: torch's grouped_mm (the default implementation) needs 16-byte aligned rows, which 37 fp32 lacks
    model = GrinMoeForCausalLM(config).eval()
    model.set_experts_implementation("eager")
    assert model.model.layers[0].self_attn.o_proj.weight.shape == (37, heads * head_dim)
    ids = torch.randint(1, 95, (2, 5))
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert logits.shape == (2, 5, 96) and torch.isfinite(logits).all()
    assert generated.shape == (2, 9)
    with torch.no_grad():  # greedy decoding with the cache matches re-encoding the whole sequence
        assert torch.equal(model(generated[:, :-1]).logits[:, -1].argmax(-1), generated[:, -1])


def test_presets_resolve_and_build_configs():
    assert {"grin-moe", "grin-moe-tiny"} <= set(list_presets())
    released = load_preset("grin-moe")
    assert type(released) is GrinMoeConfig and released.num_local_experts == 16
    assert load_preset("grin-moe-tiny", num_hidden_layers=1).num_hidden_layers == 1
    with pytest.raises(ValueError, match="available presets"):
        preset_path("no-such-preset")


def test_a_released_style_negative_pad_id_is_kept():
    assert tiny_config(pad_token_id=-1).pad_token_id == -1  # nn.Embedding counts it from the end


def _save_tiny_config(folder):
    tiny_config().save_pretrained(folder)
    return folder


# Every way a field reaches a config after the file is read: transformers applies `from_pretrained` keyword
# overrides with setattr after construction, and `load_preset` passes its overrides the same way.
OVERRIDE_PATHS = {
    "load_preset": lambda folder, **overrides: load_preset("grin-moe-tiny", **overrides),
    "AutoConfig.from_pretrained": lambda folder, **overrides: AutoConfig.from_pretrained(folder, **overrides),
    "GrinMoeConfig.from_pretrained": lambda folder, **overrides: GrinMoeConfig.from_pretrained(folder, **overrides),
    "from_dict": lambda folder, **overrides: GrinMoeConfig.from_dict(tiny_config().to_dict(), **overrides),
}


@pytest.mark.parametrize("path", OVERRIDE_PATHS)
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"router_type": "sparsemixer-v2"}, "router_type"),  # the hyphen: it routed with softmax top-k, silently
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
        ({"num_local_experts": 0}, "num_local_experts"),
        ({"num_experts": 0}, "num_local_experts"),
        ({"norm_type": "RMSNorm"}, "norm_type"),  # it built a LayerNorm
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta"),
    ],
)
def test_overrides_are_validated_on_every_loading_path(tmp_path, path, overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        OVERRIDE_PATHS[path](_save_tiny_config(tmp_path), **overrides)


def test_model_from_pretrained_validates_its_config_overrides(tmp_path):
    GrinMoeForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`router_type`"):
        GrinMoeForCausalLM.from_pretrained(tmp_path, router_type="sparsemixer-v2")
    model = GrinMoeForCausalLM.from_pretrained(tmp_path, router_type="softmax_topk", output_router_logits=True)
    assert model.config.router_type == "softmax_topk" and model.config.output_router_logits


@pytest.mark.parametrize("path", OVERRIDE_PATHS)
def test_related_overrides_are_validated_together_in_any_order(tmp_path, path):
    """4 experts top-2 -> 1 expert top-1: one field at a time, num_local_experts=1 first would be out of range."""
    config = OVERRIDE_PATHS[path](_save_tiny_config(tmp_path), num_local_experts=1, num_experts_per_tok=1)
    assert (config.num_local_experts, config.num_experts_per_tok) == (1, 1)


def test_assignment_is_validated_and_a_rejected_value_is_rolled_back():
    config = tiny_config()
    for field, value in (("num_experts_per_tok", 99), ("router_type", "sparsemixer-v2"), ("num_experts", 0),
                         ("pad_token_id", 96), ("rope_parameters", {"rope_type": "bogus", "rope_theta": 1e4})):
        before = config.to_dict()
        with pytest.raises(ValueError, match="must be"):
            setattr(config, field, value)
        assert config.to_dict() == before, field  # loses nothing: the config still holds its valid value
    config.num_experts_per_tok = 1
    assert config.num_experts_per_tok == 1


def test_transformers_own_attributes_stay_settable():
    config = tiny_config()
    config._attn_implementation = "eager"
    config._experts_implementation = "fused"
    config.dtype = torch.bfloat16
    config.architectures = ["GrinMoeForCausalLM"]
    config.use_cache = False
    assert config._experts_implementation == "fused" and config.dtype == torch.bfloat16


def test_update_sets_related_fields_together_or_not_at_all():
    config = tiny_config()
    config.update({"num_local_experts": 1, "num_experts_per_tok": 1})
    assert (config.num_local_experts, config.num_experts_per_tok) == (1, 1)
    before = config.to_dict()
    with pytest.raises(ValueError, match="`router_type`"):
        config.update({"num_local_experts": 8, "router_type": "expert_choice"})
    assert config.to_dict() == before
    with pytest.raises(StrictDataclassFieldValidationError):  # a type error half-way: the first field is undone too
        config.update({"num_local_experts": 8, "num_experts_per_tok": "2"})
    assert config.to_dict() == before
    with pytest.raises(ValueError, match="`num_experts_per_tok`"):  # and assignments are checked again afterwards
        config.num_experts_per_tok = 99


def test_save_refuses_a_config_made_invalid_behind_validations_back(tmp_path):
    config = tiny_config()
    config.__dict__["num_experts_per_tok"] = 99
    with pytest.raises(Exception, match="num_experts_per_tok"):  # @strict's class validation, run by save_pretrained
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_mh_moe_fields_are_validated_on_assignment_and_override(tmp_path):
    config = load_preset("mh-moe-tiny")
    with pytest.raises(ValueError, match="`moe_heads`"):
        config.moe_heads = 5
    with pytest.raises(ValueError, match="`moe_heads`"):
        load_preset("mh-moe-tiny", moe_heads=5)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`dense_intermediate_size`"):
        AutoConfig.from_pretrained(tmp_path, dense_intermediate_size=0)


def test_copies_of_a_config_keep_validating():
    import copy
    import pickle

    for copied in (copy.deepcopy(tiny_config()), pickle.loads(pickle.dumps(tiny_config()))):
        with pytest.raises(ValueError, match="`num_experts_per_tok`"):
            copied.num_experts_per_tok = 99


def test_load_preset_refuses_an_override_that_is_no_field():
    """A misspelt override was dropped without a word, leaving the preset's value."""
    with pytest.raises(ValueError, match="'num_expert_per_tok' is not a field of GrinMoeConfig"):
        load_preset("grin-moe-tiny", num_expert_per_tok=1)
