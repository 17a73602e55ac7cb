"""One training step of a small expert-parallel MoE model through the DeepSpeed engine; reports the rank's binding.

Run it through a recipe (run_deepspeed.sh, run_mpirun.sh) or `python -m ds_tutel.launch -- launch/moe_step.py`.
Each rank prints one line `DS_TUTEL_STEP {json}` (and writes rank<r>.json under --report-dir): its rank, world
size, the CPUs it runs on, its torch thread count, the binding ds_tutel.launch.binding applied, the loss and the
per-expert token counts.
"""
import argparse
import json
import math
import os

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from ds_tutel import MoE
from ds_tutel.launch.machine import format_cpulist

HERE = os.path.dirname(os.path.abspath(__file__))


class TinyMoEModel(nn.Module):
    """Linear -> MoE (experts spread over every rank) -> Linear -> scalar loss."""

    def __init__(self, hidden: int, num_experts: int, ep_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(hidden, hidden)
        expert = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))
        self.moe = MoE(hidden, expert, num_experts=num_experts, ep_size=ep_size, k=2, min_capacity=0)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor):
        y, l_aux, counts = self.moe(self.inp(x))
        return self.out(y).square().mean() + 0.01 * l_aux, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher")
    parser.add_argument("--config", default=os.path.join(HERE, "deepspeed_config.json"))
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--experts-per-rank", type=int, default=2)
    parser.add_argument("--report-dir", default=None)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Under mpirun, RANK/WORLD_SIZE/... are unset and DeepSpeed discovers them through mpi4py.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                               distributed_port=int(os.environ.get("MASTER_PORT", "29500")))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    model = TinyMoEModel(args.hidden, args.experts_per_rank * world, ep_size=world)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=args.config)
    x = torch.randn(engine.train_micro_batch_size_per_gpu(), 8, args.hidden,
                    generator=torch.Generator().manual_seed(rank)).to(engine.device)
    loss, counts = engine(x)
    engine.backward(loss)
    engine.step()
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise RuntimeError(f"rank {rank}: loss is {loss_value}")

    report = {"rank": rank, "world_size": world, "local_rank": int(os.environ.get("LOCAL_RANK", "-1")),
              "cpus": format_cpulist(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
              "binding": json.loads(os.environ.get("DS_TUTEL_BINDING", "null")), "backend": backend,
              "launched_by": "mpirun" if "OMPI_COMM_WORLD_RANK" in os.environ else "deepspeed",
              "loss": loss_value, "exp_counts": [int(c) for c in counts.tolist()]}
    print("DS_TUTEL_STEP " + json.dumps(report), flush=True)
    if args.report_dir:
        with open(os.path.join(args.report_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
