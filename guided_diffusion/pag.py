"""
Compatibility module: Perturbed-Attention Guidance lives in methods/pag.py. This one keeps the documented import
`from guided_diffusion.pag import PAGGuidedModel, perturb_attention` (and the module's other public names) working.
(relayout: keep -- tools that rewrite the old flat import paths leave this file as it is.)
"""

from .methods.pag import *  # noqa: F401,F403
