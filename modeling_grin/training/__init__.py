"""Training helpers (not part of the exported remote code): Trainer callbacks and LoRA."""

from .callbacks import RouterStatisticsCallback, add_router_statistics
from .lora import lora_config

__all__ = ["RouterStatisticsCallback", "add_router_statistics", "lora_config"]
