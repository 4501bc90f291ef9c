"""One rank of tests/test_rpo.py::test_global_batch_across_two_gloo_processes.

Usage: python tests/_rpo_dist_worker.py DIR with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.
Reads DIR/inputs.pt (the global batch), takes this rank's pairs, computes rpo_loss with group=WORLD on
each backend and writes its loss share and its gradient w.r.t. its model_pred to
DIR/rank{RANK}_{backend}.pt.
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
        m, b = x["m"], x["m"] * world
        pairs = torch.arange(rank * m, (rank + 1) * m)
        rows = torch.cat([pairs, b + pairs])  # this rank's winners, then its losers
        for backend in ("torch", "triton"):
            model_pred = x["model_pred"][rows].clone().requires_grad_(True)
            loss = fastpref.rpo_loss(model_pred, x["ref_pred"][rows], x["target"][rows], win_emb=x["win"][pairs],
                                     lose_emb=x["lose"][pairs], beta=x["beta"], group=dist.group.WORLD,
                                     backend=backend)  # fmt: skip
            loss.backward()
            torch.save({"loss": loss.detach(), "grad": model_pred.grad},
                       os.path.join(out_dir, f"rank{rank}_{backend}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
