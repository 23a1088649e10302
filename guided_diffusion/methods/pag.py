"""
Perturbed-Attention Guidance (PAG, Ahn et al., ECCV 2024) for ADM's U-Net.

PAG contrasts the model with a perturbed copy of itself in which the self-attention map softmax(QK^T / sqrt(d))
of chosen attention blocks is replaced by the identity (every token attends only to itself), and pushes the
prediction away from the perturbed one (the paper's ablation perturbs the map in other ways, see
perturbations.py and the `kind` argument):

    eps_guided = eps + s * (eps - eps_perturbed)

`s` is the paper's scale. The official code's `--guide_scale g` computes eps_perturbed + g * (eps - eps_perturbed),
the same thing with g = 1 + s (see scale_from_guide_scale).

two_pass.py states the guided output in plain words (two passes of the model, about 20 lines); PAGGuidedModel
computes the same output faster and is held equal to it by the tests.

The guidance acts on the model's output, so PAGGuidedModel simply takes the model's place in GaussianDiffusion's
sampling loops (and under SpacedDiffusion's respacing wrapper); pred_xstart, the posterior mean, DDIM's update and
classifier guidance all follow from the guided output without changes to the diffusion code.
"""

import contextlib

import torch as th

from .attention_hooks import hooked, perturbation_rows
from .attention_layers import LAYER_ALIASES, attention_block_names, resolve_layers  # noqa: F401
from .guided_model import GuidedModel, broadcast_scale, check_scale, check_t_range, guided_rows, take_rows  # noqa: F401
from .perturbations import make_perturbation
from ..common.random_streams import current_batch
from .stage_flops import share_from_stage
from ..unet import SuperResModel, UNetModel

# check_scale, check_t_range, guided_rows (guided_model.py), LAYER_ALIASES, attention_block_names and
# resolve_layers (attention_layers.py) are imported here for code written against pag.py, as is _take_rows.
_take_rows = take_rows

# The blocks the official PAG code perturbs on ADM's ImageNet 256x256 model (256x256_diffusion).
OFFICIAL_IMAGENET256_LAYERS = "input_blocks.14.1,input_blocks.16.1,input_blocks.17.1,middle_block.1"


def scale_from_guide_scale(guide_scale):
    """
    Convert the official code's --guide_scale g (eps_perturbed + g * (eps - eps_perturbed)) to the paper's s.
    """
    return float(guide_scale) - 1.0


@contextlib.contextmanager
def perturb_attention(model, layers, kind="identity", rows=True, batch_size=None, **params):
    """
    Within the context, forward passes of `model` perturb the attention of the named blocks: by default PAG's
    identity map; `kind` and its parameters choose another perturbation of perturbations.py (e.g.
    kind="mask", drop_rate=0.5; kind="seg", seg_sigma=float("inf"); kind="tpg"; kind="soft", soft_alpha=0.5).

    :param layers: as for resolve_layers.
    :param kind: a perturbation kind (perturbations.PERTURBATIONS) or a ready AttentionPerturbation.
    :param rows: which batch rows to perturb: True (all) or a bool mask; with batch_size, also an index tensor or
                 a slice (see attention_hooks.perturbation_rows).
    :raises ValueError: for unknown layers, an unknown kind, or missing, unknown or out-of-range parameters.
    The blocks' previous hooks are restored on exit, also when the body raises.
    """
    perturbation = make_perturbation(kind, **params)
    rows = perturbation_rows(rows, batch_size)
    modules = dict(model.named_modules())
    names = resolve_layers(model, layers)
    for name in names:
        perturbation.check_block(name, modules[name])
    blocks = [modules[name] for name in names]
    with hooked(blocks, perturbation=perturbation, rows=rows) as blocks:
        yield blocks


def _stage_of(model, name):
    """
    The torso stage (see UNetModel.run_stages) that holds the named module.
    """
    parts = name.split(".")
    num_inputs = len(model.input_blocks)
    if parts[0] == "input_blocks":
        return int(parts[1])
    if parts[0] == "middle_block":
        return num_inputs
    if parts[0] == "output_blocks":
        return num_inputs + 1 + int(parts[1])
    raise ValueError(f"{name!r} is not inside the U-Net's torso")


def _can_share_prefix(model):
    # The shared prefix re-implements the forward pass from its pieces, which is only valid for forwards we know.
    forward = type(model).forward
    return isinstance(model, UNetModel) and forward in (UNetModel.forward, SuperResModel.forward)


def _append_rows(value, rows, batch_size):
    """
    The batch followed by a second copy of its guided rows (the perturbed branch's inputs).
    """
    if not th.is_tensor(value) or value.dim() == 0 or value.shape[0] != batch_size:
        return value
    return th.cat([value, take_rows(value, rows, batch_size)])


class PAGGuidedModel(GuidedModel):
    """
    A model wrapper whose output is guided by Perturbed-Attention Guidance; call it like the model itself,
    `guided(x, t, **model_kwargs)`, e.g. as the model of GaussianDiffusion.p_sample_loop / ddim_sample_loop.

    The first x.shape[1] output channels (eps) are guided; further channels (the learned variance of learn_sigma
    models) come from the unperturbed pass. Its output is two_pass.pag_two_pass's (the plain two-pass statement)
    on the guided rows, up to float rounding for the batched paths.

    :param model: a UNetModel or SuperResModel (any callable model works with share_prefix=False or
                  batched=False; the prefix sharing is then skipped).
    :param scale: the paper's guidance scale s (any finite number; 0 turns guidance off, -1 gives the perturbed
                  model's prediction). The official --guide_scale g is s = g - 1.
    :param layers: the attention blocks to perturb, as for resolve_layers.
    :param t_range: (lo, hi): guide only the rows whose timestep t, as the model receives it (original-scale
                    timesteps under respacing), satisfies lo <= t <= hi; other rows get the plain output.
    :param batched: run both branches in one forward pass on a doubled batch (False: two passes, less memory).
    :param share_prefix: with batched, run the stages before the first perturbed block once and duplicate their
                         activations instead of computing them twice.
    :param kind: the perturbation of the perturbed branch (perturbations.PERTURBATIONS): "identity" (PAG's, the
                 default), the ablation's "mask", "drop", "blur", "avgpool2d", "noise", or PAG's successors
                 "seg" (SEG), "soft" (SoftPAG), "tpg" (TPG); `params` are its parameters (drop_rate, retain_diag,
                 blur_sigma, blur_kernel_size, noise_scale, seg_sigma, soft_alpha, soft_heads).
    :param validated: ignored (see GuidedModel).
    :param schedule: how the scale varies over the steps (schedules.ScaleSchedule); None: constant.
    """

    name = "PAG"

    def __init__(
        self,
        model,
        scale,
        layers,
        t_range=None,
        batched=True,
        share_prefix=True,
        kind="identity",
        validated=False,
        schedule=None,
        **params,
    ):
        super().__init__(model, scale, t_range, validated, schedule)
        self.perturbation = make_perturbation(kind, **params)
        self.layers = resolve_layers(model, layers)
        modules = dict(model.named_modules())
        for name in self.layers:
            self.perturbation.check_block(name, modules[name])
        self.batched = bool(batched)
        self.share_prefix = bool(share_prefix)

    def settings(self):
        return [
            ("scale", self.scale),
            ("layers", self.layers),
            ("t_range", self.t_range),
            ("batched", self.batched),
            ("share_prefix", self.share_prefix),
            ("perturbation", repr(self.perturbation.describe())),
            ("schedule", repr(self.schedule.describe())),
        ]

    def describe(self):
        interval = "all" if self.t_range is None else f"{self.t_range[0]:g}..{self.t_range[1]:g}"
        schedule = "" if self.schedule.constant else f", schedule {self.schedule.describe()}"
        return (
            f"PAG (scale {self.scale:g}, layers {','.join(self.layers)}, t {interval}, "
            f"perturbation {self.perturbation.describe()}{schedule})"
        )

    def second_pass_cost(self):
        """
        The perturbed branch's cost in plain calls: with the shared prefix, the share of a plain pass's FLOPs from
        the stage of the first perturbed block to the output (counted once per model, stage_flops.py; 0.75 at the
        official layers on ADM-256, so a guided call costs 1.75); two full passes otherwise.
        """
        if not (self.batched and self.share_prefix and _can_share_prefix(self.model)):
            return 1.0
        if getattr(self, "_prefix_share", None) is None:
            first = min(_stage_of(self.model, name) for name in self.layers)
            self._prefix_share = share_from_stage(self.model, first)
        return self._prefix_share

    def nonfinite_hint(self):
        return self.perturbation.nonfinite_hint()

    def _guided_eps(self, x, t, model_kwargs, rows, autograd, scale):
        if not autograd:
            # The perturbed pass goes first: run while the plain branch's autograd graph is held, it allocates
            # its activations beside that graph and costs about 1.4x as much at 256 px on a CPU
            # (benchmarks/dps_step.py). The plain pass draws no random numbers, so the order changes no result.
            with th.no_grad():
                perturbed = self._perturbed_pass(x, t, model_kwargs, rows)
            plain = self.model(x, t, **model_kwargs)
        elif not self.batched:
            plain = self.model(x, t, **model_kwargs)
            perturbed = self._perturbed_pass(x, t, model_kwargs, rows)
        elif self.share_prefix and _can_share_prefix(self.model):
            plain, perturbed = self._shared_prefix_pass(x, t, model_kwargs, rows)
        else:
            plain, perturbed = self._batched_pass(x, t, model_kwargs, rows)
        channels = self.check_channels(x, plain)
        eps = take_rows(plain[:, :channels], rows, x.shape[0])
        return plain, eps + broadcast_scale(scale, eps) * (eps - perturbed[:, :channels])

    def _perturbation_for(self, rows, batch_size, device):
        """
        The perturbation of this call: inside random_streams.batch_streams, a random one draws each guided row's
        part of the map from that sample's own perturbation generator; otherwise from the global generator, as
        the official code.
        """
        perturbation = self.perturbation
        batch = current_batch()
        if not perturbation.random or batch is None:
            return perturbation
        if len(batch.indices) != batch_size:
            raise ValueError(
                f"PAG called on a batch of {batch_size} inside batch_streams for {len(batch.indices)} samples"
            )
        generators = batch.perturbation_generators(device)
        if rows is not True:
            generators = [generators[i] for i in rows.tolist()]
        return perturbation.with_generators(generators)

    def _perturbed_pass(self, x, t, model_kwargs, rows):
        n = x.shape[0]
        kwargs = {k: take_rows(v, rows, n) for k, v in model_kwargs.items()}
        with perturb_attention(self.model, self.layers, self._perturbation_for(rows, n, x.device)):
            return self.model(take_rows(x, rows, n), take_rows(t, rows, n), **kwargs)

    def _perturb_appended_rows(self, rows, n, total, device):
        """
        The perturbation over a batch of the n plain rows followed by the guided rows' copies: the copies only.
        """
        mask = th.arange(total, device=device) >= n
        return perturb_attention(self.model, self.layers, self._perturbation_for(rows, n, device), rows=mask)

    def _batched_pass(self, x, t, model_kwargs, rows):
        # Both branches of two_pass.pag_two_pass in one forward pass: the guided rows' copies are perturbed.
        n = x.shape[0]
        kwargs = {k: _append_rows(v, rows, n) for k, v in model_kwargs.items()}
        both = _append_rows(x, rows, n)
        with self._perturb_appended_rows(rows, n, both.shape[0], x.device):
            out = self.model(both, _append_rows(t, rows, n), **kwargs)
        return out[:n], out[n:]

    def _shared_prefix_pass(self, x, t, model_kwargs, rows):
        # _batched_pass with the stages before the first perturbed block run once, their activations copied
        # for the perturbed branch: those stages compute the same thing for both branches of two_pass.pag_two_pass.
        model = self.model
        n = x.shape[0]
        kwargs = dict(model_kwargs)
        if isinstance(model, SuperResModel):
            x = model.concat_low_res(x, kwargs.pop("low_res", None))
        if th.is_tensor(t) and t.dim() == 0:
            t = t.expand(n)
        # Everything up to the stage holding the first perturbed block is identical for both branches.
        first = min(_stage_of(model, name) for name in self.layers)
        emb = model.embed(t, **kwargs)
        h, hs = model.run_stages(x.type(model.dtype), emb, [], 0, first)
        h = _append_rows(h, rows, n)
        hs = [_append_rows(skip, rows, n) for skip in hs]
        emb = _append_rows(emb, rows, n)
        with self._perturb_appended_rows(rows, n, h.shape[0], h.device):
            h, _ = model.run_stages(h, emb, hs, first)
        out = model.out(h.type(x.dtype))
        return out[:n], out[n:]
