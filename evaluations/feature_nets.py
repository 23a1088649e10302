"""
Pluggable feature networks for the evaluator.

A feature network is a torch.nn.Module (a FeatureNet subclass, or any module following the same
conventions, TorchScript included):

- forward(images) takes float32 images of shape [N x H x W x C] with values in [0, 255] at their
  native size (the way ADM feeds its Inception graph) and returns either a [N x D] tensor of
  pool features, or a tuple (pool, spatial) where spatial is [N x ...] or None. Pool features
  give FID, precision and recall; spatial features give sFID.
- logits(pool), optional, maps pool features to class logits for the Inception Score. IS is
  computed from pool features so that cached activations are enough.
- name, optional: names the network in results, caches and reference batches (defaults to the
  spec it was loaded from). Caches and reference statistics are keyed on the name together with
  a digest of the weights (net_identity), so retrained weights under the same name are noticed.
- weights_digest(), optional: that digest, when hashing state_dict() is wrong or slow.
- input_channels, optional: tuple of accepted channel counts (None accepts any).
- fid_inception, set only by evaluations.inception's network: statistics that record no network (ADM's reference
  batches) are used with it and with no other network.

- fd_label, optional: what the Fréchet distance on its pool features is called in results ("FID" when absent;
  "FD_DINOv2" for evaluations.dinov2's network).

load_feature_net() resolves the --feature_net spec of the command-line tools:
  inception              the FID Inception-v3 (weights from --inception_path and friends)
  dinov2                 DINOv2 ViT-L/14 behind EDM2's preprocessing, for FD_DINOv2 (weights from --dinov2_path,
                         else $PAG_ADM_DINOV2_PATH, else torch hub's checkpoint folder)
  package.module:factory a callable in an importable module
  path/to/file.py:factory a callable in a Python file
  path/to/net.pt         a TorchScript module saved with torch.jit.save (with a `logits`
                         method exported by @torch.jit.export for IS)
  path/to/net.pt2        a torch.export program saved with torch.export.save (forward only;
                         export it with a dynamic batch dimension)
A factory is called without arguments, or with device=... when it takes a `device` argument, and
returns the network.
"""

import hashlib
import importlib
import importlib.util
import inspect
import os

import numpy as np
import torch
import torch.nn as nn


class FeatureNet(nn.Module):
    # Set a name that changes whenever the weights change: caches are keyed on it.
    name = None
    input_channels = (3,)

    def forward(self, images):
        raise NotImplementedError

    def logits(self, pool):
        return None


def net_name(net):
    return getattr(net, "name", None) or type(net).__name__


def net_weights_digest(net):
    """
    A digest of the network's weights: its own weights_digest() when it has one, else a hash of
    its state_dict (names, dtypes, shapes and bytes). Networks without tensors get "none".
    """
    fn = getattr(net, "weights_digest", None)
    if callable(fn):
        return fn()
    if not isinstance(net, nn.Module):
        return "none"
    return state_dict_digest(net.state_dict())


def weights_candidate(path, flag, env_var, filename):
    """
    Where a feature network's weights file is looked for: the path given with `flag`, else $`env_var`, else torch
    hub's checkpoint folder (where torch.hub and the fetcher put it). Returns (how it was chosen, the path).
    """
    if path:
        return flag, path
    if os.environ.get(env_var):
        return f"${env_var}", os.environ[env_var]
    return "torch hub checkpoints", os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def state_dict_digest(state_dict, chars=16):
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not torch.is_tensor(value):
            continue
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:chars] if state_dict else "none"


def net_identity(net):
    """
    (name, weights digest): statistics and cached activations are only reused by a network
    whose identity is the same, so two networks of the same feature dimension cannot be mixed.
    """
    return net_name(net), net_weights_digest(net)


def net_is_fid_inception(net):
    """
    Whether the network computes the FID Inception's features (evaluations.inception, any weights or mode).
    Reference statistics that record no feature network, as ADM's own reference batches, are taken to be
    that network's and are used only with it.
    """
    return getattr(net, "fid_inception", False) is True


def net_channels(net):
    return getattr(net, "input_channels", None)


def net_fd_label(net):
    """What the Fréchet distance on the network's pool features is called: "FID" unless the network says."""
    return getattr(net, "fd_label", None) or "FID"


def net_logits(net, pool):
    """Class logits for the pool features, or None when the network has no classifier head."""
    fn = getattr(net, "logits", None)
    if fn is None:
        return None
    return fn(pool)


@torch.no_grad()
def embed_batch(net, batch, device):
    """
    Run one batch of NHWC images (numpy, any numeric dtype, values in [0, 255]) through the
    network. Returns (pool, spatial) as float32 numpy arrays [N x D], spatial possibly None.
    """
    batch = np.asarray(batch)
    if batch.dtype == np.uint8:
        # Move uint8 (4x less to copy) and convert on the device; the values are the same.
        images = torch.from_numpy(np.require(batch, requirements=["C", "W"])).to(device).float()
    else:
        images = torch.from_numpy(np.require(batch, np.float32, ["C", "W"])).to(device)
    out = net(images)
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(
                f"feature network {net_name(net)!r} returned {len(out)} outputs; "
                "expected pool features or (pool, spatial)"
            )
        pool, spatial = out
    else:
        pool, spatial = out, None
    pool = _flat_numpy(pool, net, "pool", len(batch))
    if spatial is not None:
        spatial = _flat_numpy(spatial, net, "spatial", len(batch))
    return pool, spatial


def _flat_numpy(tensor, net, what, n):
    if not torch.is_tensor(tensor) or tensor.ndim < 1 or tensor.shape[0] != n:
        shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(
            f"feature network {net_name(net)!r} returned {what} features of shape {shape} "
            f"for {n} images; expected a tensor with {n} rows"
        )
    flat = tensor.reshape(n, -1).float().cpu()
    if flat.untyped_storage().nbytes() != flat.numel() * flat.element_size():
        # A view (e.g. a few channels of a feature map) would keep the whole map alive for as long as the
        # features are kept, all batches of a 50k run: keep a copy of what is used.
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.numpy()


class ScriptedFeatureNet(nn.Module):
    """Adapts a TorchScript module or torch.export program to the FeatureNet conventions."""

    def __init__(self, module, name):
        super().__init__()
        self.module = module
        self.name = name
        self.input_channels = None
        self._has_logits = hasattr(module, "logits")

    def forward(self, images):
        return self.module(images)

    def train(self, mode=True):
        self.training = mode
        try:
            self.module.train(mode)
        except NotImplementedError:
            pass  # exported programs refuse train()/eval() and keep the mode they were saved in
        return self

    def logits(self, pool):
        if not self._has_logits:
            return None
        return self.module.logits(pool)


def _file_identity(path):
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _load_python_object(spec):
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise FileNotFoundError(f"feature network file {target} does not exist")
        mod_name = "_feature_net_" + os.path.splitext(os.path.basename(target))[0]
        mod_spec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"feature network spec {spec!r}: {target} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


# Networks known by a short name, as 'module:factory' strings resolved on use: this module never
# imports the networks themselves, so they can import FeatureNet from here without a cycle.
# Each factory takes those of load_feature_net's keyword arguments that it names (inception_path, fast_gpu,
# dinov2_path, device).
BUILTIN_NETS = {
    "inception": "evaluations.inception:load_inception_feature_net",
    "dinov2": "evaluations.dinov2:load_dinov2_feature_net",
}


def load_feature_net(spec="inception", device="cpu", inception_path=None, fast_gpu=False, dinov2_path=None):
    """
    Resolve a --feature_net spec (see the module docstring) to a network on `device`.
    fast_gpu asks the built-in Inception for its TF32/float16 CUDA mode; other networks ignore it.
    dinov2_path is the DINOv2 weights file of the built-in 'dinov2' (default: see evaluations.dinov2).
    """
    if spec in BUILTIN_NETS:
        factory = _load_python_object(BUILTIN_NETS[spec])
        options = dict(inception_path=inception_path, fast_gpu=fast_gpu, dinov2_path=dinov2_path, device=device)
        named = inspect.signature(factory).parameters
        net = factory(**{key: value for key, value in options.items() if key in named})
    elif ":" in spec and not os.path.isfile(spec):
        factory = _load_python_object(spec)
        if isinstance(factory, nn.Module) or not callable(factory):
            net = factory
        else:
            try:
                takes_device = "device" in inspect.signature(factory).parameters
            except (TypeError, ValueError):
                takes_device = False
            net = factory(device=device) if takes_device else factory()
        if not callable(net):
            raise TypeError(f"feature network spec {spec!r} did not give a callable network")
        if getattr(net, "name", None) is None and isinstance(net, nn.Module):
            net.name = spec
    elif os.path.isfile(spec) and spec.endswith(".pt2"):
        # torch.export programs carry only forward(), so no logits (and no IS) from these.
        module = torch.export.load(spec).module()
        net = ScriptedFeatureNet(module, "exported:" + _file_identity(spec))
    elif os.path.isfile(spec):
        try:
            module = torch.jit.load(spec, map_location=device)
        except RuntimeError as exc:
            raise ValueError(
                f"{spec}: not a TorchScript module ({str(exc).splitlines()[0]}); save the "
                "network with torch.jit.save or pass a 'module:factory' spec"
            ) from None
        net = ScriptedFeatureNet(module, "torchscript:" + _file_identity(spec))
    else:
        raise ValueError(
            f"unknown feature network {spec!r}: expected 'inception', 'dinov2', 'package.module:factory', "
            "'path/to/file.py:factory', or the path of a TorchScript (.pt) or torch.export "
            "(.pt2) file"
        )
    if isinstance(net, nn.Module):
        net = net.to(device).eval()
    return net


def load_cli_feature_net(spec, device, inception_path, fast_gpu=False, dinov2_path=None):
    """load_feature_net for the command-line tools: a failure is one line (ValueError)."""
    if fast_gpu and torch.device(device).type != "cuda":
        raise ValueError(f"--fast_gpu speeds up CUDA only; drop it for --device {device}")
    try:
        return load_feature_net(
            spec, device=device, inception_path=inception_path, fast_gpu=fast_gpu, dinov2_path=dinov2_path
        )
    except (ValueError, FileNotFoundError):
        raise
    except (ImportError, AttributeError, TypeError) as exc:
        raise ValueError(f"--feature_net {spec!r} cannot be loaded: {exc}") from None
