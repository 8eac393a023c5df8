#!/usr/bin/env python
"""Upcycle a dense Llama / Mistral / Phi-3 checkpoint into GRIN-MoE: a thin wrapper over `grin-moe upcycle`.

    python conversion_scripts/upcycle_dense.py SRC DST --num-experts 8 --top-k 2 [--noise-std 0.01] [--verify]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also runs from a checkout without installing

from modeling_grin.cli import main  # noqa: E402

if __name__ == "__main__":
    arguments = sys.argv[1:]
    debug = ["--debug"] if "--debug" in arguments else []  # a top-level flag of grin-moe: it goes before the command
    sys.exit(main([*debug, "upcycle", *(argument for argument in arguments if argument != "--debug")]))
