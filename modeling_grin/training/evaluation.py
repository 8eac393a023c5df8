"""Held-out evaluation and the plots people look at: loss curve and expert-load heatmap."""

from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    """One eval-mode pass over `blocks`: the mean language-modelling loss (router losses left out, the mean of the
    per-batch means) and the fraction of routed slots each expert receives per MoE layer, `[layers, experts]`."""
    model.eval()
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    losses, counts = [], 0
    for batch in blocks.split(batch_size):
        out = model(input_ids=batch, output_router_logits=True)
        # transformers' causal-LM loss without labels passed in: with them the model would add its router losses
        losses.append(nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
                      .item())
        counts = counts + torch.stack(
            [torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=num_experts) for logits in
             out.router_logits]
        )
    model.train()
    return sum(losses) / len(losses), counts.float() / counts.sum(dim=-1, keepdim=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_loss_curve(losses: list[float], path: Path, title: str) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(losses) + 1), losses)
    axes.set(xlabel="step", ylabel="training loss (LM + aux)", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_expert_load_heatmap(load: torch.Tensor, path: Path, title: str) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(4.0, 0.45 * load.shape[1] + 2), max(2.5, 0.45 * load.shape[0] + 1.5)))
    image = axes.imshow(load.numpy(), cmap="viridis", aspect="auto")
    axes.set(xlabel="expert", ylabel="MoE layer", title=title)
    axes.set_xticks(range(load.shape[1]))
    axes.set_yticks(range(load.shape[0]))
    figure.colorbar(image, ax=axes, label="share of routed slots (uniform = 1/E)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
