"""
The flag parsers of the sampling scripts a table row can name (scripts/image_sample.py, classifier_sample.py,
inverse_sample.py): each script's own defaults on top of the flags every sampler shares, so the scripts and the
row runner (row_runner.py, which checks a row's flags before it starts the script) parse with the same parser.
"""

from ..common.flag_help import flag_defaults
from .sampling_cli import create_sampling_argparser
from ..script_util import classifier_defaults, model_and_diffusion_defaults


def image_sample_argparser(description=""):
    # --compare: image_sample.py also samples the same seeds without guidance and draws both side by side.
    defaults = flag_defaults(("model_path", "compare"))
    defaults.update(model_and_diffusion_defaults())
    return create_sampling_argparser(description, defaults)


def classifier_sample_argparser(description=""):
    defaults = flag_defaults(("model_path", "classifier_path", "classifier_scale"))
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    return create_sampling_argparser(description, defaults)


def inverse_sample_argparser(description=""):
    defaults = flag_defaults(INVERSE_SAMPLE_FLAGS, script="inverse_sample")
    defaults.update(model_and_diffusion_defaults())
    # All of --data_dir unless fewer are asked for; the grid is on by default (flag_help.SCRIPT_FLAGS).
    return create_sampling_argparser(description, defaults, script="inverse_sample")


INVERSE_SAMPLE_FLAGS = (
    "model_path",
    "data_dir",
    "task",  # required
    "kernel_size",
    "intensity",
    "kernel_seed",
    "kernel_path",
    "scale_factor",
    "mask_type",
    "mask_len_range",
    "mask_prob_range",
    "mask_margin",
    "mask_path",
    "sigma",
    "dps_scale",
    "gradient_through",
)


SAMPLER_ARGPARSERS = {
    "image_sample.py": image_sample_argparser,
    "classifier_sample.py": classifier_sample_argparser,
    "inverse_sample.py": inverse_sample_argparser,
}
