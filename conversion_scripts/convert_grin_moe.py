#!/usr/bin/env python
"""Convert a GRIN-MoE / Phi-3.5-MoE / Phimoe checkpoint folder: a thin wrapper over `grin-moe convert`.

    python conversion_scripts/convert_grin_moe.py SRC DST --to {grinmoe,phimoe} [--dtype bfloat16] [--verify]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also runs from a checkout without installing

from modeling_grin.cli import main  # noqa: E402

if __name__ == "__main__":
    arguments = sys.argv[1:]
    debug = ["--debug"] if "--debug" in arguments else []  # a top-level flag of grin-moe: it goes before the command
    sys.exit(main([*debug, "convert", *(argument for argument in arguments if argument != "--debug")]))
