"""python -m ds_tutel.launch: plan, print or start a job (see ds_tutel/launch/cli.py)."""
from .cli import main

main()
