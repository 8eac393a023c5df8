"""Held-out evaluation and the plots people look at: loss curve and expert-load heatmap."""

from pathlib import Path

import torch


@torch.no_grad()
def evaluate_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean language-modelling loss over `blocks` in eval mode (router losses left out)."""
    model.eval()
    losses = [
        model(input_ids=batch, labels=batch, output_router_logits=False).loss.item()
        for batch in blocks.split(batch_size)
    ]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def expert_load(model, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Fraction of routed slots each expert receives, per MoE layer, `[layers, experts]` (eval-mode routing)."""
    model.eval()
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    counts = None
    for batch in blocks.split(batch_size):
        router_logits = model(input_ids=batch, output_router_logits=True).router_logits
        layer_counts = torch.stack(
            [torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=num_experts) for logits in
             router_logits]
        )
        counts = layer_counts if counts is None else counts + layer_counts
    model.train()
    return counts.float() / counts.sum(dim=-1, keepdim=True)


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
