"""One rank of tests/test_kto_distributed.py::test_reference_point_is_the_global_mean_across_two_gloo_processes.

Usage: python tests/_kto_dist_worker.py DIR with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.
Reads DIR/inputs.pt (the global batch and each rank's rows), computes kto_loss with group=WORLD on
each backend and writes its per-sample losses, its reference point and the gradient of the sum of
its losses w.r.t. its model_pred to DIR/rank{RANK}_{backend}.pt.
"""

import os
import sys

import torch
import torch.distributed as dist

import fastpref


def main(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.load(os.path.join(out_dir, "inputs.pt"))
        rows = x["rows"][rank]
        for backend in ("torch", "triton"):
            model_pred = x["model_pred"][rows].clone().requires_grad_(True)
            losses, stats = fastpref.kto_loss(model_pred, x["ref_pred"][rows], x["target"][rows], x["labels"][rows],
                                              beta=x["beta"], lambda_undesirable=x["lambda_undesirable"],
                                              group=dist.group.WORLD, reduction="none", return_stats=True,
                                              backend=backend)  # fmt: skip
            losses.sum().backward()
            torch.save({"losses": losses.detach(), "z": stats.reference_point, "grad": model_pred.grad},
                       os.path.join(out_dir, f"rank{rank}_{backend}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
