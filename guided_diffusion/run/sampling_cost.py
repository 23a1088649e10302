"""
What sampling costs, measured in the run itself, so results can be compared at equal compute:

- model evaluations per sample: every call of the sampled model counts, per batch row, the cost of that call in
  plain forward passes of the main model (GuidedModel.call_cost: 1.0 for a plain call or a step the guidance
  skips, e.g. outside --pag_interval; 1.75 for PAG at the official layers on ADM-256, 2.0 for SAG). A classifier
  (classifier_sample.py's cond_fn) is another network and is not counted.
- seconds per sample: the wall-clock time of sampling each batch on the device it ran on, per sample.

The samplers measure each batch (measure_batch around the batch, counted() around the model) and keep the figures
in a small file beside the batch's part (cost-START-END.json), so a resumed run keeps what its earlier batches
cost; the final record of the run holds their summary (summarize_parts).
"""

import contextlib
import json
import os
import time

import torch as th

from ..common.atomic_io import write_json_atomic
from ..methods.guided_model import wrapped_call_cost

_current = []


class BatchCost:
    """
    The cost of one batch: evaluations per row (accumulated over the model calls) and seconds.
    """

    def __init__(self, batch_size):
        self.evaluations = th.zeros(batch_size, dtype=th.float64)
        self.calls = 0
        self.seconds = None

    def add(self, cost):
        if self.evaluations is None:
            return
        if cost.shape[0] != self.evaluations.shape[0]:
            # A call on another number of rows than the batch's cannot be put on its samples: the batch's count
            # is unknown rather than wrong (sampling goes on).
            self.evaluations = None
            return
        self.evaluations += cost
        self.calls += 1


@contextlib.contextmanager
def measure_batch(batch_size):
    """
    Within the context, calls of counted() models add their cost to the returned BatchCost; its seconds are set
    on leaving.
    """
    meter = BatchCost(batch_size)
    _current.append(meter)
    start = time.perf_counter()
    try:
        yield meter
    finally:
        _current.remove(meter)
        if th.cuda.is_available() and th.cuda.is_initialized():
            th.cuda.synchronize()
        meter.seconds = time.perf_counter() - start


class CountedModel:
    """
    A model (or guided model) whose calls add their cost to the batch being measured, if any; otherwise it is the
    model itself.

    :param cost_of: the model whose call_cost prices each call, when `model` is a function around it.
    """

    def __init__(self, model, cost_of=None):
        self.model = model
        self.cost_of = model if cost_of is None else cost_of

    def __call__(self, x, t, **kwargs):
        if _current:
            t_rows = th.as_tensor(t)
            if t_rows.dim() == 0:
                t_rows = t_rows.expand(x.shape[0])
            _current[-1].add(wrapped_call_cost(self.cost_of, t_rows))
        return self.model(x, t, **kwargs)

    def __getattr__(self, name):
        # parameters() (the samplers find the device from it), plain_and_guided, ...
        if name == "model":
            raise AttributeError(name)  # not yet set (a copy being built): no recursion
        return getattr(self.model, name)


def counted(model, cost_of=None):
    return model if isinstance(model, CountedModel) else CountedModel(model, cost_of)


# --- the figures beside a run's parts ------------------------------------------------------------------------------


def cost_name(start, end):
    return f"cost-{start:09d}-{end:09d}.json"


def write_batch_cost(parts_dir, start, end, meter, device):
    write_json_atomic(
        os.path.join(parts_dir, cost_name(start, end)),
        {
            # None where no call was counted: a sampler that calls its model outside counted() (DPS).
            "evaluations": None if meter.evaluations is None or not meter.calls else meter.evaluations.tolist(),
            "seconds": meter.seconds,
            "device": str(device) if device is not None else None,
        },
    )


def summarize_parts(parts_dir, ranges):
    """
    The run's cost from the cost files of its parts `ranges` ([(start, end)]), or None when no part has one:
    evaluations_per_sample (mean over samples; min and max beside it, which differ only when the guidance depends
    on the sample; None where the sampler did not count its calls), seconds_per_sample (over the samples whose batches were timed, summed over ranks: the time one
    device spends per sample), and how many samples each figure covers.
    """
    evaluations, seconds, timed, devices = [], 0.0, 0, set()
    for start, end in ranges:
        try:
            with open(os.path.join(parts_dir, cost_name(start, end))) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        values = data.get("evaluations") or []
        if len(values) == end - start:
            evaluations += [float(v) for v in values]
        if isinstance(data.get("seconds"), (int, float)):
            seconds += float(data["seconds"])
            timed += end - start
        if data.get("device"):
            devices.add(data["device"])
    if not evaluations and not timed:
        return None
    return {
        "evaluations_per_sample": sum(evaluations) / len(evaluations) if evaluations else None,
        "evaluations_min": min(evaluations) if evaluations else None,
        "evaluations_max": max(evaluations) if evaluations else None,
        "seconds_per_sample": seconds / timed if timed else None,
        "samples_counted": len(evaluations),
        "samples_timed": timed,
        "devices": sorted(devices),
    }
