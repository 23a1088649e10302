"""
Floating-point operations of a U-Net's forward pass, split by torso stage, counted without computing anything:
the model's forward runs once on meta tensors (torch.func.functional_call with meta copies of its parameters) under
torch.utils.flop_counter.FlopCounterMode, which counts each operation from its shapes. The guided models use it to
state what one of their calls costs in plain calls (GuidedModel.call_cost): PAG's shared prefix runs the stages
before the first perturbed block once, so its perturbed branch costs the share of the operations after them.

Counting takes well under a second for ADM's 256x256 model on a CPU (the 2.24 TFLOP of one image are only
counted, never run).
"""

import torch as th
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from ..unet import SuperResModel, UNetModel


def count_stage_flops(model, image_size=None):
    """
    The FLOPs of one image's plain forward pass through `model` (a UNetModel or SuperResModel), split as
    {"embed": ..., "stages": [one per torso stage, in UNetModel.run_stages order], "out": ...}.
    The split adds up to the whole pass's count (checked).

    :param image_size: the input resolution (default: the model's own image_size).
    """
    if not isinstance(model, UNetModel):
        raise TypeError(f"stage FLOPs are counted for ADM's UNetModel, not {type(model).__name__}")
    size = int(image_size or model.image_size)
    meta = {name: th.empty_like(value, device="meta") for name, value in model.named_parameters()}
    meta.update({name: th.empty_like(value, device="meta") for name, value in model.named_buffers()})
    channels = model.in_channels // 2 if isinstance(model, SuperResModel) else model.in_channels
    x = th.zeros(1, channels, size, size, device="meta")
    t = th.zeros(1, dtype=th.long, device="meta")
    kwargs = {}
    if model.num_classes is not None:
        kwargs["y"] = th.zeros(1, dtype=th.long, device="meta")
    if isinstance(model, SuperResModel):
        kwargs["low_res"] = th.zeros(1, channels, max(size // 4, 1), max(size // 4, 1), device="meta")
    with FlopCounterMode(display=False) as counter:
        functional_call(model, meta, (x, t), kwargs)
    # FlopCounterMode keys each module's total by its path below the root module's class name.
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__

    def flops(name):
        return counts.get(f"{root}.{name}", 0)

    stages = [flops(f"input_blocks.{i}") for i in range(len(model.input_blocks))]
    stages.append(flops("middle_block"))
    stages += [flops(f"output_blocks.{i}") for i in range(len(model.output_blocks))]
    split = {"embed": flops("time_embed") + flops("label_emb"), "stages": stages, "out": flops("out")}
    total = counter.get_total_flops()
    if split["embed"] + sum(stages) + split["out"] != total or total <= 0:
        raise RuntimeError(
            f"the FLOPs of {root}'s stages ({split['embed'] + sum(stages) + split['out']}) do not add up to its "
            f"forward pass's ({total}): the forward runs operations outside its stages"
        )
    return split


def share_from_stage(model, first, image_size=None):
    """
    The share of one plain forward pass's FLOPs spent in torso stages first, ..., last and the output head: what
    a branch that reuses the stages before `first` (and the embedding) still has to compute.
    """
    split = count_stage_flops(model, image_size)
    total = split["embed"] + sum(split["stages"]) + split["out"]
    return (sum(split["stages"][first:]) + split["out"]) / total
