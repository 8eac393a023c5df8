"""Run by tests/test_tensor_parallel.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU): load a saved
model with transformers' tensor parallelism (`tp_plan="auto"`: the model's `base_model_tp_plan` over both ranks),
check that the plan really sharded the big weights, take one training step's forward and backward on the batch
given, then decode greedily with the cache; write rank 0's logits, loss, every gradient (reassembled from the
shards), generated tokens and per-step scores.

    tensor_parallel_worker.py MODEL_DIR INPUTS.safetensors OUT.safetensors RUNS NEW_TOKENS

RUNS: comma-separated `EXPERTS_IMPLEMENTATION:LOADING` (e.g. `eager:tp_plan,fused:distributed_config`), each loaded
afresh in this process group; its results are written under the prefix `EXPERTS_IMPLEMENTATION.`. LOADING is
`tp_plan` (`from_pretrained(path, tp_plan="auto")`, a shorthand transformers 5.24 still accepts with a
FutureWarning) or `distributed_config` (`DistributedConfig(tp_plan="auto")`, the current spelling).
"""

import sys
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import modeling_grin  # noqa: F401  (registers the model classes and the fused experts)

model_dir, inputs_path, output_path, runs, new_tokens = sys.argv[1:6]
input_ids = load_file(inputs_path)["input_ids"]


def load(experts_implementation, loading):
    if loading == "tp_plan":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Passing `tp_plan` directly", FutureWarning)
            return AutoModelForCausalLM.from_pretrained(
                model_dir, tp_plan="auto", experts_implementation=experts_implementation
            )
    return AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_plan="auto"), experts_implementation=experts_implementation
    )


# The parameters a TP plan must split (dimension of the split): attention heads, every expert's intermediate features,
# MH-MoE's dense SwiGLU layers and shared expert, the vocabulary rows of the embeddings and the head. A rule that
# names nothing leaves its module replicated with every output still right, so the numbers alone would not show it.
SHARDED = {
    "self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 0, "self_attn.v_proj.weight": 0,
    "self_attn.o_proj.weight": 1,
    "experts.gate_up_proj": 1, "experts.down_proj": 2,
    "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1,
    "shared_expert.gate_proj.weight": 0, "shared_expert.up_proj.weight": 0, "shared_expert.down_proj.weight": 1,
    "embed_tokens.weight": 0, "lm_head.weight": 0,
}  # fmt: skip


def check_sharding(model, world_size):
    checked = set()
    for name, parameter in model.named_parameters():
        suffix = next((suffix for suffix in SHARDED if name.endswith(suffix)), None)
        if suffix is None:
            continue
        dim, full_size = SHARDED[suffix], parameter.shape[SHARDED[suffix]]  # a DTensor reports the global shape
        local = parameter.to_local().shape[dim] if isinstance(parameter, DTensor) else full_size
        # DTensor splits as torch.chunk: ceil(size / world_size) on every rank but the last (e.g. a vocabulary of 99)
        chunk = -(-full_size // world_size)
        assert local in (chunk, full_size - (world_size - 1) * chunk), f"{name}: {local} of {full_size} on dim {dim}"
        checked.add(suffix)
    assert "experts.gate_up_proj" in checked and "self_attn.q_proj.weight" in checked, checked
    return checked


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


results = {}
for run in runs.split(","):
    experts_implementation, loading = run.split(":")
    model = load(experts_implementation, loading)
    world_size = torch.distributed.get_world_size()
    assert world_size == 2 and model._tp_size == 2, "tensor parallelism is not active"
    assert model.config._experts_implementation == experts_implementation
    check_sharding(model, world_size)

    # One training step's forward and backward, as the single process takes it (`torch.manual_seed(0)` there too):
    # GRIN's SparseMixer-v2 samples experts and jitters its input in training. Router and jitter run replicated, so
    # the ranks must draw the same numbers, i.e. share the seed (as Trainer's and Accelerate's `set_seed` do); with
    # a seed per rank each rank sums its shard of differently chosen experts, silently wrong.
    model.train()
    torch.manual_seed(0)
    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    model.eval()
    prefix = f"{experts_implementation}."
    results[prefix + "logits"] = full(output.logits).detach()
    results[prefix + "loss"] = full(output.loss).detach()
    for name, parameter in model.named_parameters():
        results[f"{prefix}grad.{name}"] = full(parameter.grad).detach()

    with torch.no_grad():  # inference: the TP layers' local fast paths (no DTensor), the cache with half the kv heads
        generated = model.generate(
            input_ids[:1], max_new_tokens=int(new_tokens), do_sample=False, use_cache=True,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    results[prefix + "generated"] = generated.sequences
    results[prefix + "scores"] = torch.stack(generated.scores)
    del model, output

if torch.distributed.get_rank() == 0:
    save_file({name: tensor.contiguous() for name, tensor in results.items()}, output_path)
# No destroy_process_group(): with the tensor-parallel mesh transformers built, it leaves the process hanging at
# exit (torch 2.13, gloo); the launcher ends the group with the processes.
