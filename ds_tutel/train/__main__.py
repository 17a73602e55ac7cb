"""python -m ds_tutel.train: the GPT-MoE training job (see ds_tutel/train/loop.py)."""
import sys

from .loop import main

sys.exit(main())
