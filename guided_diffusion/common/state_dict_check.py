"""
Readable errors when a checkpoint does not fit the model built from the flags.

torch's own message lists hundreds of keys; researchers need to know which flag to change. The checks below read
the architecture off the key names and shapes, which is how ADM's flags show up in a state dict.
"""

import re

import torch.nn as nn

_LIST_LIMIT = 8


def _shape(value):
    return tuple(value.shape) if hasattr(value, "shape") else None


def _block_indices(keys, prefix):
    found = set()
    for key in keys:
        m = re.match(rf"{prefix}\.(\d+)\.", key)
        if m:
            found.add(int(m.group(1)))
    return found


def _attention_blocks(keys):
    return sorted({k.rsplit(".qkv.", 1)[0] for k in keys if ".qkv." in k and not k.startswith("out.")})


def _uses_scale_shift(sd):
    """
    Whether a state dict's residual blocks use scale-shift norm, read off the first block alone: its embedding
    projection gives 2 * out_channels values with it, out_channels without. Comparing this within each state dict
    keeps a changed --num_channels from passing for a changed --use_scale_shift_norm.
    """
    for key in sorted(sd):
        if key.endswith(".emb_layers.1.weight"):
            conv = key[: -len("emb_layers.1.weight")] + "in_layers.2.weight"
            if conv in sd:
                emb_width, conv_width = _shape(sd[key])[0], _shape(sd[conv])[0]
                return emb_width == 2 * conv_width
    return None


def suggest_flags(model_sd, ckpt_sd, flags=None):
    """
    Return a list of human-readable hints, most likely first, naming the flags that explain the mismatch.

    :param flags: the flag names of the script that loads the checkpoint: the hints then name only its flags and
                  the scripts (not the Python factories); None: hints for a caller of the Python API.
    """
    model_keys, ckpt_keys = set(model_sd), set(ckpt_sd)
    hints = []
    script = flags is not None
    flags = set(flags or ())
    super_res = "large_size" in flags

    def mismatch(key):
        return key in model_sd and key in ckpt_sd and _shape(model_sd[key]) != _shape(ckpt_sd[key])

    if "time_embed.0.weight" not in ckpt_keys or "input_blocks.0.0.weight" not in ckpt_keys:
        # Every ADM U-Net and classifier has these; without them no flag can make the checkpoint fit.
        shown = ", ".join(sorted(ckpt_keys)[:4]) or "none"
        hints.append(
            "the checkpoint is not an ADM model or classifier state dict (it lacks time_embed.0.weight and "
            f"input_blocks.0.0.weight; its keys start: {shown})"
        )
        return hints

    model_is_classifier = not any(k.startswith("output_blocks.") for k in model_keys)
    ckpt_is_classifier = not any(k.startswith("output_blocks.") for k in ckpt_keys)
    if ckpt_is_classifier and not model_is_classifier:
        if not script:
            use = "load it with create_classifier (--classifier_path)"
        elif "classifier_path" in flags:
            use = "pass it as --classifier_path"
        else:
            use = "it is for scripts/classifier_sample.py's --classifier_path"
        hints.append(f"this is a classifier checkpoint (it has no output_blocks): {use}, not as the diffusion model")
        return hints
    if model_is_classifier and not ckpt_is_classifier:
        use = "pass it as --model_path" if script else "load it with create_model_and_diffusion (--model_path)"
        hints.append(f"this is a diffusion-model checkpoint (it has output_blocks): {use}, not as the classifier")
        return hints

    if "label_emb.weight" in ckpt_keys and "label_emb.weight" not in model_keys:
        hints.append("--class_cond True (the checkpoint has a class embedding, label_emb.weight)")
    elif "label_emb.weight" in model_keys and "label_emb.weight" not in ckpt_keys:
        hints.append("--class_cond False (the checkpoint has no class embedding, label_emb.weight)")

    if mismatch("input_blocks.0.0.weight"):
        got, want = _shape(ckpt_sd["input_blocks.0.0.weight"]), _shape(model_sd["input_blocks.0.0.weight"])
        if got[1] == 2 * want[1]:
            use = (
                "sample it with scripts/super_res_sample.py (--large_size, --small_size, --base_samples)" if script
                else "use sr_create_model_and_diffusion / the super-resolution flags"
            )
            hints.append(
                f"the checkpoint is an upsampler (its input has the low-resolution image concatenated): {use}"
            )
        elif want[1] == 2 * got[1]:
            use = "sample it with scripts/image_sample.py" if script else "use create_model_and_diffusion"
            hints.append(f"the checkpoint is a base model, not an upsampler: {use}")

    if mismatch("out.2.weight") and not model_is_classifier:
        got = _shape(ckpt_sd["out.2.weight"])[0]
        want = _shape(model_sd["out.2.weight"])[0]
        if got == 2 * want:
            hints.append(f"--learn_sigma True (the checkpoint outputs {got} channels: eps and variance)")
        elif want == 2 * got:
            hints.append(f"--learn_sigma False (the checkpoint outputs {got} channels: eps only)")

    if mismatch("time_embed.0.weight"):
        width = _shape(ckpt_sd["time_embed.0.weight"])[1]
        flag = "--classifier_width" if model_is_classifier else "--num_channels"
        hints.append(f"{flag} {width} (the checkpoint's base channel count)")

    model_inputs = _block_indices(model_keys, "input_blocks")
    ckpt_inputs = _block_indices(ckpt_keys, "input_blocks")
    if model_inputs != ckpt_inputs:
        if model_is_classifier:
            hints.append(
                f"--classifier_depth or --image_size (the checkpoint has {len(ckpt_inputs)} input blocks, "
                f"the flags give {len(model_inputs)})"
            )
        else:
            which = (
                "--num_res_blocks or --large_size" if super_res
                else "--num_res_blocks, --image_size or --channel_mult"
            )
            hints.append(
                f"{which} (the checkpoint has {len(ckpt_inputs)} input blocks, the flags give {len(model_inputs)})"
            )

    ckpt_ss, model_ss = _uses_scale_shift(ckpt_sd), _uses_scale_shift(model_sd)
    if None not in (ckpt_ss, model_ss) and ckpt_ss != model_ss:
        flag = "--classifier_use_scale_shift_norm" if model_is_classifier else "--use_scale_shift_norm"
        hints.append(f"{flag} {ckpt_ss} (the checkpoint's embedding projections are "
                     f"{'twice as' if ckpt_ss else 'as'} wide as its residual blocks' channels)")

    updown_ckpt = any(re.search(r"\.\d+\.0\.in_layers", k) for k in ckpt_keys if ".op." not in k)
    op_ckpt = any(k.endswith(".op.weight") for k in ckpt_keys)
    op_model = any(k.endswith(".op.weight") for k in model_keys)
    if op_ckpt != op_model and model_inputs == ckpt_inputs and updown_ckpt:
        flag = "--classifier_resblock_updown" if model_is_classifier else "--resblock_updown"
        hints.append(f"{flag} {not op_ckpt} (the checkpoint {'has no' if not op_ckpt else 'has'} strided convs)")

    attn_ckpt, attn_model = _attention_blocks(ckpt_keys), _attention_blocks(model_keys)
    if attn_ckpt != attn_model and model_inputs == ckpt_inputs:
        flag = "--classifier_attention_resolutions" if model_is_classifier else "--attention_resolutions"
        hints.append(
            f"{flag} (the checkpoint has attention in {len(attn_ckpt)} blocks, the flags give {len(attn_model)})"
        )

    if model_is_classifier:
        for key in sorted(model_keys & ckpt_keys):
            if key.startswith("out.") and mismatch(key):
                got, want = _shape(ckpt_sd[key]), _shape(model_sd[key])
                if len(got) == len(want) and got[1:] == want[1:]:
                    hints.append(f"--classifier_num_classes {got[0]} (the checkpoint predicts {got[0]} classes)")
                    break

    if not hints:
        if model_is_classifier:
            names = ["--image_size", "--classifier_width", "--classifier_depth", "--classifier_channel_mult",
                     "--classifier_attention_resolutions", "--classifier_pool"]
        elif super_res:
            names = ["--large_size", "--num_channels", "--num_res_blocks", "--attention_resolutions"]
        else:
            names = ["--image_size", "--num_channels", "--num_res_blocks", "--channel_mult", "--attention_resolutions"]
        if script:
            names = [n for n in names if n[2:] in flags]
        hints.append(f"check {', '.join(names[:-1])} and {names[-1]} against the flags the checkpoint was trained with")
    return hints


def describe_mismatch(model_sd, ckpt_sd, flags=None):
    """
    A multi-line explanation of why ckpt_sd does not load into a model with state dict model_sd, or None.
    :param flags: as for suggest_flags.
    """
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    wrong_shape = [
        k for k in model_sd if k in ckpt_sd and _shape(model_sd[k]) != _shape(ckpt_sd[k])
    ]
    if not (missing or unexpected or wrong_shape):
        return None

    def listing(keys, fmt=str):
        shown = ", ".join(fmt(k) for k in keys[:_LIST_LIMIT])
        more = f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
        return shown + more

    lines = ["The checkpoint does not match the model built from these flags."]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {listing(unexpected)}")
    if wrong_shape:
        fmt = lambda k: f"{k} checkpoint {list(_shape(ckpt_sd[k]))} vs model {list(_shape(model_sd[k]))}"
        lines.append(f"  shape mismatches ({len(wrong_shape)}): {listing(wrong_shape, fmt)}")
    hints = suggest_flags(model_sd, ckpt_sd, flags)
    lines.append("Most likely wrong flag: " + hints[0])
    for hint in hints[1:]:
        lines.append("Also check: " + hint)
    return "\n".join(lines)


class StateDictCheckMixin:
    """
    Give load_state_dict(strict=True) failures an explanation in terms of the model flags.
    """

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if strict:
            message = describe_mismatch(self.state_dict(), state_dict)
            if message is not None:
                raise RuntimeError(message)
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)
