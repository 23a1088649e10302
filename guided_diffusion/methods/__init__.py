"""
The guidance methods over ADM's U-Net: the guided-model base (guided_model.py), the attention hook and layer names
(attention_hooks.py, attention_layers.py), the attention perturbations (perturbations.py), PAG (pag.py, stated in
plain words in two_pass.py), SAG (sag.py) and DPS for inverse problems (inverse.py). They import ADM and the helpers
only.
"""
