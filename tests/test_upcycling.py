import json

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from modeling_grin import GrinMoeForCausalLM
from modeling_grin.cli import main
from modeling_grin.conversion import ConversionError, upcycle_checkpoint

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
