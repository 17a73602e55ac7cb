"""Checkpoint tool: verify a checkpoint and print its manifest, or convert it to another world size and
expert-parallel size.

    python -m ds_tutel.train.checkpoint_cli info runs/x/checkpoints
    python -m ds_tutel.train.checkpoint_cli reshard runs/x/checkpoints runs/y/checkpoints --world-size 4 --ep-size 2
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ..ranks import RankFailure
from .checkpoint import CheckpointError, read_latest, verify
from .reshard import reshard


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_tutel.train.checkpoint_cli", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rs = sub.add_parser("reshard", help="convert a checkpoint to another world size / expert-parallel size")
    rs.add_argument("src", help="checkpoint directory to read (never modified)")
    rs.add_argument("dst", help="new checkpoint directory (must not exist)")
    rs.add_argument("--world-size", type=int, required=True, help="number of ranks the new checkpoint is for")
    rs.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: the world size)")
    rs.add_argument("--tag", default=None, help="tag to convert (default: the one `latest` names)")
    rs.add_argument("--timeout", type=float, default=1800.0, help="seconds before the conversion is abandoned")
    info = sub.add_parser("info", help="verify a checkpoint and print its manifest")
    info.add_argument("dir")
    info.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            tag = args.tag or read_latest(args.dir)
            if tag is None:
                raise CheckpointError(f"no checkpoint in {args.dir} (no `latest` file)")
            manifest = verify(args.dir, tag)
            print(json.dumps({k: v for k, v in manifest.items() if k not in ("files", "ds_config")}, indent=1))
            return 0
        summary = reshard(args.src, args.dst, args.world_size, args.ep_size, tag=args.tag, timeout=args.timeout)
        print(json.dumps(summary, indent=1))
        return 0
    except (CheckpointError, RankFailure, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2



if __name__ == "__main__":
    sys.exit(main())
