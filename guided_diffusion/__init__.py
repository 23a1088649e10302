"""
A checkpoint-compatible fork of ADM (openai/guided-diffusion) with Perturbed-Attention Guidance.
"""
