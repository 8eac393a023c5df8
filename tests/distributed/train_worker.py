"""Run by tests/test_training_loop.py, alone or under `accelerate launch` with the shipped DDP/FSDP2 configs: trains a
tiny model with `modeling_grin.training.loop.train` and, on rank 0, writes the first step's loss and full gradients
and the final model's logits on a probe batch, for comparison with a single-process run on the same global batch.

usage: train_worker.py CONFIG_JSON DATA_FILE OUTPUT_DIR RESULTS_FILE BATCH_SIZE_PER_PROCESS
"""

import sys

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from modeling_grin.training.loop import train

config, data, output_dir, results_file, batch_size = sys.argv[1:6]
captured = {}


def capture_first_gradients(step, model):
    if step == 0:
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                grad = parameter.grad
                captured["grad/" + name.removeprefix("module.")] = (
                    grad.full_tensor() if isinstance(grad, DTensor) else grad  # collective under FSDP2
                ).detach().clone()


result = train(
    output_dir, preset=None, config=config, data=[data], vocab_size=300, steps=6, batch_size=int(batch_size),
    block_size=32, learning_rate=3e-3, warmup_steps=1, save_steps=3, on_before_optimizer_step=capture_first_gradients,
)
probe = torch.arange(2 * 16).view(2, 16) % 300
with torch.no_grad():
    logits = result.accelerator.unwrap_model(result.model)(input_ids=probe).logits  # collective under FSDP2
if result.accelerator.is_main_process:
    losses = torch.tensor([result.summary["first_loss"], result.summary["final_loss"]])
    save_file({"losses": losses, "probe_logits": logits.contiguous(), **captured}, results_file)
