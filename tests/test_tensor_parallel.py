"""transformers' tensor parallelism (`from_pretrained(path, tp_plan="auto")`) on two CPU processes (gloo): both model
families, with the eager and the `fused` experts, give the single-process logits, loss, gradients and greedy tokens.

What transformers' own TP tests (`tests/test_tensor_parallel_mixin.py` in its sdist) check, for our models: the plan
shards the attention heads, the experts and the embeddings (an unsharded module gives right numbers too, so the
worker checks the local shapes); forward, backward (per-parameter gradients) and cached greedy generation match one
process at 1e-5; uneven vocabulary shards (GRIN's 99 rows here) and tied embeddings (MH-MoE's here) work.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_model
from safetensors.torch import load_file, save_file
from test_mh_moe import tiny_mh_model

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).parent / "distributed" / "tensor_parallel_worker.py"
NEW_TOKENS = 6
# eager loads with the `tp_plan="auto"` shorthand, fused with `DistributedConfig(tp_plan="auto")`: both spellings
RUNS = {"eager": "tp_plan", "fused": "distributed_config"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def build(family):
    if family == "grin":
        # 4 heads / 2 kv heads, 4 experts, LayerNorm, biases, sliding window 6 < the 9 + 6 tokens; a vocabulary of 99
        # does not divide by 2: the last rank holds the shorter slice of the embeddings and of the head.
        return tiny_model(vocab_size=99)
    # layer 0 dense SwiGLU, layer 1 MH-MoE (3 sub-tokens of 8 per token, 6 experts) with a shared expert; biases in
    # the dense layers and the head/merge projections; the head tied to the embeddings.
    return tiny_mh_model(
        moe_layer_frequency=2, shared_expert_intermediate_size=16, mlp_bias=True, tie_word_embeddings=True
    )


def single_process_reference(model, input_ids, experts_implementation):
    model.set_experts_implementation(experts_implementation)
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(0)  # as the worker: SparseMixer-v2 samples in training
    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    model.eval()
    with torch.no_grad():
        generated = model.generate(
            input_ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    grads = {f"grad.{name}": parameter.grad for name, parameter in model.named_parameters()}
    return {
        "logits": output.logits.detach(),
        "loss": output.loss.detach(),
        **grads,
        "generated": generated.sequences,
        "scores": torch.stack(generated.scores),
    }


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-6)).item()


@pytest.mark.parametrize("family", ["grin", "mh_moe"])
def test_two_tensor_parallel_processes_match_one(tmp_path, family):
    model = build(family)
    model.save_pretrained(tmp_path / "model")
    input_ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": input_ids}, tmp_path / "inputs.safetensors")

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", free_port(), WORKER, tmp_path / "model", tmp_path / "inputs.safetensors",
               tmp_path / "out.safetensors", ",".join(f"{name}:{loading}" for name, loading in RUNS.items()),
               NEW_TOKENS]  # fmt: skip
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    distributed = load_file(tmp_path / "out.safetensors")

    for experts_implementation in RUNS:
        reference = single_process_reference(model, input_ids, experts_implementation)
        got = {name.removeprefix(f"{experts_implementation}."): tensor for name, tensor in distributed.items()
               if name.startswith(f"{experts_implementation}.")}  # fmt: skip
        assert got.keys() == reference.keys(), (experts_implementation, got.keys() ^ reference.keys())
        assert torch.equal(got.pop("generated"), reference.pop("generated")), experts_implementation
        errors = {name: relative_error(got[name], expected) for name, expected in reference.items()}
        bad = {name: error for name, error in errors.items() if error > 1e-5}
        assert not bad, (experts_implementation, bad)
        assert (got["logits"] - reference["logits"]).abs().max() <= 1e-5, experts_implementation
