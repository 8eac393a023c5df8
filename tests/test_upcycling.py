import subprocess
import sys

import pytest
import torch
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
    script = [sys.executable, "conversion_scripts/upcycle_dense.py", str(tmp_path / "dense"), str(tmp_path / "b"),
              "--num-experts", "2", "--top-k", "1", "--verify"]
    assert subprocess.run(script, capture_output=True, text=True).returncode == 0
