"""Whole-model speed: training step, prefill and greedy decoding of GrinMoe / MhMoe under every experts
implementation against transformers' Phimoe (eager, grouped_mm) and a dense decoder of the activated size.

A thin wrapper around `modeling_grin.model_bench` (also `grin-moe bench --whole-model`); see that module.

    python benchmarks/model_speed.py                          # shape "small": 4 layers, H=256, I=400, E=16, k=2
    python benchmarks/model_speed.py --model-shape h512 --rounds 7
    python benchmarks/model_speed.py --model-shape mhmoe
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling_grin.model_bench import main  # noqa: E402

if __name__ == "__main__":
    main()
