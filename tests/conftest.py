import json
import socket
import sys
import warnings
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


# Phi-3.5-MoE's longrope scheme at tiny size: the original context of 8 tokens is outgrown by the tests' sequences.
LONGROPE_SCALING = {
    "type": "longrope",
    "short_factor": [1.0, 1.2, 1.5, 2.0],
    "long_factor": [1.5, 2.5, 4.0, 8.0],
    "short_mscale": 1.1,
    "long_mscale": 1.243163121016122,
    "original_max_position_embeddings": 8,
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


def left_padded(input_ids):
    """Rows padded on the left by 0, 2, 4, ... tokens, as batched generation sees them."""
    attention_mask = torch.ones_like(input_ids)
    for row in range(input_ids.shape[0]):
        attention_mask[row, : 2 * row] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


@torch.no_grad()
def peak_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights under which every token's context decides its prediction, so a lost cache changes the tokens.

    With normal(0, 0.2) everywhere a tiny model predicts nearly one token whatever the input (the norms' and biases'
    noise dominates), and comparisons of generated tokens pass vacuously. Here norms are the identity, biases small,
    embeddings and the LM head of unit scale, the rest large enough that attention and routing both matter.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        elif "embed_tokens" in name or "lm_head" in name:
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        else:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def informative_model(seed: int = 0, **overrides) -> GrinMoeForCausalLM:
    """`tiny_model` with peaked weights (see `peak_weights_`), for generation and cache tests."""
    return peak_weights_(GrinMoeForCausalLM(tiny_config(**overrides)).eval(), seed)


@torch.no_grad()
def assert_informative(model, input_ids: torch.Tensor, new_tokens: int = 12) -> None:
    """Fail if a comparison of generated tokens could pass vacuously on this model.

    Checks that greedy decoding does not repeat a few tokens, that decoding each step from its last token alone (what
    a forgotten cache amounts to) changes most predictions, and that routing spreads over several experts.
    """
    sequences = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, use_cache=False,
                               pad_token_id=0, eos_token_id=None)
    generated = sequences[:, input_ids.shape[1]:]
    assert generated.unique().numel() >= generated.numel() // 3, f"greedy tokens barely vary: {generated.tolist()}"
    with_context = model(sequences).logits.argmax(-1)
    last_token_only = model(sequences.reshape(-1, 1)).logits.argmax(-1).reshape(sequences.shape)
    changed = (with_context != last_token_only)[:, input_ids.shape[1] - 1 : -1].float().mean().item()
    assert changed >= 0.5, f"the context changes only {changed:.0%} of the predictions"
    router_logits = model(sequences, output_router_logits=True).router_logits
    top_k = model.config.num_experts_per_tok
    used = torch.cat([logits.topk(top_k, dim=-1).indices.flatten() for logits in router_logits]).unique().numel()
    assert used >= min(3, model.config.num_local_experts), f"routing uses only {used} experts"


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


# ------------------------------------------------------------------------------------------- upstream drift guard

OUR_MODULES = ("modeling_grin", "transformers_modules")  # the package and its exported remote-code copies


def _top_package(frame) -> str:
    return (frame.f_globals.get("__name__") or "").split(".")[0]


def deprecated_use_by_our_code(emitting_frame) -> str | None:
    """The module of ours that called the warning library's API, or None when someone else did.

    pyproject's filters catch warnings attributed to our modules; libraries that warn with the default stacklevel
    attribute the warning to themselves (transformers' `gradient_checkpointing_enable`, say). So walk out of the
    emitting package and look at who called into it.
    """
    library, frame = _top_package(emitting_frame), emitting_frame
    if library.startswith(OUR_MODULES):
        return None  # our own warnings are pyproject's business
    while frame is not None and _top_package(frame) in (library, "functools", "contextlib"):
        frame = frame.f_back
    caller = frame.f_globals.get("__name__", "") if frame is not None else ""
    return caller if caller.startswith(OUR_MODULES) else None


@pytest.fixture(autouse=True)
def deprecations_reached_from_our_code_fail(monkeypatch):
    """A FutureWarning or DeprecationWarning for an API our code calls is an error: it is upstream drift."""
    original_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None):
        if category is None:
            category = type(message) if isinstance(message, Warning) else UserWarning
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            caller = deprecated_use_by_our_code(sys._getframe(1))
            if caller is not None:
                raise category(f"{message} [reached from {caller}]")
        return original_warn(message, category, stacklevel + 1, source)

    monkeypatch.setattr(warnings, "warn", warn)


def run_script(script: str, *arguments: str) -> None:
    """Run a script of the repository (`conversion_scripts/...`) as `python SCRIPT ARGS...` would, in this process (a
    child would spend seconds importing torch again); fail unless it exits with 0."""
    import runpy

    path = Path(__file__).resolve().parent.parent / script
    saved = sys.argv
    sys.argv = [str(path), *arguments]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{script} exited with {exit_.code}"
    finally:
        sys.argv = saved
