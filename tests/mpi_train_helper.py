"""
Run with two ranks, `mpiexec -n 2 python tests/mpi_train_helper.py TMPDIR` or under torchrun; tests/adm/test_training.py
and tests/common/test_launch.py drive it.

Each rank starts from different weights and sees different data; after TrainLoop steps the replicas must
still be identical (rank 0's weights broadcast, gradients averaged by DDP). Rank 0 prints "ALL OK".
"""

import os
import sys

import numpy as np
import torch as th
import torch.distributed as dist

from guided_diffusion import dist_util, logger
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import TrainLoop


def main():
    tmpdir = sys.argv[1]
    dist_util.setup_dist()
    rank = dist.get_rank()
    logger.configure(dir=os.path.join(tmpdir, "logs"), format_strs=["log"])

    th.manual_seed(rank)
    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", diffusion_steps=50)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **flags})
    model.to(dist_util.dev())

    def data():
        g = th.Generator().manual_seed(100 + rank)
        while True:
            yield th.rand(2, 3, 8, 8, generator=g) * 2 - 1, {}

    loop = TrainLoop(model=model, diffusion=diffusion, data=data(), batch_size=2, microbatch=1, lr=1e-2,
                     ema_rate="0.9", log_interval=100, save_interval=2, resume_checkpoint="", lr_anneal_steps=2)
    assert loop.use_ddp and loop.global_batch == 4
    initial = [p.detach().clone() for p in model.parameters()]
    np.random.seed(rank)
    th.manual_seed(1000 + rank)
    loop.run_loop()

    flat = th.cat([p.detach().reshape(-1) for p in model.parameters()])
    flat_ema = th.cat([p.detach().reshape(-1) for p in loop.ema_params[0]])
    gathered = [th.zeros_like(flat) for _ in range(2)]
    gathered_ema = [th.zeros_like(flat_ema) for _ in range(2)]
    dist.all_gather(gathered, flat)
    dist.all_gather(gathered_ema, flat_ema)
    assert th.equal(gathered[0], gathered[1]), (gathered[0] - gathered[1]).abs().max()
    assert th.equal(gathered_ema[0], gathered_ema[1])
    assert not all(th.equal(a, b) for a, b in zip(initial, model.parameters()))

    files = sorted(os.listdir(os.path.join(tmpdir, "logs")))
    assert files == ["ema_0.9_000002.pt", "log-rank001.txt", "log.txt", "model000002.pt", "opt000002.pt"], files
    if rank == 0:
        print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
