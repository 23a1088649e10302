"""
ADM's U-Net (UNetModel, SuperResModel) and noisy-image classifier (EncoderUNetModel).

Module names and registration order match the released checkpoints exactly; attention blocks additionally carry
the hook that guidance methods perturb or read them through (AttentionBlock.hook; the methods set it with
attention_hooks.py and name the blocks with attention_layers.py). docs/adm_delta.md lists every change to ADM.
"""

from abc import abstractmethod
import functools
import math

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .common.attention_backends import resolved_attention_backend, sdpa
from .common.state_dict_check import StateDictCheckMixin
from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    checkpoint,
    conv_nd,
    linear,
    avg_pool_nd,
    zero_module,
    normalization,
    timestep_embedding,
    SiLU,
)


class AttentionPool2d(nn.Module):
    """
    Attention pooling (as in CLIP): the mean token attends over all spatial tokens, with a learned positional
    embedding; the classifier's "attention" head.
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            th.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c, *_spatial = x.shape
        x = x.reshape(b, c, -1)
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None, :, :].to(x.dtype)
        x = self.qkv_proj(x)
        x = self.attention(x)
        x = self.c_proj(x)
        return x[:, :, 0]


class TimestepBlock(nn.Module):
    """
    A module whose forward takes the timestep embedding as a second argument.
    """

    @abstractmethod
    def forward(self, x, emb):
        """
        Apply the module to `x` given `emb` timestep embeddings.
        """


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """
    A sequential module that hands the timestep embedding to the children that take one.
    """

    def forward(self, x, emb):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """
    Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution. For 3D signals only the inner two
    dimensions are upsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """
    2x downsampling by a strided 3x3 convolution, or by average pooling. For 3D signals only the inner two
    dimensions are downsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """
    A residual block conditioned on the timestep embedding, optionally changing the channel count and up- or
    downsampling (resblock_updown).

    :param use_conv: with a channel change, use a 3x3 rather than a 1x1 convolution on the skip path.
    :param use_scale_shift_norm: condition by GroupNorm(h) * (1 + scale) + shift instead of adding the embedding.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            SiLU(),
            linear(
                emb_channels,
                2 * self.out_channels if use_scale_shift_norm else self.out_channels,
            ),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # Resample between the norm/activation and the convolution, so the conv runs at the new resolution.
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = h + emb_out
            h = self.out_layers(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """
    Multi-head self-attention over all spatial positions.

    `hook` (attention_hooks.AttentionHook, None by default) is how guidance changes the block: its perturbation
    replaces the attention map of the selected batch rows (Perturbed-Attention Guidance: by the identity, so each
    token attends only to itself and the attention output is V, per head; proj_out and the residual apply as
    usual), and its capture sees the block's qkv on every forward (Self-Attention Guidance reads the map from it).
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert (
                channels % num_head_channels == 0
            ), f"q,k,v channels {channels} is not divisible by num_head_channels {num_head_channels}"
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if use_new_attention_order:
            # Split qkv before splitting heads.
            self.attention = QKVAttention(self.num_heads)
        else:
            # Split heads before splitting qkv.
            self.attention = QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))
        self.hook = None

    def forward(self, x):
        # ADM checkpoints attention blocks whenever gradients are needed, whatever use_checkpoint says: the
        # attention maps are the largest activations of the network. The hook is bound now: the backward pass
        # recomputes _forward, possibly after the caller has put the previous hook back.
        return checkpoint(functools.partial(self._forward, hook=self.hook), (x,), self.parameters(), True)

    def _forward(self, x, hook=None):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        if hook is not None and hook.capture is not None:
            hook.capture(qkv, tuple(spatial))
        if hook is None or hook.perturbation is None:
            h = self.attention(qkv)
        else:
            h = self._perturbed_attention(qkv, hook.perturbation, _hook_rows(hook, b, qkv.device))
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)

    def _perturbed_attention(self, qkv, perturbation, mask):
        """
        The attention with the perturbation applied to the map of the rows in `mask` (None: every row).
        """
        if mask is not None and not bool(mask.any()):
            return self.attention(qkv)
        if perturbation.kind == "identity":
            identity = self.attention.values(qkv)
            if mask is None:
                return identity
            # Only the unperturbed rows pay for the attention map.
            out = identity.clone()
            out[~mask] = self.attention(qkv[~mask])
            return out
        if mask is None:
            # The whole batch in one call: random perturbations then draw with the full map's shape, as the
            # official modules do.
            return self.attention.attend_with_map(qkv, perturbation.logits, perturbation.weights)
        perturbed = self.attention.attend_with_map(qkv[mask], perturbation.logits, perturbation.weights)
        out = perturbed.new_empty((qkv.shape[0],) + tuple(perturbed.shape[1:]))
        out[mask] = perturbed
        out[~mask] = self.attention(qkv[~mask])
        return out


def _hook_rows(hook, batch_size, device):
    """
    The hook's rows for a batch: None (every row) or a bool mask [batch_size] that selects some, not all, rows.
    """
    rows = hook.rows
    if rows is None:
        return None
    if rows.shape != (batch_size,):
        raise ValueError(f"perturbation mask has shape {tuple(rows.shape)}, expected ({batch_size},) for this batch")
    rows = rows.to(device)
    # Every row takes the whole-batch path, so a random perturbation draws with the full map's shape.
    if bool(rows.all()):
        return None
    return rows


def _attention_map(q, k, logits_fn=None):
    """
    ADM's attention map softmax(q^T k / sqrt(C)) per head ([N*H x C x T] each -> [N*H x T x T]), the softmax in
    float32; logits_fn, if given, changes the scaled logits first.
    """
    # Scaling q and k separately by ch**-1/4 keeps float16 products in range.
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = th.einsum("bct,bcs->bts", q * scale, k * scale)
    if logits_fn is not None:
        weight = logits_fn(weight)
    return th.softmax(weight.float(), dim=-1).type(weight.dtype)


def _attend_heads(q, k, v, bs, length, logits_fn=None, weights_fn=None, capture=None):
    """
    ADM's einsum attention per head ([N*H x C x T] each), with the map's hooks of attend_with_map.
    """
    weight = _attention_map(q, k, logits_fn)
    if weights_fn is not None:
        weight = weights_fn(weight)
    if capture is not None:
        capture(weight)
    a = th.einsum("bts,bcs->bct", weight, v)
    return a.reshape(bs, -1, length)


def count_flops_attn(model, _x, y):
    """
    A thop counter for the attention matmuls, which thop does not see.
    """
    b, c, *spatial = y[0].shape
    num_spatial = int(math.prod(spatial))
    # Two matmuls of the same size: the weights, then the weighted values.
    matmul_ops = 2 * b * (num_spatial ** 2) * c
    model.total_ops += th.DoubleTensor([matmul_ops])


class _HeadAttention(nn.Module):
    """
    What both qkv layouts share: the attention kernels (see attention_backends.py), V alone for an identity map, and
    the map written out. A subclass says how its layout splits into per-head q, k and v.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def _head_width(self, qkv):
        assert qkv.shape[1] % (3 * self.n_heads) == 0
        return qkv.shape[1] // (3 * self.n_heads)

    def _split(self, qkv):
        """
        (q, k, v), each [N*H x C x T].
        """
        raise NotImplementedError

    def _sdpa_view(self, qkv):
        """
        The [3 x N x H x C x T] view of qkv that attention_backends.sdpa takes.
        """
        raise NotImplementedError

    def forward(self, qkv):
        """
        :param qkv: an [N x (3 * H * C) x T] tensor of Qs, Ks and Vs, in the subclass's layout.
        :return: an [N x (H * C) x T] tensor after attention.
        """
        if resolved_attention_backend() == "sdpa":
            return sdpa(self._sdpa_view(qkv))
        bs, _, length = qkv.shape
        return _attend_heads(*self._split(qkv), bs, length)

    def values(self, qkv):
        """
        The output attention would give with an identity attention map: V, in the output layout.
        """
        bs, _, length = qkv.shape
        return self._split(qkv)[2].reshape(bs, -1, length)

    def weights(self, qkv):
        """
        The attention map (ADM's einsum formulation), [N x H x T x T].
        """
        bs, _, length = qkv.shape
        q, k, _ = self._split(qkv)
        return _attention_map(q, k).reshape(bs, self.n_heads, length, length)

    def attend_with_map(self, qkv, logits_fn=None, weights_fn=None, capture=None):
        """
        Attention with its map written out (ADM's einsum formulation), so the map can be changed or read.

        :param logits_fn: applied to the [N*H x T x T] scaled logits before the softmax (returns the new logits).
        :param weights_fn: applied to the [N*H x T x T] map after the softmax (returns the new map).
        :param capture: called with the map that is applied to V.
        :return: an [N x (H * C) x T] tensor, as forward().
        """
        bs, _, length = qkv.shape
        return _attend_heads(*self._split(qkv), bs, length, logits_fn, weights_fn, capture)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)


class QKVAttentionLegacy(_HeadAttention):
    """
    QKV attention with the heads split before q, k and v (the layout of most released checkpoints).
    """

    def _split(self, qkv):
        bs, _, length = qkv.shape
        ch = self._head_width(qkv)
        return qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)

    def _sdpa_view(self, qkv):
        # Per head, the channels hold q, k and v in turn.
        bs, _, length = qkv.shape
        return qkv.reshape(bs, self.n_heads, 3, self._head_width(qkv), length).permute(2, 0, 1, 3, 4)


class QKVAttention(_HeadAttention):
    """
    QKV attention with q, k and v split before the heads (use_new_attention_order, and the classifier's pool).
    """

    def _split(self, qkv):
        bs, _, length = qkv.shape
        ch = self._head_width(qkv)
        return tuple(part.reshape(bs * self.n_heads, ch, length) for part in qkv.chunk(3, dim=1))

    def _sdpa_view(self, qkv):
        # All the qs, then all the ks, then all the vs, each split into heads.
        bs, _, length = qkv.shape
        return qkv.reshape(bs, 3, self.n_heads, self._head_width(qkv), length).transpose(0, 1)

    def values(self, qkv):
        # V is already in the output layout: a view, no copy.
        self._head_width(qkv)
        return qkv.chunk(3, dim=1)[2]


def _build_encoder(
    model,
    in_channels,
    model_channels,
    time_embed_dim,
    num_res_blocks,
    attention_resolutions,
    dropout,
    channel_mult,
    conv_resample,
    dims,
    use_checkpoint,
    num_heads,
    num_head_channels,
    use_scale_shift_norm,
    resblock_updown,
    use_new_attention_order,
):
    """
    Register the input blocks and the middle block on `model` (shared by the U-Net and the classifier, in
    ADM's registration order). Returns (channels at the bottom, channels of every input block, final ds).
    """

    def res_block(ch, out_ch, **kwargs):
        return ResBlock(
            ch,
            time_embed_dim,
            dropout,
            out_channels=out_ch,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            **kwargs,
        )

    def attention_block(ch):
        return AttentionBlock(
            ch,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
        )

    ch = int(channel_mult[0] * model_channels)
    model.input_blocks = nn.ModuleList(
        [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
    )
    input_block_chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res_block(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attention_block(ch))
            model.input_blocks.append(TimestepEmbedSequential(*layers))
            input_block_chans.append(ch)
        if level != len(channel_mult) - 1:
            out_ch = ch
            if resblock_updown:
                down = res_block(ch, out_ch, down=True)
            else:
                down = Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)
            model.input_blocks.append(TimestepEmbedSequential(down))
            ch = out_ch
            input_block_chans.append(ch)
            ds *= 2

    model.middle_block = TimestepEmbedSequential(
        res_block(ch, None),
        attention_block(ch),
        res_block(ch, None),
    )
    return ch, input_block_chans, ds


class UNetModel(StateDictCheckMixin, nn.Module):
    """
    The full U-Net with attention and timestep embedding.

    :param in_channels: channels in the input Tensor.
    :param model_channels: base channel count for the model.
    :param out_channels: channels in the output Tensor.
    :param num_res_blocks: number of residual blocks per downsample.
    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which to use attention.
    :param dropout: the dropout probability.
    :param channel_mult: channel multiplier for each level of the UNet.
    :param conv_resample: if True, use learned convolutions for upsampling and downsampling.
    :param dims: determines if the signal is 1D, 2D, or 3D.
    :param num_classes: if specified (as an int), this model will be class-conditional with that many classes.
    :param use_checkpoint: use gradient checkpointing to reduce memory usage.
    :param num_heads: the number of attention heads in each attention layer.
    :param num_head_channels: if specified, ignore num_heads and use a fixed channel width per attention head.
    :param num_heads_upsample: with num_heads, a different number of heads for upsampling. Deprecated.
    :param use_scale_shift_norm: use a FiLM-like conditioning mechanism.
    :param resblock_updown: use residual blocks for up/downsampling.
    :param use_new_attention_order: use a different attention pattern for potentially increased efficiency.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__()

        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = th.float16 if use_fp16 else th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        ch, input_block_chans, ds = _build_encoder(
            self,
            in_channels,
            model_channels,
            time_embed_dim,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            conv_resample,
            dims,
            use_checkpoint,
            num_heads,
            num_head_channels,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
        )
        input_ch = int(channel_mult[0] * model_channels)

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [
                    ResBlock(
                        ch + ich,
                        time_embed_dim,
                        dropout,
                        out_channels=int(model_channels * mult),
                        dims=dims,
                        use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm,
                    )
                ]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch,
                            use_checkpoint=use_checkpoint,
                            num_heads=num_heads_upsample,
                            num_head_channels=num_head_channels,
                            use_new_attention_order=use_new_attention_order,
                        )
                    )
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(
                        ResBlock(
                            ch,
                            time_embed_dim,
                            dropout,
                            out_channels=out_ch,
                            dims=dims,
                            use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm,
                            up=True,
                        )
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self):
        """
        Convert the torso of the model to float16.
        """
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        self.output_blocks.apply(convert_module_to_f16)
        # The torso's input is cast to self.dtype; keeping it in step lets a model built without use_fp16 be
        # converted (ADM sets it only from the constructor flag, and such a model fails on its first conv).
        self.dtype = th.float16

    def convert_to_fp32(self):
        """
        Convert the torso of the model to float32.
        """
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.output_blocks.apply(convert_module_to_f32)
        self.dtype = th.float32

    def embed(self, timesteps, y=None):
        """
        The conditioning vector the residual blocks receive: timestep embedding plus class embedding.
        """
        assert (y is not None) == (
            self.num_classes is not None
        ), "must specify y if and only if the model is class-conditional"
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            assert y.shape == (timesteps.shape[0],)
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, timesteps, y=None):
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] Tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :param y: an [N] Tensor of labels, if class-conditional.
        :return: an [N x C x ...] Tensor of outputs.
        """
        emb = self.embed(timesteps, y)
        h, _ = self.run_stages(x.type(self.dtype), emb, [])
        h = h.type(x.dtype)
        return self.out(h)

    @property
    def num_stages(self):
        """
        The number of torso stages: every input block, the middle block, every output block.
        """
        return len(self.input_blocks) + 1 + len(self.output_blocks)

    def run_stages(self, h, emb, hs, start=0, stop=None):
        """
        Run the torso stages start, ..., stop - 1 (input blocks, then the middle block, then output blocks).

        Split out of forward so a caller can stop after some stages and resume from the state (h, hs), e.g. to
        share the stages before the first perturbed attention block between PAG's two branches.

        :param h: the activations entering stage `start` (for stage 0, the input in the torso's dtype).
        :param emb: the conditioning vector from embed().
        :param hs: the skip connections of the input blocks run so far; extended and consumed in place.
        :return: (h, hs) after stage stop - 1.
        """
        num_inputs = len(self.input_blocks)
        stop = self.num_stages if stop is None else stop
        for index in range(start, stop):
            if index < num_inputs:
                h = self.input_blocks[index](h, emb)
                hs.append(h)
            elif index == num_inputs:
                h = self.middle_block(h, emb)
            else:
                h = th.cat([h, hs.pop()], dim=1)
                h = self.output_blocks[index - num_inputs - 1](h, emb)
        return h, hs


class SuperResModel(UNetModel):
    """
    A U-Net conditioned on a low-resolution image, which is upsampled bilinearly and concatenated to the input.
    """

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        x = self.concat_low_res(x, low_res)
        return super().forward(x, timesteps, **kwargs)

    def concat_low_res(self, x, low_res):
        _, _, new_height, new_width = x.shape
        upsampled = F.interpolate(low_res, (new_height, new_width), mode="bilinear")
        return th.cat([x, upsampled], dim=1)


class EncoderUNetModel(StateDictCheckMixin, nn.Module):
    """
    The half U-Net (encoder and middle block) with a pooling head: ADM's noisy-image classifier.

    :param pool: "adaptive", "attention", "spatial" or "spatial_v2".
    For the other arguments, see UNetModel.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()

        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = th.float16 if use_fp16 else th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        ch, input_block_chans, ds = _build_encoder(
            self,
            in_channels,
            model_channels,
            time_embed_dim,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            conv_resample,
            dims,
            use_checkpoint,
            num_heads,
            num_head_channels,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
        )
        # The spatial heads read the mean of every input block's output and of the middle block's.
        self._feature_size = sum(input_block_chans) + ch

        self.pool = pool
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            assert num_head_channels != -1, "the attention pool needs num_head_channels"
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                AttentionPool2d((image_size // ds), ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, self.out_channels),
            )
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                SiLU(),
                nn.Linear(2048, self.out_channels),
            )
        else:
            raise NotImplementedError(
                f"Unexpected {pool} pooling; use adaptive, attention, spatial or spatial_v2"
            )

    def convert_to_fp16(self):
        """
        Convert the torso of the model to float16.
        """
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        # As in UNetModel: the torso's input is cast to self.dtype.
        self.dtype = th.float16

    def convert_to_fp32(self):
        """
        Convert the torso of the model to float32.
        """
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.dtype = th.float32

    def forward(self, x, timesteps):
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] Tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :return: an [N x K] Tensor of outputs.
        """
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))

        results = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if self.pool.startswith("spatial"):
                results.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            results.append(h.type(x.dtype).mean(dim=(2, 3)))
            h = th.cat(results, dim=-1)
            return self.out(h)
        h = h.type(x.dtype)
        return self.out(h)
