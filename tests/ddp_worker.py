"""A few SGD steps of a small HaloNet; run under torchrun (DDP, gloo) or as one plain process.

Both see the same global batch of 8 per step: under DDP each of the 2 ranks takes its half. BatchNorm runs on
its running statistics (the model is in eval mode while it trains), so the per-sample forward does not depend
on how the batch is split and the DDP result must equal the single-process one. Writes a JSON report.
"""
import json
import os
import sys

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

TINY = dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), stem_chs=16, block_size=4, halo_size=1, heads=2)
GLOBAL_BATCH, STEPS = 8, 3


def main(out_path: str) -> None:
    distributed = 'RANK' in os.environ
    if distributed:
        dist.init_process_group('gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = timm.create_model('halonet_h0', num_classes=4, **TINY).eval()
    train_model = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    gen = torch.Generator().manual_seed(1)
    losses = []
    per_rank = GLOBAL_BATCH // world
    for _ in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen)
        labels = torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = F.cross_entropy(train_model(images[mine]), labels[mine])
        optimizer.zero_grad()
        loss.backward()  # DDP averages gradients over ranks: the gradient of the global-batch mean loss
        optimizer.step()
        global_loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(global_loss)
            global_loss /= world
        losses.append(global_loss.item())

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    max_diff = 0.0
    if distributed:
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        max_diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    if rank == 0:
        with open(out_path, 'w') as f:
            json.dump(dict(world_size=world, losses=losses, max_param_diff_across_ranks=max_diff,
                           param_checksum=flat.double().abs().sum().item()), f)
    if distributed:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
