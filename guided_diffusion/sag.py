"""
Compatibility module: Self-Attention Guidance lives in methods/sag.py. This one keeps the documented import
`from guided_diffusion.sag import SAGGuidedModel` (and the module's other public names) working.
(relayout: keep -- tools that rewrite the old flat import paths leave this file as it is.)
"""

from .methods.sag import *  # noqa: F401,F403
