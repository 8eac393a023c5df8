"""Training helpers (not part of the exported remote code): Trainer callbacks."""

from .callbacks import RouterStatisticsCallback, add_router_statistics

__all__ = ["RouterStatisticsCallback", "add_router_statistics"]
