"""
The released files the scripts need: where each is published and where it goes.

This is the one place that records their URLs, each as its project publishes it (ADM's checkpoints: the README of
openai/guided-diffusion; ADM's reference batches: its evaluations/README.md; the FID Inception weights: the
pytorch-fid release; the DINOv2 ViT-L/14 weights of FD_DINOv2: the URL facebookresearch/dinov2's hub code
builds; LPIPS's linear layers: the files in richzhang/PerceptualSimilarity; the LPIPS backbones:
torchvision's model URLs; DPS's FFHQ model: the DPS README's Google Drive folder). Nothing here touches the
network: `python scripts/fetch_assets.py NAME` downloads, and only when asked. The other scripts only name that
command in their missing-file messages (fetch_hint).
How a downloaded copy is checked lives in asset_checks.py (it builds the networks, so it sits above ADM).
"""

import difflib
import os
from dataclasses import dataclass, field

import torch

from .errors import REPO_ROOT

BASE_URL_ENV = "PAG_ADM_ASSET_BASE_URL"
INCEPTION_PATH_ENV = "PAG_ADM_INCEPTION_PATH"
DINOV2_PATH_ENV = "PAG_ADM_DINOV2_PATH"

ADM_RELEASE = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
ADM_REF_BATCHES = ADM_RELEASE + "ref_batches/"
ADM_README = "openai/guided-diffusion README, 'Download pre-trained models'"
ADM_EVAL_README = "openai/guided-diffusion evaluations/README.md, 'Download batches'"


@dataclass(frozen=True)
class Asset:
    """
    One file. `folder` is "models" or "datasets" (under the repository root) or "torch_hub" (torch's checkpoint
    folder, where the evaluator looks for the Inception and DINOv2 weights). `check` names how a copy is verified:
    "checkpoint" (loads strict=True into the architecture `builder` builds from `flags`), "reference_batch"
    (an npz with uint8 N x H x W x 3 images in arr_0), "sha256_name" (its sha256 starts with the hex in its
    published name), "dinov2_vitl14" (exactly the keys and shapes of the published DINOv2 ViT-L/14),
    "lpips_linear" (LPIPS v0.1's linear layers for `flags["net"]`). An empty `url` means the file cannot be fetched
    by plain HTTP: `manual` then says how to get it.
    """

    name: str
    url: str
    folder: str
    check: str
    what: str
    source: str
    builder: str = ""
    flags: dict = field(default_factory=dict)
    manual: str = ""
    aliases: tuple = ()
    env_path: str = ""

    @property
    def published_name(self):
        return self.url.rsplit("/", 1)[-1] if self.url else self.name


# --- architectures: the flags of openai/guided-diffusion's README for each checkpoint (the rest at defaults) -------

_ADM256 = dict(
    attention_resolutions="32,16,8", diffusion_steps=1000, image_size=256, learn_sigma=True,
    noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
    use_scale_shift_norm=True,
)
_CLASSIFIER = dict(
    classifier_attention_resolutions="32,16,8", classifier_depth=2, classifier_width=128,
    classifier_pool="attention", classifier_resblock_updown=True, classifier_use_scale_shift_norm=True,
)
ARCHITECTURES = {
    "64x64_diffusion": ("model", dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, dropout=0.1, image_size=64,
        learn_sigma=True, noise_schedule="cosine", num_channels=192, num_head_channels=64, num_res_blocks=3,
        resblock_updown=True, use_new_attention_order=True, use_scale_shift_norm=True)),
    "128x128_diffusion": ("model", dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=128, learn_sigma=True,
        noise_schedule="linear", num_channels=256, num_heads=4, num_res_blocks=2, resblock_updown=True,
        use_scale_shift_norm=True)),
    "256x256_diffusion": ("model", dict(_ADM256, class_cond=True)),
    "256x256_diffusion_uncond": ("model", dict(_ADM256, class_cond=False)),
    "512x512_diffusion": ("model", dict(_ADM256, class_cond=True, image_size=512)),
    "64x64_classifier": ("classifier", dict(_CLASSIFIER, image_size=64, classifier_depth=4)),
    "128x128_classifier": ("classifier", dict(_CLASSIFIER, image_size=128)),
    "256x256_classifier": ("classifier", dict(_CLASSIFIER, image_size=256)),
    "512x512_classifier": ("classifier", dict(_CLASSIFIER, image_size=512)),
    "64_256_upsampler": ("upsampler", dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, large_size=256, small_size=64,
        learn_sigma=True, noise_schedule="linear", num_channels=192, num_heads=4, num_res_blocks=2,
        resblock_updown=True, use_scale_shift_norm=True)),
    "128_512_upsampler": ("upsampler", dict(
        attention_resolutions="32,16", class_cond=True, diffusion_steps=1000, large_size=512, small_size=128,
        learn_sigma=True, noise_schedule="linear", num_channels=192, num_head_channels=64, num_res_blocks=2,
        resblock_updown=True, use_scale_shift_norm=True)),
    # The LSUN models use the unconditional 256x256 architecture (dropout changes no weights).
    "lsun": ("model", dict(_ADM256, class_cond=False, dropout=0.1)),
    # DPS's configs/model_config.yaml, as configs/ffhq256/ffhq256_model.cfg gives it.
    "ffhq_10m": ("model", dict(
        image_size=256, num_channels=128, num_res_blocks=1, attention_resolutions="16", num_heads=4,
        num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True, class_cond=False,
        dropout=0.0)),
}


def _adm_checkpoint(name, architecture, what):
    builder, flags = ARCHITECTURES[architecture]
    return Asset(name, ADM_RELEASE + name, "models", "checkpoint", what, ADM_README, builder, flags)


def _reference_batch(subpath, what):
    name = subpath.rsplit("/", 1)[-1]
    return Asset(name, ADM_REF_BATCHES + subpath, "datasets", "reference_batch", what, ADM_EVAL_README)


INCEPTION = "pt_inception-2015-12-05-6726825d.pth"
DINOV2 = "dinov2_vitl14_pretrain.pth"

ASSETS = [
    _adm_checkpoint("64x64_diffusion.pt", "64x64_diffusion", "ADM ImageNet 64x64 class-conditional diffusion model"),
    _adm_checkpoint("64x64_classifier.pt", "64x64_classifier", "ADM ImageNet 64x64 noisy-image classifier"),
    _adm_checkpoint("128x128_diffusion.pt", "128x128_diffusion", "ADM ImageNet 128x128 class-conditional diffusion model"),
    _adm_checkpoint("128x128_classifier.pt", "128x128_classifier", "ADM ImageNet 128x128 noisy-image classifier"),
    _adm_checkpoint("256x256_diffusion.pt", "256x256_diffusion", "ADM ImageNet 256x256 class-conditional diffusion model"),
    _adm_checkpoint("256x256_diffusion_uncond.pt", "256x256_diffusion_uncond", "ADM ImageNet 256x256 unconditional diffusion model"),
    _adm_checkpoint("256x256_classifier.pt", "256x256_classifier", "ADM ImageNet 256x256 noisy-image classifier"),
    _adm_checkpoint("512x512_diffusion.pt", "512x512_diffusion", "ADM ImageNet 512x512 class-conditional diffusion model"),
    _adm_checkpoint("512x512_classifier.pt", "512x512_classifier", "ADM ImageNet 512x512 noisy-image classifier"),
    _adm_checkpoint("64_256_upsampler.pt", "64_256_upsampler", "ADM 64 -> 256 upsampler"),
    _adm_checkpoint("128_512_upsampler.pt", "128_512_upsampler", "ADM 128 -> 512 upsampler"),
    _adm_checkpoint("lsun_bedroom.pt", "lsun", "ADM LSUN bedroom diffusion model"),
    _adm_checkpoint("lsun_cat.pt", "lsun", "ADM LSUN cat diffusion model"),
    _adm_checkpoint("lsun_horse.pt", "lsun", "ADM LSUN horse diffusion model"),
    _adm_checkpoint("lsun_horse_nodropout.pt", "lsun", "ADM LSUN horse diffusion model, trained without dropout"),
    _reference_batch("imagenet/64/VIRTUAL_imagenet64_labeled.npz", "ADM reference batch, ImageNet 64x64"),
    _reference_batch("imagenet/128/VIRTUAL_imagenet128_labeled.npz", "ADM reference batch, ImageNet 128x128"),
    _reference_batch("imagenet/256/VIRTUAL_imagenet256_labeled.npz", "ADM reference batch, ImageNet 256x256"),
    _reference_batch("imagenet/512/VIRTUAL_imagenet512.npz", "ADM reference batch, ImageNet 512x512"),
    _reference_batch("lsun/bedroom/VIRTUAL_lsun_bedroom256.npz", "ADM reference batch, LSUN bedroom"),
    _reference_batch("lsun/cat/VIRTUAL_lsun_cat256.npz", "ADM reference batch, LSUN cat"),
    _reference_batch("lsun/horse/VIRTUAL_lsun_horse256.npz", "ADM reference batch, LSUN horse"),
    Asset(
        INCEPTION, "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION,
        "torch_hub", "sha256_name", "FID Inception-v3 weights (the evaluator's feature network)",
        "mseitzer/pytorch-fid release 'fid_weights'", env_path=INCEPTION_PATH_ENV,
    ),
    Asset(
        # facebookresearch/dinov2 hub/backbones.py: _DINOV2_BASE_URL + /dinov2_vitl14/dinov2_vitl14_pretrain.pth. In
        # torch hub's checkpoint folder, where torch.hub.load_state_dict_from_url caches it too.
        DINOV2, "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + DINOV2, "torch_hub", "dinov2_vitl14",
        "DINOv2 ViT-L/14 weights (the evaluator's --feature_net dinov2, for FD_DINOv2)",
        "facebookresearch/dinov2 hub code (dinov2/hub/backbones.py)", env_path=DINOV2_PATH_ENV,
    ),
    Asset(
        "lpips_vgg.pth", "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
        "models", "lpips_linear", "LPIPS v0.1 linear layers for VGG16 (weights/v0.1/vgg.pth)",
        "richzhang/PerceptualSimilarity, lpips/weights/v0.1/", flags={"net": "vgg"}, aliases=("vgg.pth",),
    ),
    Asset(
        "lpips_alex.pth", "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
        "models", "lpips_linear", "LPIPS v0.1 linear layers for AlexNet (weights/v0.1/alex.pth)",
        "richzhang/PerceptualSimilarity, lpips/weights/v0.1/", flags={"net": "alex"}, aliases=("alex.pth",),
    ),
    Asset(
        "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", "models", "sha256_name",
        "VGG16 ImageNet weights, the LPIPS backbone DPS reports", "torchvision's model URLs (torchvision/models/vgg.py)",
    ),
    Asset(
        "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "models",
        "sha256_name", "AlexNet ImageNet weights, LPIPS's default backbone",
        "torchvision's model URLs (torchvision/models/alexnet.py)",
    ),
    Asset(
        "ffhq_10m.pt", "", "models", "checkpoint", "DPS's FFHQ 256 diffusion model",
        "DPS2022/diffusion-posterior-sampling README, 'Download pretrained checkpoint'",
        *ARCHITECTURES["ffhq_10m"],
        manual="DPS publishes it in a Google Drive folder, which plain HTTP cannot download: open "
        "https://drive.google.com/drive/folders/1jElnRoFv7b31fG0v6pTSQkelbSX3xGZh?usp=sharing in a browser and "
        "download ffhq_10m.pt",
    ),
]

GROUPS = {
    "adm64": ["64x64_diffusion.pt", "64x64_classifier.pt"],
    "adm128": ["128x128_diffusion.pt", "128x128_classifier.pt"],
    "adm256": ["256x256_diffusion.pt", "256x256_diffusion_uncond.pt", "256x256_classifier.pt"],
    "adm512": ["512x512_diffusion.pt", "512x512_classifier.pt"],
    "upsamplers": ["64_256_upsampler.pt", "128_512_upsampler.pt"],
    "lsun": ["lsun_bedroom.pt", "lsun_cat.pt", "lsun_horse.pt", "lsun_horse_nodropout.pt"],
    "inception": [INCEPTION],
    "dinov2": [DINOV2],
    "eval-imagenet64": ["VIRTUAL_imagenet64_labeled.npz", INCEPTION],
    "eval-imagenet128": ["VIRTUAL_imagenet128_labeled.npz", INCEPTION],
    "eval-imagenet256": ["VIRTUAL_imagenet256_labeled.npz", INCEPTION],
    "eval-imagenet512": ["VIRTUAL_imagenet512.npz", INCEPTION],
    "eval-lsun": ["VIRTUAL_lsun_bedroom256.npz", "VIRTUAL_lsun_cat256.npz", "VIRTUAL_lsun_horse256.npz", INCEPTION],
    "lpips": ["lpips_vgg.pth", "vgg16-397923af.pth"],
    "lpips-alex": ["lpips_alex.pth", "alexnet-owt-7be5be79.pth"],
    "ffhq-dps": ["ffhq_10m.pt", "lpips_vgg.pth", "vgg16-397923af.pth", INCEPTION],
}


def by_name(assets=None):
    """{name or alias: Asset}."""
    table = {}
    for asset in ASSETS if assets is None else assets:
        for key in (asset.name, *asset.aliases):
            table[key] = asset
    return table


def find(name, assets=None):
    return by_name(assets).get(os.path.basename(name)) if name else None


def suggest(name, choices):
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


# --- where files go ---------------------------------------------------------------------------------------------


def torch_hub_checkpoints():
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def default_folder(asset):
    if asset.folder == "torch_hub":
        return torch_hub_checkpoints()
    return os.path.join(REPO_ROOT, asset.folder)


def destination(asset, dest=None):
    """The path a fetch writes: DEST/NAME when a folder is given, else the place the scripts look by default."""
    if dest:
        return os.path.join(os.path.abspath(dest), asset.name)
    if asset.env_path and os.environ.get(asset.env_path):
        return os.path.abspath(os.environ[asset.env_path])
    return os.path.join(default_folder(asset), asset.name)


def url_for(asset, base_url=None):
    """The asset's published URL, or BASE/NAME when a mirror (--base_url or $PAG_ADM_ASSET_BASE_URL) is given."""
    base = base_url if base_url is not None else os.environ.get(BASE_URL_ENV, "")
    if base:
        return base.rstrip("/") + "/" + asset.name
    return asset.url


def fetch_command():
    """How to run the fetch script from the current folder."""
    script = os.path.join("scripts", "fetch_assets.py")
    if os.path.abspath(os.getcwd()) != REPO_ROOT:
        script = os.path.join(REPO_ROOT, script)
    return f"python {script}"


def fetch_hint(path, name=None):
    """
    '; fetch it with `python scripts/fetch_assets.py NAME`' when a fetch can put the file fetch_assets.py knows
    as `name` (default: the path's file name) at `path` (with --dest when that is not where it goes by default),
    else ''. For the missing-file messages of the other scripts.
    """
    asset = find(name or path)
    if asset is None:
        return ""
    path = os.path.normpath(os.path.abspath(path))
    command = f"{fetch_command()} {asset.name}"
    if path != os.path.normpath(destination(asset)):
        if os.path.basename(path) != asset.name:
            return ""  # --dest keeps the file's name, so no fetch puts it at this path
        command += f" --dest {os.path.dirname(path)}"
    if not asset.url:
        return f"; `{command}` says how to get it (a manual download) and checks it"
    return f"; fetch it with `{command}`"
