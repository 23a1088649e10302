"""
Perturbed-Attention Guidance (PAG, Ahn et al., ECCV 2024) for ADM's U-Net.

PAG contrasts the model with a perturbed copy of itself in which the self-attention map softmax(QK^T / sqrt(d))
of chosen attention blocks is replaced by the identity (every token attends only to itself), and pushes the
prediction away from the perturbed one (the paper's ablation perturbs the map in other ways, see
perturbations.py and the `kind` argument):

    eps_guided = eps + s * (eps - eps_perturbed)

`s` is the paper's scale. The official code's `--guide_scale g` computes eps_perturbed + g * (eps - eps_perturbed),
the same thing with g = 1 + s (see scale_from_guide_scale).

The guidance acts on the model's output, so PAGGuidedModel simply takes the model's place in GaussianDiffusion's
sampling loops (and under SpacedDiffusion's respacing wrapper); pred_xstart, the posterior mean, DDIM's update and
classifier guidance all follow from the guided output without changes to the diffusion code.
"""

import contextlib
import math

import torch as th

from .perturbations import is_identity, make_perturbation, real_number
from .random_streams import current_batch
from .unet import AttentionBlock, SuperResModel, UNetModel

# Layer aliases: alias -> prefix of the module names it selects.
LAYER_ALIASES = {
    "all": "",
    "middle": "middle_block.",
    "input": "input_blocks.",
    "encoder": "input_blocks.",
    "output": "output_blocks.",
    "decoder": "output_blocks.",
}

# The blocks the official PAG code perturbs on ADM's ImageNet 256x256 model (256x256_diffusion).
OFFICIAL_IMAGENET256_LAYERS = "input_blocks.14.1,input_blocks.16.1,input_blocks.17.1,middle_block.1"


def scale_from_guide_scale(guide_scale):
    """
    Convert the official code's --guide_scale g (eps_perturbed + g * (eps - eps_perturbed)) to the paper's s.
    """
    return float(guide_scale) - 1.0


def attention_block_names(model):
    """
    The module names of the model's attention blocks, in module order (e.g. "input_blocks.14.1").
    """
    return [name for name, module in model.named_modules() if isinstance(module, AttentionBlock)]


def _aliases_text():
    return "all, middle, input (or encoder), output (or decoder)"


def resolve_layers(model, layers):
    """
    Turn a layer selection into the sorted list of attention block names it denotes.

    :param layers: a comma-separated string or a list of exact module names ("middle_block.1") and aliases
                   ("all", "middle", "input"/"encoder", "output"/"decoder").
    :return: the selected names in module order, without duplicates.
    :raises ValueError: for a name that is not one of the model's attention blocks, or an empty selection.
    """
    if isinstance(layers, str):
        items = layers.split(",")
    elif isinstance(layers, (list, tuple)):
        items = list(layers)
    else:
        raise ValueError(
            f"layers must be a comma-separated string or a list of names, got {type(layers).__name__}"
        )
    names = attention_block_names(model)
    selected = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"layer names must be strings, got {item!r}")
        item = item.strip()
        if not item:
            continue
        if item.lower() in LAYER_ALIASES:
            prefix = LAYER_ALIASES[item.lower()]
            matches = [name for name in names if name.startswith(prefix)]
            if not matches:
                raise ValueError(f"layer alias {item!r} selects no attention block of this model")
            selected.update(matches)
        elif item in names:
            selected.add(item)
        else:
            raise ValueError(
                f"unknown attention block {item!r}; this model's attention blocks are: "
                f"{', '.join(names) if names else '(none)'}; aliases: {_aliases_text()}"
            )
    if not selected:
        raise ValueError(f"no attention block selected (layers={layers!r})")
    return [name for name in names if name in selected]


@contextlib.contextmanager
def perturb_attention(model, layers, kind="identity", rows=True, **params):
    """
    Within the context, forward passes of `model` perturb the attention map of the named blocks: by default PAG's
    identity map; `kind` and its parameters choose another perturbation of perturbations.py (e.g.
    kind="mask", drop_rate=0.5).

    :param layers: as for resolve_layers.
    :param kind: a perturbation kind (perturbations.KINDS) or a ready AttentionPerturbation.
    :param rows: which batch rows to perturb: True (all), or a slice, an index tensor or a bool mask (see
                 AttentionBlock.perturb).
    :raises ValueError: for unknown layers, an unknown kind, or missing, unknown or out-of-range parameters.
    The blocks' previous settings are restored on exit, also when the body raises.
    """
    perturbation = make_perturbation(kind, **params)
    if is_identity(perturbation):
        # The fast path: AttentionBlock computes V without any map.
        perturbation = None
    modules = dict(model.named_modules())
    blocks = [modules[name] for name in resolve_layers(model, layers)]
    previous = [(block.perturb, block.perturbation) for block in blocks]
    try:
        for block in blocks:
            block.perturb = rows
            block.perturbation = perturbation
        yield blocks
    finally:
        for block, (rows_before, perturbation_before) in zip(blocks, previous):
            block.perturb = rows_before
            block.perturbation = perturbation_before


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


def _take_rows(value, rows, batch_size):
    """
    The guided rows of a batched tensor; anything else (non-tensors, non-batched tensors) unchanged.
    """
    if rows is True or not th.is_tensor(value) or value.dim() == 0 or value.shape[0] != batch_size:
        return value
    return value[rows]


def _append_rows(value, rows, batch_size):
    """
    The batch followed by a second copy of its guided rows (the perturbed branch's inputs).
    """
    if not th.is_tensor(value) or value.dim() == 0 or value.shape[0] != batch_size:
        return value
    return th.cat([value, _take_rows(value, rows, batch_size)])


def check_scale(scale, method):
    """
    A guidance scale as a float: any finite real number (a one-element tensor too).
    """
    return real_number(scale, f"{method} scale")


def check_t_range(t_range):
    """
    None, or a pair (lo, hi) of floats with lo <= hi.
    """
    if t_range is None:
        return None
    try:
        lo, hi = t_range
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"t_range must be a pair (lo, hi) of numbers, got {t_range!r}") from None
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"t_range must not contain NaN, got {t_range!r}")
    if lo > hi:
        raise ValueError(f"t_range must satisfy lo <= hi, got ({lo:g}, {hi:g})")
    return lo, hi


def guided_rows(scale, t_range, t, batch_size):
    """
    The rows a guidance with this scale and t_range acts on: None (no row), True (every row) or a LongTensor of
    row indices (those with lo <= t <= hi).
    """
    if scale == 0:
        return None
    if t_range is None:
        return True
    t = th.as_tensor(t)
    if t.dim() == 0:
        t = t.expand(batch_size)
    lo, hi = t_range
    inside = (t >= lo) & (t <= hi)
    if bool(inside.all()):
        return True
    if not bool(inside.any()):
        return None
    return inside.nonzero().flatten()


class PAGGuidedModel:
    """
    A model wrapper whose output is guided by Perturbed-Attention Guidance; call it like the model itself,
    `guided(x, t, **model_kwargs)`, e.g. as the model of GaussianDiffusion.p_sample_loop / ddim_sample_loop.

    The first x.shape[1] output channels (eps) are guided; further channels (the learned variance of learn_sigma
    models) come from the unperturbed pass.

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
    :param kind: the perturbation of the perturbed branch (perturbations.KINDS): "identity" (PAG's, the
                 default), "mask", "drop", "blur", "avgpool2d" or "noise"; `params` are its parameters
                 (drop_rate, retain_diag, blur_sigma, blur_kernel_size, noise_scale).
    """

    def __init__(self, model, scale, layers, t_range=None, batched=True, share_prefix=True, kind="identity", **params):
        scale = check_scale(scale, "PAG")
        t_range = check_t_range(t_range)
        self.perturbation = make_perturbation(kind, **params)
        self.model = model
        self.scale = scale
        self.layers = resolve_layers(model, layers)
        self.t_range = t_range
        self.batched = bool(batched)
        self.share_prefix = bool(share_prefix)

    def __repr__(self):
        return (
            f"PAGGuidedModel(scale={self.scale}, layers={self.layers}, t_range={self.t_range}, "
            f"batched={self.batched}, share_prefix={self.share_prefix}, perturbation={self.perturbation.describe()!r})"
        )

    def describe(self):
        """
        One line for logs and messages.
        """
        interval = "all" if self.t_range is None else f"{self.t_range[0]:g}..{self.t_range[1]:g}"
        return (
            f"PAG (scale {self.scale:g}, layers {','.join(self.layers)}, t {interval}, "
            f"perturbation {self.perturbation.describe()})"
        )

    def nonfinite_hint(self):
        """
        What may make this guidance give NaN, for the samplers' non-finite guard ("" when nothing is known).
        """
        p = self.perturbation
        if p.kind == "mask" and not p.params["retain_diag"]:
            return (
                "the random mask (as in the official attention_mask) can mask every logit of an attention row, "
                "whose softmax is NaN; --pag_retain_diag (the official attention_mask_identity) never masks the "
                "diagonal, or lower --pag_drop_rate"
            )
        return ""

    def parameters(self, recurse=True):
        """
        The wrapped model's parameters, so code that finds the device from them (as ADM's samplers do) works.
        """
        return self.model.parameters(recurse)

    def guided_rows(self, t, batch_size):
        """
        The rows to guide: None (no row), True (every row) or a LongTensor of row indices.
        """
        return guided_rows(self.scale, self.t_range, t, batch_size)

    def __call__(self, x, t, **model_kwargs):
        batch_size = x.shape[0]
        rows = self.guided_rows(t, batch_size)
        if rows is None:
            return self.model(x, t, **model_kwargs)
        if not self.batched:
            plain, perturbed = self._two_passes(x, t, model_kwargs, rows)
        elif self.share_prefix and _can_share_prefix(self.model):
            plain, perturbed = self._shared_prefix_pass(x, t, model_kwargs, rows)
        else:
            plain, perturbed = self._batched_pass(x, t, model_kwargs, rows)
        return self._combine(x, plain, perturbed, rows)

    def plain_and_guided(self, x, t, **model_kwargs):
        """
        (unperturbed output, guided output) of one call, for samplers that need both, such as DPS taking its
        measurement gradient through the unperturbed x0 (see inverse.py). The perturbed branch runs without
        autograd: gradients reach the model through the unperturbed branch only, at no extra backward cost.
        """
        rows = self.guided_rows(t, x.shape[0])
        if rows is None:
            plain = self.model(x, t, **model_kwargs)
            return plain, plain
        # The perturbed pass goes first: run while the plain branch's autograd graph is held, it allocates its
        # activations beside that graph and costs about 1.4x as much at 256 px on a CPU (benchmarks/dps_step.py).
        # The plain pass draws no random numbers, so the order changes no result.
        with th.no_grad():
            perturbed = self._perturbed_pass(x, t, model_kwargs, rows)
        plain = self.model(x, t, **model_kwargs)
        return plain, self._combine(x, plain, perturbed, rows)

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

    def _two_passes(self, x, t, model_kwargs, rows):
        plain = self.model(x, t, **model_kwargs)
        return plain, self._perturbed_pass(x, t, model_kwargs, rows)

    def _perturbed_pass(self, x, t, model_kwargs, rows):
        n = x.shape[0]
        kwargs = {k: _take_rows(v, rows, n) for k, v in model_kwargs.items()}
        with perturb_attention(self.model, self.layers, self._perturbation_for(rows, n, x.device)):
            return self.model(_take_rows(x, rows, n), _take_rows(t, rows, n), **kwargs)

    def _batched_pass(self, x, t, model_kwargs, rows):
        n = x.shape[0]
        kwargs = {k: _append_rows(v, rows, n) for k, v in model_kwargs.items()}
        perturbation = self._perturbation_for(rows, n, x.device)
        with perturb_attention(self.model, self.layers, perturbation, rows=slice(n, None)):
            out = self.model(_append_rows(x, rows, n), _append_rows(t, rows, n), **kwargs)
        return out[:n], out[n:]

    def _shared_prefix_pass(self, x, t, model_kwargs, rows):
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
        perturbation = self._perturbation_for(rows, n, x.device)
        with perturb_attention(model, self.layers, perturbation, rows=slice(n, None)):
            h, _ = model.run_stages(h, emb, hs, first)
        out = model.out(h.type(x.dtype))
        return out[:n], out[n:]

    def _combine(self, x, plain, perturbed, rows):
        channels = x.shape[1]
        if plain.shape[1] not in (channels, 2 * channels):
            raise ValueError(
                f"model output has {plain.shape[1]} channels; PAG expects {channels} (eps) or {2 * channels} "
                f"(eps and variance) for an input with {channels} channels"
            )
        eps = plain[:, :channels]
        eps_perturbed = perturbed[:, :channels]
        if rows is True:
            guided = eps + self.scale * (eps - eps_perturbed)
            return th.cat([guided, plain[:, channels:]], dim=1)
        out = plain.clone()
        eps = eps[rows]
        out[rows, :channels] = eps + self.scale * (eps - eps_perturbed)
        return out
