"""Experts of one MoE layer: forward and forward+backward speed and peak memory of every experts implementation.

A thin wrapper around `modeling_grin.bench` (also `grin-moe bench`); see that module for the options.

    python benchmarks/moe_layer.py                                      # CPU shape: H=512, I=800, E=16, k=2
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --shape grin --repeats 10
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling_grin.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
