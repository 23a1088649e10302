"""
Compatibility module: DPS for inverse problems lives in methods/inverse.py. This one keeps the documented import
`from guided_diffusion.inverse import create_operator, dps_sample_loop` (and the module's other public names) working.
(relayout: keep -- tools that rewrite the old flat import paths leave this file as it is.)
"""

from .methods.inverse import *  # noqa: F401,F403
