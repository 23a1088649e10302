"""
Mixed-precision helpers: converting the U-Net's convolutions to float16 and training them with float32 master
weights and a dynamic loss scale.
"""

import numpy as np
import torch as th
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import logger

INITIAL_LOG_LOSS_SCALE = 20.0

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(l):
    """
    Convert a convolution to float16. Everything else (norms, linears, embeddings) stays float32, as in ADM.
    """
    if isinstance(l, _CONV_TYPES):
        l.weight.data = l.weight.data.half()
        if l.bias is not None:
            l.bias.data = l.bias.data.half()


def convert_module_to_f32(l):
    """
    Undo convert_module_to_f16().
    """
    if isinstance(l, _CONV_TYPES):
        l.weight.data = l.weight.data.float()
        if l.bias is not None:
            l.bias.data = l.bias.data.float()


def get_param_groups_and_shapes(named_model_params):
    # Vectors and scalars are flattened into one master tensor, matrices and kernels into another.
    named_model_params = list(named_model_params)
    scalar_vector_named_params = ([(n, p) for (n, p) in named_model_params if p.ndim <= 1], (-1))
    matrix_named_params = ([(n, p) for (n, p) in named_model_params if p.ndim > 1], (1, -1))
    return [scalar_vector_named_params, matrix_named_params]


def make_master_params(param_groups_and_shapes):
    """
    Copy the model parameters into flat float32 master tensors, one per group.
    """
    master_params = []
    for param_group, shape in param_groups_and_shapes:
        flat = _flatten_dense_tensors([param.detach().float() for (_, param) in param_group])
        master_param = nn.Parameter(flat.view(shape))
        master_param.requires_grad = True
        master_params.append(master_param)
    return master_params


def param_grad_or_zeros(param):
    if param.grad is not None:
        return param.grad.data.detach()
    return th.zeros_like(param)


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    """
    Copy the (float16) model gradients into the master parameters' gradients.
    """
    for master_param, (param_group, shape) in zip(master_params, param_groups_and_shapes):
        grads = [param_grad_or_zeros(param) for (_, param) in param_group]
        master_param.grad = _flatten_dense_tensors(grads).view(shape)


def unflatten_master_params(param_group, master_param):
    return _unflatten_dense_tensors(master_param, [param for (_, param) in param_group])


def master_params_to_model_params(param_groups_and_shapes, master_params):
    """
    Copy the master parameters back into the model parameters.
    """
    for master_param, (param_group, _) in zip(master_params, param_groups_and_shapes):
        unflat = unflatten_master_params(param_group, master_param.view(-1))
        for (_, param), value in zip(param_group, unflat):
            param.detach().copy_(value)


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    state_dict = model.state_dict()
    if use_fp16:
        for master_param, (param_group, _) in zip(master_params, param_groups_and_shapes):
            unflat = unflatten_master_params(param_group, master_param.view(-1))
            for (name, _), value in zip(param_group, unflat):
                assert name in state_dict
                state_dict[name] = value
    else:
        for i, (name, _value) in enumerate(model.named_parameters()):
            assert name in state_dict
            state_dict[name] = master_params[i]
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    if use_fp16:
        named_model_params = [(name, state_dict[name]) for name, _ in model.named_parameters()]
        param_groups_and_shapes = get_param_groups_and_shapes(named_model_params)
        return make_master_params(param_groups_and_shapes)
    return [state_dict[name] for name, _ in model.named_parameters()]


def zero_master_grads(master_params):
    for param in master_params:
        param.grad = None


def zero_grad(model_params):
    for param in model_params:
        if param.grad is not None:
            param.grad.detach_()
            param.grad.zero_()


def check_overflow(value):
    return (value == float("inf")) or (value == -float("inf")) or (value != value)


class MixedPrecisionTrainer:
    """
    Owns the optimiser-facing (master) parameters of a model. With use_fp16, the model's convolutions run in
    float16 while the optimiser updates float32 copies; the loss is scaled by 2**lg_loss_scale, which shrinks on
    overflow and grows slowly otherwise.
    """

    def __init__(
        self,
        *,
        model,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
    ):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth

        self.model_params = list(self.model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = initial_lg_loss_scale

        if self.use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(self.model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            self.model.convert_to_fp16()

    def zero_grad(self):
        zero_grad(self.model_params)

    def backward(self, loss):
        if self.use_fp16:
            (loss * (2 ** self.lg_loss_scale)).backward()
        else:
            loss.backward()

    def optimize(self, opt):
        if self.use_fp16:
            return self._optimize_fp16(opt)
        return self._optimize_normal(opt)

    def _optimize_fp16(self, opt):
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        grad_norm, param_norm = self._compute_norms(grad_scale=2 ** self.lg_loss_scale)
        if check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_master_grads(self.master_params)
            return False

        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)

        for p in self.master_params:
            p.grad.mul_(1.0 / (2 ** self.lg_loss_scale))
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt):
        grad_norm, param_norm = self._compute_norms()
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    def _compute_norms(self, grad_scale=1.0):
        grad_norm = 0.0
        param_norm = 0.0
        with th.no_grad():
            for p in self.master_params:
                param_norm += th.norm(p, p=2, dtype=th.float32).item() ** 2
                if p.grad is not None:
                    grad_norm += th.norm(p.grad, p=2, dtype=th.float32).item() ** 2
        return np.sqrt(grad_norm) / grad_scale, np.sqrt(param_norm)

    def master_params_to_state_dict(self, master_params):
        return master_params_to_state_dict(
            self.model, self.param_groups_and_shapes, master_params, self.use_fp16
        )

    def state_dict_to_master_params(self, state_dict):
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)
