import json

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from modeling_grin import GrinMoeForCausalLM
from modeling_grin.cli import main
from modeling_grin.conversion import ConversionError, upcycle_checkpoint, upcycled_config

SIZES = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=79)


def dense_model(kind):
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**SIZES)) if kind == "llama" else Phi3ForCausalLM(Phi3Config(**SIZES))).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_upcycled_model_computes_the_dense_function(tmp_path, kind):
    dense = dense_model(kind)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    summary = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, verify=True)
    assert summary["logits_difference"] <= 1e-5
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(moe) is GrinMoeForCausalLM and moe.config.num_local_experts == 4 and moe.config.norm_type == "rmsnorm"
    experts = moe.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[3])
    input_ids = torch.randint(1, 80, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (moe(input_ids).logits - dense(input_ids).logits).abs().max() <= 1e-5


def test_verify_leaves_the_logits_alone_when_the_upcycled_model_is_meant_to_differ(tmp_path):
    """SparseMixer-v2's weights do not sum to one, so its upcycled model computes another function: --verify checks
    the tensors only."""
    dense_model("llama").save_pretrained(tmp_path / "dense")
    summary = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, verify=True,
                                 router_type="sparsemixer_v2")
    assert summary["verified"] and summary["logits_difference"] is None


def test_noise_breaks_the_symmetry_reproducibly(tmp_path):
    dense_model("llama").save_pretrained(tmp_path / "dense")
    for name in ("a", "b"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / name, num_experts=3, top_k=1, noise_std=0.05, seed=7,
                           router_type="sparsemixer_v2")
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("a", "b"))
    experts = a.model.layers[0].mlp.experts.down_proj
    assert not torch.equal(experts[0], experts[1])
    assert torch.equal(experts, b.model.layers[0].mlp.experts.down_proj)
    assert a.config.router_type == "sparsemixer_v2"


def test_bad_requests(tmp_path):
    dense_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ConversionError, match="num_experts_per_tok"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", num_experts=2, top_k=3)
    grin = tmp_path / "grin"
    grin.mkdir()
    (grin / "config.json").write_text('{"model_type": "grinmoe"}')
    with pytest.raises(ConversionError, match="upcycling reads"):
        upcycle_checkpoint(grin, tmp_path / "out", num_experts=2, top_k=1)
    assert not (tmp_path / "out").exists()


def test_cli_and_script(tmp_path, capsys):
    dense_model("llama").save_pretrained(tmp_path / "dense")
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "a"), "--num-experts", "4", "--top-k", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    run_script("conversion_scripts/upcycle_dense.py", str(tmp_path / "dense"), str(tmp_path / "b"), "--num-experts",
               "2", "--top-k", "1", "--verify")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_local_experts"] == 2


def saved_dense(tmp_path, kind, edit=None, **overrides):
    torch.manual_seed(0)
    config = (LlamaConfig if kind == "llama" else Phi3Config)(**{**SIZES, **overrides})
    model = LlamaForCausalLM(config) if kind == "llama" else Phi3ForCausalLM(config)
    model.save_pretrained(tmp_path / "dense")
    if edit is not None:
        weights = load_file(tmp_path / "dense" / "model.safetensors")
        edit(weights)
        save_file(weights, tmp_path / "dense" / "model.safetensors", metadata={"format": "pt"})
    return tmp_path / "dense"


@pytest.mark.parametrize("kind, edit, message", [
    ("llama", lambda w: w.pop("model.layers.1.self_attn.q_proj.weight"),
     "model.layers.1.self_attn.q_proj.weight is missing from the source"),
    ("llama", lambda w: w.pop("model.norm.weight"), "model.norm.weight is missing from the source"),
    ("llama", lambda w: w.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(30, 32)}),
     r"model.layers.0.self_attn.q_proj.weight has shape \(30, 32\), the config implies \(32, 32\)"),
    ("llama", lambda w: w.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(40, 32)}),
     r"experts.0.w3.weight \(from model.layers.0.mlp.up_proj.weight\) has shape \(40, 32\), the config implies "
     r"\(48, 32\)"),
    ("phi3", lambda w: w.update({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(60, 32)}),
     r"model.layers.0.self_attn.qkv_proj.weight has shape \(60, 32\), the config implies \(64, 32\)"),
    ("phi3", lambda w: w.update({"model.layers.0.mlp.gate_up_proj.weight": torch.zeros(95, 32)}),
     r"model.layers.0.mlp.gate_up_proj.weight has shape \(95, 32\), the config implies \(96, 32\)"),
    ("phi3", lambda w: w.update({"model.layers.0.self_attn.qkv_proj.bias": torch.zeros(64)}),  # Phi-3 has none
     r"^model.layers.0.self_attn.qkv_proj.bias is not a tensor of the model the config describes$"),
])
def test_incomplete_or_misshapen_dense_checkpoints_are_refused_before_writing(tmp_path, monkeypatch, kind, edit,
                                                                              message):
    import modeling_grin.conversion as conversion

    source = saved_dense(tmp_path, kind, edit)
    monkeypatch.setattr(conversion, "save_file", lambda *args, **kwargs: pytest.fail("written before the checks"))
    with pytest.raises(ConversionError, match=message):
        upcycle_checkpoint(source, tmp_path / "moe", num_experts=2, top_k=1, verify=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dense"]


def test_mlp_biases_are_refused_not_dropped(tmp_path):
    source = saved_dense(tmp_path, "llama", mlp_bias=True)
    with pytest.raises(ConversionError, match="mlp_bias=true, but GRIN-MoE experts have no biases"):
        upcycle_checkpoint(source, tmp_path / "moe", num_experts=2, top_k=1)
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("flag", ["--noise-std", "--router-init-std"])
@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "x"])
def test_non_finite_or_negative_standard_deviations_are_usage_errors(tmp_path, capsys, flag, value):
    argv = ["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "2", "--top-k", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, f"{flag}={value}"])
    assert exit_info.value.code == 2 and f"argument {flag}: must be a" in capsys.readouterr().err
    source = saved_dense(tmp_path, "llama") if not (tmp_path / "dense").exists() else tmp_path / "dense"
    keyword = flag[2:].replace("-", "_")
    if value != "x":
        with pytest.raises(ConversionError, match=f"{keyword} must be a finite number >= 0"):
            upcycle_checkpoint(source, tmp_path / "moe", num_experts=2, top_k=1, **{keyword: float(value)})
    assert not (tmp_path / "moe").exists()


def test_a_bad_phi3_checkpoint_is_one_line_on_the_command_line(tmp_path, capsys):
    source = saved_dense(tmp_path, "phi3", lambda w: w.update(
        {"model.layers.1.self_attn.qkv_proj.weight": torch.zeros(64, 31)}))
    capsys.readouterr()
    assert main(["upcycle", str(source), str(tmp_path / "moe"), "--num-experts", "2", "--top-k", "1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["grin-moe upcycle: error: model.layers.1.self_attn.qkv_proj.weight has shape (64, 31), the "
                     "config implies (64, 32)"]


# ----- the upcycled config, written out ------------------------------------------------------------------------------

LLAMA_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 80, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 5e5,
    "bos_token_id": 1, "eos_token_id": 79, "pad_token_id": 0, "tie_word_embeddings": False,
    "attention_dropout": 0.0, "attention_bias": True, "mlp_bias": False, "torch_dtype": "float16",
    "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
}  # fmt: skip


def test_upcycled_config_keeps_the_dense_fields_and_adds_the_moe_ones():
    config = upcycled_config(dict(LLAMA_CONFIG), num_experts=6, top_k=2, router_type="sparsemixer_v2")
    dense_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                    "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
                    "attention_dropout", "torch_dtype")
    assert config == {
        **{key: LLAMA_CONFIG[key] for key in dense_fields},
        "model_type": "grinmoe", "architectures": ["GrinMoeForCausalLM"], "norm_type": "rmsnorm",
        "attention_bias": True, "lm_head_bias": False, "sliding_window": None, "num_local_experts": 6,
        "num_experts_per_tok": 2, "router_type": "sparsemixer_v2", "router_renormalize": True,
        "input_jitter_noise": 0.0,
    }  # fmt: skip
    mistral = {**LLAMA_CONFIG, "model_type": "mistral", "sliding_window": 16}
    del mistral["attention_bias"]
    config = upcycled_config(mistral, num_experts=2, top_k=1, router_type="softmax_topk", dtype="bfloat16")
    assert (config["sliding_window"], config["attention_bias"], config["dtype"]) == (16, False, "bfloat16")
    assert "torch_dtype" not in config  # the cast replaces the source's dtype, under its current name


def test_fields_the_dense_file_leaves_out_keep_the_dense_classes_meaning():
    """GRIN-MoE's defaults are not the dense classes': left out, a field is written with the dense class's default."""
    omitted = ("num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
               "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_bias")
    llama = {key: value for key, value in LLAMA_CONFIG.items() if key not in omitted}
    config = upcycled_config(llama, num_experts=2, top_k=1, router_type="softmax_topk")
    expected = {"num_key_value_heads": 4, "head_dim": 8, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
                "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_bias": False}
    assert {key: config.get(key) for key in (*expected, "pad_token_id")} == {**expected, "pad_token_id": None}
    mistral = {key: value for key, value in llama.items() if key != "num_attention_heads"}
    config = upcycled_config({**mistral, "model_type": "mistral", "num_attention_heads": 8}, num_experts=2, top_k=1,
                             router_type="softmax_topk")
    assert (config["sliding_window"], config["num_key_value_heads"], config["head_dim"]) == (4096, 8, 4)
    with pytest.raises(ConversionError, match="config.json is not a valid llama config: .*hidden_act"):
        upcycled_config({**LLAMA_CONFIG, "hidden_act": 5}, num_experts=2, top_k=1, router_type="softmax_topk")


@pytest.mark.parametrize("rope, expected_theta", [
    ({}, 10000.0),  # the dense classes' default, spelled out
    ({"rope_theta": 5e5}, 5e5),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 2e5}}, None),
    ({"rope_scaling": {"rope_type": "default", "rope_theta": 3e5}}, None),  # (its older name)
])  # fmt: skip
def test_rope_theta_is_spelled_out_only_when_the_dense_config_sets_no_rope(rope, expected_theta):
    dense = {key: value for key, value in LLAMA_CONFIG.items() if key != "rope_theta"}
    config = upcycled_config({**dense, **rope}, num_experts=2, top_k=1, router_type="softmax_topk")
    assert config.get("rope_theta") == expected_theta
    for key in ("rope_parameters", "rope_scaling"):
        assert config.get(key) == rope.get(key)


def test_refusals_of_the_dense_config_name_what_is_wrong():
    with pytest.raises(ConversionError) as error:
        upcycled_config({**LLAMA_CONFIG, "model_type": "gemma"}, num_experts=2, top_k=1, router_type="softmax_topk")
    assert str(error.value) == "upcycling reads llama, mistral, phi3 checkpoints, got model_type 'gemma'"
    with pytest.raises(ConversionError) as error:
        upcycled_config({**LLAMA_CONFIG, "mlp_bias": True}, num_experts=2, top_k=1, router_type="softmax_topk")
    assert str(error.value) == ("config.json has mlp_bias=true, but GRIN-MoE experts have no biases; upcycling "
                                "would drop them")


# ----- the upcycled tensors ------------------------------------------------------------------------------------------


def documented_draw(seed: int, shape, *, layer: int, expert: int | None = None, matrix: str | None = None):
    """The N(0, 1) draws upcycle_checkpoint documents: the noise of (layer, expert, matrix) and a layer's router."""
    if expert is None:
        offset = layer
    else:
        offset = layer * 10_007 + expert * 3 + ("gate_proj", "up_proj", "down_proj").index(matrix)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + offset))


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_noise_and_router_are_the_documented_seeded_draws(tmp_path, kind):
    """Expert e of layer l is dense + noise_std * std(matrix) * N(0, 1) drawn per (seed, l, e, matrix), the router
    router_init_std * N(0, 1) per (seed, l): reproducible across releases and independent of sharding. Phi-3's fused
    gate_up is split first, each half drawn as its own matrix."""
    dense = dense_model(kind)
    dense.save_pretrained(tmp_path / "dense")
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=3, top_k=1, noise_std=1.0,
                       router_init_std=0.5, seed=5, router_type="sparsemixer_v2")
    moe = GrinMoeForCausalLM.from_pretrained(tmp_path / "moe")
    for layer, (dense_layer, moe_layer) in enumerate(zip(dense.model.layers, moe.model.layers, strict=True)):
        mlp = dense_layer.mlp
        if kind == "phi3":
            gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        else:
            gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        matrices = {"gate_proj": gate, "up_proj": up, "down_proj": mlp.down_proj.weight}
        experts = moe_layer.mlp.experts
        for expert in range(3):
            noisy = {name: matrix + matrix.std() * documented_draw(5, matrix.shape, layer=layer, expert=expert,
                                                                   matrix=name)
                     for name, matrix in matrices.items()}  # fmt: skip
            expected_gate_up = torch.cat([noisy["gate_proj"], noisy["up_proj"]])
            torch.testing.assert_close(experts.gate_up_proj[expert], expected_gate_up, rtol=0, atol=1e-6)
            torch.testing.assert_close(experts.down_proj[expert], noisy["down_proj"], rtol=0, atol=1e-6)
        router = moe_layer.mlp.router.weight
        torch.testing.assert_close(router, 0.5 * documented_draw(5, router.shape, layer=layer), rtol=0, atol=0)


def test_defaults_router_std_seed_no_verification_and_no_replacing(tmp_path):
    dense_model("llama").save_pretrained(tmp_path / "dense")
    summary = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2)
    assert summary["verified"] is False and summary["logits_difference"] is None
    router = GrinMoeForCausalLM.from_pretrained(tmp_path / "moe").model.layers[1].mlp.router.weight
    assert torch.equal(router, 0.02 * documented_draw(0, router.shape, layer=1))  # router_init_std 0.02, seed 0
    with pytest.raises(ConversionError, match="exists; pass --force to replace it"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=2, top_k=1)
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=2, top_k=1, force=True)
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["num_local_experts"] == 2


def test_a_16_bit_checkpoint_stays_16_bit_and_dtype_casts_everything(tmp_path):
    dense_model("phi3").to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "kept", num_experts=2, top_k=1, noise_std=0.1)
    assert {tensor.dtype for tensor in load_file(tmp_path / "kept" / "model.safetensors").values()} == {torch.bfloat16}
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "cast", num_experts=2, top_k=1, noise_std=0.1, dtype="float32")
    assert {tensor.dtype for tensor in load_file(tmp_path / "cast" / "model.safetensors").values()} == {torch.float32}
    assert json.loads((tmp_path / "cast" / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(ConversionError) as error:
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "bad", num_experts=2, top_k=1, dtype="float64")
    assert str(error.value) == "--dtype must be one of float32, bfloat16, float16, got 'float64'"


def test_phi3_with_its_own_head_dim_and_no_num_key_value_heads_computes_the_dense_function(tmp_path):
    """q, k and v are split by head_dim when the config sets one; without num_key_value_heads there are as many as
    query heads (Phi-3's default)."""
    sizes = {**SIZES, "head_dim": 16, "num_key_value_heads": 4}
    torch.manual_seed(0)
    dense = Phi3ForCausalLM(Phi3Config(**sizes)).eval()
    dense.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    del config["num_key_value_heads"]
    (tmp_path / "dense" / "config.json").write_text(json.dumps(config))
    summary = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=2, top_k=1, verify=True)
    assert summary["logits_difference"] <= 1e-5
