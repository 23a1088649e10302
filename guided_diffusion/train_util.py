"""
ADM's training loop for diffusion models: AdamW, optional fp16, EMA copies, checkpoints and resuming.

Checkpoints go to the logger's directory as model{N:06d}.pt, ema_{rate}_{N:06d}.pt and opt{N:06d}.pt,
where N is the number of optimizer steps taken so far.
"""

import copy
import functools
import os

import blobfile as bf
import torch.distributed as dist
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger
from .common.atomic_io import torch_save_atomic
from .fp16_util import MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler

# log2 of the loss scale fp16 training starts from.
INITIAL_LOG_LOSS_SCALE = 20.0


class TrainLoop:
    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        if self.log_interval <= 0 or self.save_interval <= 0:
            raise ValueError(
                f"log_interval and save_interval must be positive, got {log_interval} and {save_interval}"
            )

        # Steps taken in this run; resume_step counts those taken before the checkpoint.
        self.step = 0
        self.resume_step = 0
        self.global_batch = self.batch_size * _world_size()

        self._load_and_sync_parameters()
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=self.use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
        )

        self.opt = AdamW(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay)
        if self.resume_step:
            self._load_optimizer_state()
            # The EMAs were saved separately from the model, so they are restored separately too.
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
        else:
            self.ema_params = [copy.deepcopy(self.mp_trainer.master_params) for _ in self.ema_rate]

        if _world_size() > 1:
            self.use_ddp = True
            device_ids = [dist_util.dev()] if dist_util.dev().type == "cuda" else None
            self.ddp_model = DDP(
                self.model,
                device_ids=device_ids,
                output_device=device_ids[0] if device_ids else None,
                broadcast_buffers=False,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )
        else:
            self.use_ddp = False
            self.ddp_model = self.model

    def _load_and_sync_parameters(self):
        resume_checkpoint = find_resume_checkpoint() or self.resume_checkpoint
        if resume_checkpoint:
            self.resume_step = parse_resume_step_from_filename(resume_checkpoint)
            logger.log(f"loading model from checkpoint: {resume_checkpoint}...")
            # Every rank takes part: load_state_dict broadcasts rank 0's bytes to the others.
            self.model.load_state_dict(
                dist_util.load_state_dict(resume_checkpoint, map_location=dist_util.dev())
            )
        dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate):
        ema_params = copy.deepcopy(self.mp_trainer.master_params)
        main_checkpoint = find_resume_checkpoint() or self.resume_checkpoint
        ema_checkpoint = find_ema_checkpoint(main_checkpoint, self.resume_step, rate)
        if ema_checkpoint:
            logger.log(f"loading EMA from checkpoint: {ema_checkpoint}...")
            state_dict = dist_util.load_state_dict(ema_checkpoint, map_location=dist_util.dev())
            ema_params = self.mp_trainer.state_dict_to_master_params(state_dict)
        else:
            logger.warn(f"no EMA checkpoint for rate {rate} at step {self.resume_step}; starting it from the model")
        dist_util.sync_params(ema_params)
        return ema_params

    def _load_optimizer_state(self):
        main_checkpoint = find_resume_checkpoint() or self.resume_checkpoint
        opt_checkpoint = bf.join(bf.dirname(main_checkpoint), f"opt{self.resume_step:06}.pt")
        if bf.exists(opt_checkpoint):
            logger.log(f"loading optimizer state from checkpoint: {opt_checkpoint}")
            state_dict = dist_util.load_state_dict(opt_checkpoint, map_location=dist_util.dev())
            self.opt.load_state_dict(state_dict)
        else:
            logger.warn(f"no optimizer checkpoint {opt_checkpoint}; starting AdamW from scratch")

    def run_loop(self):
        """
        Train until lr_anneal_steps optimizer steps have been taken in total (forever when it is 0).
        """
        while not self.lr_anneal_steps or self.step + self.resume_step < self.lr_anneal_steps:
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            self.step += 1
            if self.step % self.log_interval == 0:
                logger.dumpkvs()
            if self.step % self.save_interval == 0:
                self.save()
                # Lets a smoke test stop after the first checkpoint.
                if os.environ.get("DIFFUSION_TRAINING_TEST", ""):
                    return
        # Save the final state unless the last step already did.
        if self.step % self.save_interval != 0:
            self.save()

    def run_step(self, batch, cond):
        self._anneal_lr()
        self.forward_backward(batch, cond)
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self._update_ema()
        self.log_step()

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        for i in range(0, batch.shape[0], self.microbatch):
            micro = batch[i : i + self.microbatch].to(dist_util.dev())
            micro_cond = {k: v[i : i + self.microbatch].to(dist_util.dev()) for k, v in cond.items()}
            last_batch = (i + self.microbatch) >= batch.shape[0]
            t, weights = self.schedule_sampler.sample(micro.shape[0], dist_util.dev())

            compute_losses = functools.partial(
                self.diffusion.training_losses,
                self.ddp_model,
                micro,
                t,
                model_kwargs=micro_cond,
            )

            if last_batch or not self.use_ddp:
                losses = compute_losses()
            else:
                # Gradients are all-reduced once, on the last microbatch.
                with self.ddp_model.no_sync():
                    losses = compute_losses()

            if isinstance(self.schedule_sampler, LossAwareSampler):
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())

            loss = (losses["loss"] * weights).mean()
            log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
            self.mp_trainer.backward(loss)

    def _update_ema(self):
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self):
        # Linear decay to zero over lr_anneal_steps; step k (counting from 0) uses lr * (1 - k / total).
        if not self.lr_anneal_steps:
            return
        frac_done = (self.step + self.resume_step) / self.lr_anneal_steps
        lr = self.lr * (1 - frac_done)
        for param_group in self.opt.param_groups:
            param_group["lr"] = lr

    def log_step(self):
        logger.logkv("step", self.step + self.resume_step)
        logger.logkv("samples", (self.step + self.resume_step + 1) * self.global_batch)

    def save(self):
        total_steps = self.step + self.resume_step

        def save_checkpoint(rate, params):
            state_dict = self.mp_trainer.master_params_to_state_dict(params)
            if _rank() == 0:
                logger.log(f"saving model {rate}...")
                if not rate:
                    filename = f"model{total_steps:06d}.pt"
                else:
                    filename = f"ema_{rate}_{total_steps:06d}.pt"
                torch_save_atomic(state_dict, bf.join(get_blob_logdir(), filename))

        save_checkpoint(0, self.mp_trainer.master_params)
        for rate, params in zip(self.ema_rate, self.ema_params):
            save_checkpoint(rate, params)

        if _rank() == 0:
            torch_save_atomic(self.opt.state_dict(), bf.join(get_blob_logdir(), f"opt{total_steps:06d}.pt"))

        if _world_size() > 1:
            dist.barrier()


def parse_ema_rates(ema_rate):
    """
    "0.9999" or "0.999,0.9999" (or a float) -> list of floats.
    """
    if isinstance(ema_rate, float):
        return [ema_rate]
    rates = [float(x) for x in ema_rate.split(",") if x.strip()]
    for rate in rates:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"EMA rates must be in (0, 1), got {rate} from {ema_rate!r}")
    return rates


def parse_resume_step_from_filename(filename):
    """
    Parse filenames of the form path/to/modelNNNNNN.pt, where NNNNNN is the
    checkpoint's number of steps.
    """
    split = filename.split("model")
    if len(split) < 2:
        return 0
    split1 = split[-1].split(".")[0]
    try:
        return int(split1)
    except ValueError:
        return 0


def get_blob_logdir():
    # Change this to save checkpoints somewhere other than the log directory.
    return logger.get_dir()


def find_resume_checkpoint():
    # Override to discover the latest checkpoint automatically on your infrastructure.
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    if not main_checkpoint:
        return None
    filename = f"ema_{rate}_{step:06d}.pt"
    path = bf.join(bf.dirname(main_checkpoint), filename)
    if bf.exists(path):
        return path
    return None


def log_loss_dict(diffusion, ts, losses):
    """
    Log the mean of each loss, overall and per quarter of the diffusion timesteps.
    """
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        # Loss depends strongly on t; the quartiles show which part of the chain is learning.
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)


def _world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0
