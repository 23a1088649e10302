"""
The guided prediction in plain words: run the model, run it again under the method's perturbation, and push the
prediction away from the perturbed one,

    eps_guided = eps + s * (eps - eps_perturbed)

on the eps channels, the learned-variance channels (learn_sigma models) taken from the plain pass. Every row is
guided and each pass sees the whole batch. PAGGuidedModel (pag.py) computes the same thing faster: both branches
in one batched pass, the stages before the first perturbed block run once (shared prefix), only the rows inside
t_range perturbed; tests/methods/test_pag.py holds each of its paths equal to this statement.
"""

import torch as th

from .pag import perturb_attention


def two_pass_guided(model, x, t, scale, perturbed, **model_kwargs):
    """
    :param perturbed: a callable returning the context manager under which `model` makes the perturbed prediction.
    :return: the guided model output, shaped as the model's.
    """
    plain = model(x, t, **model_kwargs)
    with perturbed():
        worse = model(x, t, **model_kwargs)
    c = x.shape[1]
    eps, eps_perturbed = plain[:, :c], worse[:, :c]
    return th.cat([eps + scale * (eps - eps_perturbed), plain[:, c:]], dim=1)


def pag_two_pass(model, x, t, scale, layers, kind="identity", **model_kwargs):
    """
    Perturbed-Attention Guidance: the second pass with the attention maps of `layers` perturbed (PAG's identity
    map by default; `kind` as for perturb_attention, a kind's name or a ready AttentionPerturbation).
    """
    return two_pass_guided(model, x, t, scale, lambda: perturb_attention(model, layers, kind), **model_kwargs)
