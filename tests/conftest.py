import json
import socket
from pathlib import Path

import pytest
import torch

import modeling_grin  # noqa: F401  (registers the Auto classes)
from modeling_grin import GrinMoeConfig, GrinMoeForCausalLM

# The config.json of the released microsoft/GRIN-MoE checkpoint (values from the Hub), shrunk only in size fields.
RELEASED_GRIN_CONFIG = {
    "architectures": ["GRIN-MoE"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_grinmoe.GRINMoEConfig",
        "AutoModelForCausalLM": "modeling_grinmoe.GRINMoEForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "input_jitter_noise": 0.01,
    "intermediate_size": 6400,
    "lm_head_bias": True,
    "max_position_embeddings": 4096,
    "model_type": "grinmoe",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 16,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.0,
    "router_jitter_noise": 0.01,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.2",
    "use_cache": True,
    "vocab_size": 32064,
}

TINY_SIZES = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "max_position_embeddings": 64,
    "sliding_window": 6,
    "eos_token_id": 95,
    "pad_token_id": 0,
}


def tiny_config(**overrides) -> GrinMoeConfig:
    return GrinMoeConfig(**{**TINY_SIZES, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GrinMoeForCausalLM:
    torch.manual_seed(seed)
    model = GrinMoeForCausalLM(tiny_config(**overrides)).eval()
    # Larger-than-init weights so routing, attention and biases all matter in the comparisons.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def rewrite_as_phimoe(folder: Path) -> None:
    """Turn a saved GRIN-MoE folder into one transformers' PhimoeForCausalLM reads (same weights, same keys)."""
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="phimoe", architectures=["PhimoeForCausalLM"])
    if config.get("head_dim") is None:
        config.pop("head_dim", None)  # Phimoe reads getattr(config, "head_dim", default)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def released_grin_folder(tmp_path) -> Path:
    """A folder in the released GRIN-MoE format: its config schema and per-expert safetensors keys."""
    from safetensors.torch import save_file

    config = {**RELEASED_GRIN_CONFIG, **{k: v for k, v in TINY_SIZES.items() if k != "pad_token_id"}}
    model = tiny_model()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts")
            for expert, weight in enumerate(tensor):
                w1, w3 = weight.chunk(2, dim=0)
                state[f"{prefix}.{expert}.w1.weight"] = w1.clone()
                state[f"{prefix}.{expert}.w3.weight"] = w3.clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts")
            for expert, weight in enumerate(tensor):
                state[f"{prefix}.{expert}.w2.weight"] = weight.clone()
        else:
            state[name.replace("mlp.router.", "block_sparse_moe.gate.")] = tensor.clone()
    folder = tmp_path / "released-grin"
    folder.mkdir()
    bf16_state = {name: tensor.to(torch.bfloat16) for name, tensor in state.items()}
    save_file(bf16_state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def free_port() -> int:
    """A TCP port free right now, for a test's own torch.distributed rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
