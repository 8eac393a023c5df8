"""Run by tests/test_losses.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU): each rank computes the
global load-balancing loss and z-loss of its half of a batch and writes the mean over ranks and its router gradient."""

import sys

import torch
from safetensors.torch import load_file, save_file

from modeling_grin.losses import load_balancing_loss

torch.distributed.init_process_group("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
data = load_file(sys.argv[1])
logits_per_layer = [data[f"layer{i}"].chunk(world)[rank].clone().requires_grad_(True) for i in range(2)]
mask = data["mask"].chunk(world)[rank]
loss = load_balancing_loss(tuple(logits_per_layer), 6, 2, mask, global_balance=True)
loss.backward()
mean_loss = loss.detach().clone()
torch.distributed.all_reduce(mean_loss)
mean_loss /= world
gradients = []
for logits in logits_per_layer:
    gathered = [torch.empty_like(logits.grad) for _ in range(world)]
    torch.distributed.all_gather(gathered, logits.grad / world)  # what DDP's gradient averaging applies
    gradients.append(torch.cat(gathered))
if rank == 0:
    save_file({"loss": mean_loss, "grad0": gradients[0], "grad1": gradients[1]}, sys.argv[2])
torch.distributed.destroy_process_group()
