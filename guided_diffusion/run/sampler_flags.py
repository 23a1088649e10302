"""
The flag parsers of the sampling scripts a table row can name (scripts/image_sample.py, classifier_sample.py,
inverse_sample.py): each script's own defaults on top of the flags every sampler shares, so the scripts and the
row runner (row_runner.py, which checks a row's flags before it starts the script) parse with the same parser.
"""

from ..script_util import classifier_defaults, model_and_diffusion_defaults
from .sampling_cli import create_sampling_argparser


def image_sample_argparser(description=""):
    # --compare: image_sample.py also samples the same seeds without guidance and draws both side by side.
    defaults = dict(model_path="", compare=False)
    defaults.update(model_and_diffusion_defaults())
    return create_sampling_argparser(description, defaults)


def classifier_sample_argparser(description=""):
    defaults = dict(model_path="", classifier_path="", classifier_scale=1.0)
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    return create_sampling_argparser(description, defaults)


def inverse_sample_argparser(description=""):
    defaults = dict(
        model_path="",
        data_dir="",
        task="",  # required
        kernel_size=61,
        intensity=None,
        kernel_seed=0,
        kernel_path="",
        scale_factor=4,
        mask_type="box",
        mask_len_range="128,129",
        mask_prob_range="0.3,0.7",
        mask_margin="16,16",
        mask_path="",
        sigma=0.05,
        dps_scale=1.0,
        gradient_through="plain",
    )
    defaults.update(model_and_diffusion_defaults())
    parser = create_sampling_argparser(description, defaults, script="inverse_sample")
    # All of --data_dir unless fewer are asked for; the grid is on by default.
    parser.set_defaults(num_samples=0, grid="grid.png")
    return parser


SAMPLER_ARGPARSERS = {
    "image_sample.py": image_sample_argparser,
    "classifier_sample.py": classifier_sample_argparser,
    "inverse_sample.py": inverse_sample_argparser,
}
