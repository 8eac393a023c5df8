"""Run by tests/test_expert_parallel.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU): load a saved
model with transformers' expert parallelism (each rank holds half of every layer's experts), run one forward and
backward on the batch given, and write rank 0's logits, loss and full gradients; for each case in turn, in one launch
(starting the two processes costs more than a case).

    expert_parallel_worker.py INPUTS.safetensors EXPERTS_IMPLEMENTATION MODEL_DIR:EP_IMPLEMENTATION:OUT.safetensors...

EP_IMPLEMENTATION: `all_to_all` (experts sharded over 2 FSDP ranks, tokens exchanged; the experts see local ids
only) or `all_reduce` (dense modules tensor-parallel over the same 2 ranks, every rank runs its experts on the whole
batch: pairs of the other rank's experts reach the experts as sentinel ids).
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import modeling_grin  # noqa: F401  (registers the model classes and the fused experts)


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def run_case(model_dir: str, ep_implementation: str, output_path: str) -> None:
    if ep_implementation == "all_to_all":
        distributed_config = DistributedConfig(ep_size=2, fsdp_size=2, ep_implementation="all_to_all")
    else:
        distributed_config = DistributedConfig(ep_size=2, tp_size=2, ep_implementation="all_reduce")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=distributed_config, experts_implementation=experts_implementation
    )
    experts = model.model.layers[-1].mlp.experts
    assert experts.num_experts == model.config.num_local_experts // 2, "the experts were not split over the ranks"

    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    results = {"logits": full(output.logits).detach(), "loss": full(output.loss).detach()}
    for name, parameter in model.named_parameters():
        results[f"grad.{name}"] = full(parameter.grad).detach()
    if torch.distributed.get_rank() == 0:
        save_file({name: tensor.contiguous() for name, tensor in results.items()}, output_path)


inputs_path, experts_implementation, *cases = sys.argv[1:]
input_ids = load_file(inputs_path)["input_ids"]
for case in cases:
    run_case(*case.split(":"))
# No destroy_process_group(): with the tensor-parallel mesh transformers built, it leaves the process hanging at
# exit (torch 2.13, gloo); the launcher ends the group with the processes.
