"""
The names guidance methods select ADM's attention blocks by: a block's module name ("middle_block.1",
"input_blocks.14.1") or an alias for a part of the U-Net ("middle", "input"/"encoder", "output"/"decoder", "all").
"""

from ..unet import AttentionBlock

# Layer aliases: alias -> prefix of the module names it selects.
LAYER_ALIASES = {
    "all": "",
    "middle": "middle_block.",
    "input": "input_blocks.",
    "encoder": "input_blocks.",
    "output": "output_blocks.",
    "decoder": "output_blocks.",
}


def attention_block_names(model):
    """
    The module names of the model's attention blocks, in module order (e.g. "input_blocks.14.1").
    """
    return [name for name, module in model.named_modules() if isinstance(module, AttentionBlock)]


def resolve_layers(model, layers):
    """
    Turn a layer selection into the sorted list of attention block names it denotes.

    :param layers: a comma-separated string or a list of exact module names ("middle_block.1") and aliases
                   ("all", "middle", "input"/"encoder", "output"/"decoder").
    :return: the selected names in module order, without duplicates.
    :raises ValueError: for a name that is not one of the model's attention blocks, or an empty selection.
    """
    if isinstance(layers, str):
        items = layers.split(",")
    elif isinstance(layers, (list, tuple)):
        items = list(layers)
    else:
        raise ValueError(
            f"layers must be a comma-separated string or a list of names, got {type(layers).__name__}"
        )
    names = attention_block_names(model)
    selected = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"layer names must be strings, got {item!r}")
        item = item.strip()
        if not item:
            continue
        if item.lower() in LAYER_ALIASES:
            prefix = LAYER_ALIASES[item.lower()]
            matches = [name for name in names if name.startswith(prefix)]
            if not matches:
                raise ValueError(f"layer alias {item!r} selects no attention block of this model")
            selected.update(matches)
        elif item in names:
            selected.add(item)
        else:
            raise ValueError(
                f"unknown attention block {item!r}; this model's attention blocks are: "
                f"{', '.join(names) if names else '(none)'}; aliases: all, middle, input (or encoder), output "
                "(or decoder)"
            )
    if not selected:
        raise ValueError(f"no attention block selected (layers={layers!r})")
    return [name for name in names if name in selected]
