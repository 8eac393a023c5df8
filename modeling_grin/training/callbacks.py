"""Trainer callbacks."""

import torch
from transformers import TrainerCallback

from ..sparsemixer import GrinMoeRouter


class RouterStatisticsCallback(TrainerCallback):
    """Adds routing statistics, accumulated since the previous log, to every Trainer log:

    - `router/max_load_ratio`: the most loaded expert's share of routed slots × number of experts, worst layer
      (1.0 = perfectly balanced; GRIN reports 1.44 for its released model);
    - `router/mean_max_load_ratio`: the same, averaged over MoE layers;
    - `router/entropy`: mean entropy (nats) of the router's softmax over experts;
    - `router/layer_{i}/max_load_ratio` for each MoE layer i.

    Statistics come from forward hooks on every router (sub-tokens for MH-MoE). Add it with
    `add_router_statistics(trainer)`, which places it before the reporting integrations so they log the values too.
    """

    def __init__(self):
        self._hooks, self._counts, self._entropy, self._rows = [], {}, 0.0, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        routers = [module for module in model.modules() if isinstance(module, GrinMoeRouter)]
        for layer, router in enumerate(routers):
            self._hooks.append(router.register_forward_hook(self._recorder(layer)))

    def _recorder(self, layer: int):
        def record(router, inputs, outputs):
            logits, _, indices = outputs
            with torch.no_grad():
                counts = torch.bincount(indices.flatten(), minlength=router.num_experts).cpu()
                self._counts[layer] = self._counts.get(layer, 0) + counts
                probs = logits.float().softmax(dim=-1)
                self._entropy += -(probs * probs.clamp(min=1e-12).log()).sum().item()
                self._rows += logits.shape[0]

        return record

    def statistics(self) -> dict[str, float]:
        """The statistics accumulated so far (and nothing when no router ran)."""
        if not self._counts:
            return {}
        ratios = {}
        for layer, counts in sorted(self._counts.items()):
            load = counts.float() / counts.sum()
            ratios[layer] = (load.max() * load.numel()).item()
        logs = {
            "router/max_load_ratio": max(ratios.values()),
            "router/mean_max_load_ratio": sum(ratios.values()) / len(ratios),
            "router/entropy": self._entropy / self._rows,
        }
        logs.update({f"router/layer_{layer}/max_load_ratio": ratio for layer, ratio in ratios.items()})
        return logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        statistics = self.statistics()
        if logs is not None and statistics:
            logs.update(statistics)
            if state.log_history:  # the Trainer copied `logs` into its history before the callbacks ran
                state.log_history[-1].update(statistics)
        self._counts, self._entropy, self._rows = {}, 0.0, 0

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def add_router_statistics(trainer) -> RouterStatisticsCallback:
    """Attach a `RouterStatisticsCallback` ahead of the reporting integrations (TensorBoard, W&B, ...)."""
    callback = RouterStatisticsCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
