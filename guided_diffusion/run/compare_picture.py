"""
compare.png (image_sample.py --compare): the same seeds sampled without and with guidance side by side, the
samples the guidance changed framed, and, for PAG, what it steered away from: the x0 the model predicts with its
plain and with its perturbed attention at one step, and their difference, amplified by a factor the picture names.

Everything the picture says is measured on the samples it shows; draw() returns the regions it drew beside the
image, so tests can find each part.
"""

from types import SimpleNamespace

import numpy as np

from .image_output import enlarge_small, image_grid

# A sample counts as changed when guided and unguided differ by at least this many grey levels (of 255) on
# average over its pixels and channels: about the least change one sees at a glance in a 16x16 digit.
CHANGED_LEVEL = 16
# The difference of the two predictions is multiplied by the largest of these factors that keeps its mean
# magnitude under DIFFERENCE_TARGET levels, so a typical difference shows without most pixels saturating.
AMPLIFICATIONS = (1, 2, 4, 8, 16, 32, 64)
DIFFERENCE_TARGET = 64

FRAME = (255, 128, 0)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
MARGIN = 12
GAP = 20
PADDING = 6  # between the samples of the two big panels; the frame takes each sample's own half of it
TITLE_SIZE = 20
TEXT_SIZE = 15


def label_font(size):
    """
    Pillow's built-in TrueType font (Aileron) at `size` pixels, or its small bitmap font where this Pillow has no
    FreeType or predates sizes (10.1). The built-in font covers ASCII only.
    """
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def change_per_sample(plain, guided):
    """
    Mean |guided - plain| over each sample's pixels and channels, in grey levels (uint8 NHWC inputs).
    """
    return np.abs(guided.astype(np.int16) - plain.astype(np.int16)).mean(axis=(1, 2, 3))


def most_changed(plain, guided, count=8):
    """
    The indices of the `count` samples the guidance changed most, in the panels' order.
    """
    change = change_per_sample(plain, guided)
    return np.sort(np.argsort(-change, kind="stable")[:count])


def amplification(plain, perturbed):
    """
    The factor the picture multiplies the predictions' difference by (see AMPLIFICATIONS).
    """
    typical = np.abs(plain.astype(np.int16) - perturbed.astype(np.int16)).mean()
    fitting = [a for a in AMPLIFICATIONS if a * typical <= DIFFERENCE_TARGET]
    return fitting[-1] if fitting else AMPLIFICATIONS[0]


def difference_images(plain, perturbed, factor):
    """
    uint8 NHWC grey images of factor * (plain - perturbed), averaged over channels, around mid-grey 128 (light:
    the plain prediction is brighter), clipped to 0..255.
    """
    difference = (plain.astype(np.float64) - perturbed.astype(np.float64)).mean(axis=3, keepdims=True)
    grey = np.clip(np.rint(128 + factor * difference), 0, 255).astype(np.uint8)
    return grey.repeat(3, axis=3)


def draw(plain, guided, titles, predictions=None, note="", ncol=8):
    """
    Draw compare.png.

    :param plain, guided: uint8 NHWC, the same seeds without and with guidance (the two panels).
    :param titles: the two panels' titles.
    :param note: a sentence to print under the panels' legend (e.g. what is known of the setting's result).
    :param predictions: for PAG, a namespace with indices (into plain/guided: the columns of the bottom part),
                        plain and perturbed (uint8 NHWC x0 predictions of those samples), step (0-based), steps,
                        t, guided_steps (how many steps PAG guides), difference (mean |plain - perturbed| at that
                        step, grey levels), scale, layers (the
                        perturbed blocks, in words) and perturbation (its kind, as perturbations.py describes it).
    :return: (uint8 HWC RGB image, regions): regions maps "left" and "right" (the panels' sample grids), and with
             predictions "finals" (the bottom part's final samples, two rows), "predictions" (its three rows of
             predictions and difference) and "difference" (the last row), to (top, left, height, width) without
             the black padding; regions["facts"] holds the numbers the text states and regions["text"] every
             line of text drawn.
    """
    from PIL import Image, ImageDraw

    title_font, font = label_font(TITLE_SIZE), label_font(TEXT_SIZE)
    line = TEXT_SIZE + 6
    changed = change_per_sample(plain, guided) >= CHANGED_LEVEL
    panels = [_framed_grid(images, changed, ncol) for images in (plain, guided)]
    width = MARGIN + panels[0].shape[1] + GAP + panels[1].shape[1] + MARGIN
    lefts = [MARGIN, MARGIN + panels[0].shape[1] + GAP]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def wrap(text, text_font, room=width - 2 * MARGIN):
        lines = []
        for word in text.split():
            if lines and measure.textlength(lines[-1] + " " + word, font=text_font) <= room:
                lines[-1] += " " + word
            else:
                lines.append(word)
        return lines

    change = change_per_sample(plain, guided)
    facts = SimpleNamespace(
        changed=int(changed.sum()), shown=len(plain), level=CHANGED_LEVEL, least=float(change.min()),
        most=float(change.max()),
    )
    header = wrap("The same seeds, without guidance (left) and with it (right)", title_font)
    spread = f"{facts.least:.1f} to {facts.most:.1f}"
    if facts.changed:
        legend = (
            f"Framed: the {facts.changed} of {facts.shown} samples the guidance changed most, by {CHANGED_LEVEL} or "
            f"more grey levels (of 255) on average over their pixels (every sample changed, by {spread})."
        )
    else:
        legend = (
            f"The guidance changed no sample by {CHANGED_LEVEL} or more grey levels (of 255) on average over its "
            f"pixels, so none is framed (each changed by {spread})."
        )
    legend = wrap(legend, font, width - 2 * MARGIN - 2 * line) + wrap(note, font, width - 2 * MARGIN - 2 * line)
    bottom = _bottom_part(plain, guided, predictions, facts) if predictions is not None else None
    if bottom is not None:
        bottom.title, bottom.caption = wrap(bottom.title, font), wrap(bottom.caption, font)

    # Lay out from the top: each part's y, then the canvas's height.
    tops, y = {}, MARGIN
    tops["header"], y = y, y + len(header) * (TITLE_SIZE + 8)
    titles = [wrap(title, font, panel.shape[1] - 2 * PADDING) for title, panel in zip(titles, panels)]
    tops["titles"], y = y, y + max(len(lines) for lines in titles) * line + 2
    tops["panels"], y = y, y + max(p.shape[0] for p in panels) + 6
    tops["legend"], y = y, y + len(legend) * line
    if bottom is not None:
        tile = bottom.tile
        y += GAP // 2
        tops["title"], y = y, y + len(bottom.title) * line + 4
        tops["finals"], y = y, y + bottom.grids[0].shape[0] + line // 2
        tops["predictions"], y = y, y + bottom.grids[1].shape[0] + 6
        tops["caption"], y = y, y + len(bottom.caption) * line
    height = y + MARGIN

    canvas = Image.new("RGB", (width, height), WHITE)
    pen = ImageDraw.Draw(canvas)

    regions = dict(facts=facts, text=[])

    def write(position, text, text_font=font):
        pen.text(position, text, fill=BLACK, font=text_font)
        regions["text"].append(text)

    def text_lines(lines, left, top, text_font, step):
        for k, text in enumerate(lines):
            write((left, top + k * step), text, text_font)

    text_lines(header, MARGIN, tops["header"], title_font, TITLE_SIZE + 8)
    for left, title in zip(lefts, titles):
        text_lines(title, left, tops["titles"], font, line)
    for key, left, grid in zip(("left", "right"), lefts, panels):
        canvas.paste(Image.fromarray(grid), (left, tops["panels"]))
        height, width = grid.shape[0] - 2 * PADDING, grid.shape[1] - 2 * PADDING
        regions[key] = (tops["panels"] + PADDING, left + PADDING, height, width)
    y = tops["legend"]
    indent = 0
    if facts.changed:
        pen.rectangle([MARGIN, y + 2, MARGIN + line - 6, y + line - 4], outline=FRAME, width=3)
        indent = 2 * line - 8
    text_lines(legend, MARGIN + indent, y, font, line)
    if bottom is None:
        return np.asarray(canvas), regions

    text_lines(bottom.title, MARGIN, tops["title"], font, line)
    left = lefts[1]
    labels = iter(bottom.labels)
    for key, grid in zip(("finals", "predictions"), bottom.grids):
        top = tops[key]
        canvas.paste(Image.fromarray(grid), (left, top))
        regions[key] = (top + 2, left + 2, grid.shape[0] - 4, grid.shape[1] - 4)
        rows = grid.shape[0] // tile
        for row in range(rows):
            label = next(labels)
            # Right-aligned beside the row (computed, as Pillow's bitmap fallback font has no anchors).
            text_left = left - 10 - measure.textlength(label, font=font)
            write((text_left, top + row * tile + (tile - TEXT_SIZE) // 2), label)
    top, _, _, columns_width = regions["predictions"]
    regions["difference"] = (top + 2 * tile, left + 2, tile - 2, columns_width)
    text_lines(bottom.caption, MARGIN, tops["caption"], font, line)
    return np.asarray(canvas), regions


def _framed_grid(images, framed, ncol):
    """
    The panel grid of (enlarged) samples, PADDING black pixels around each; a framed sample has a FRAME-coloured
    ring in the half of that padding next to it, so neighbours' frames never merge.
    """
    images = _rgb(enlarge_small(images))
    ncol = min(ncol, len(images))
    grid = image_grid(images, padding=PADDING, ncol=ncol)
    height, width = images.shape[1:3]
    for k in np.flatnonzero(framed):
        row, col = divmod(int(k), ncol)
        top, left = PADDING + row * (height + PADDING), PADDING + col * (width + PADDING)
        ring = PADDING // 2
        box = grid[top - ring : top + height + ring, left - ring : left + width + ring]
        inner = box[ring:-ring, ring:-ring].copy()
        box[:] = FRAME
        box[ring:-ring, ring:-ring] = inner
    return grid


def _rgb(images):
    return images.repeat(3, axis=3) if images.shape[3] == 1 else images


def _bottom_part(plain, guided, predictions, facts):
    """
    For PAG: the samples predictions.indices, without and with guidance (first grid), then the x0 of the plain
    and the perturbed pass at predictions.step and their amplified difference (second grid); the rows' labels,
    the part's title and its caption.
    """
    p = predictions
    factor = amplification(p.plain, p.perturbed)
    facts.factor, facts.step, facts.steps, facts.t = factor, p.step + 1, p.steps, p.t
    facts.difference, facts.indices = p.difference, list(p.indices)
    count = len(p.indices)
    if p.perturbation == "identity":
        perturbed = "replaced by the identity (each position attends only to itself)"
    else:
        perturbed = f"perturbed ({p.perturbation})"
    finals = [plain[p.indices], guided[p.indices]]
    predicted = [p.plain, p.perturbed, difference_images(p.plain, p.perturbed, factor)]
    grids = [image_grid(_rgb(enlarge_small(np.concatenate(rows))), ncol=count) for rows in (finals, predicted)]
    tile = (grids[0].shape[0] - 2) // 2  # one row: an image and the padding under it
    labels = [
        "without guidance",
        "with guidance",
        "x0 predicted, plain",
        "x0 predicted, attention perturbed",
        f"plain - perturbed, x{factor}",
    ]
    where = "the step where its two predictions differ most"
    if p.guided_steps < p.steps:
        where = f"of the {p.guided_steps} steps it guides, the one where its two predictions differ most"
    title = (
        f"Below: the {count} samples changed most, and what PAG steered them away from at step {p.step + 1} of "
        f"{p.steps} (t = {p.t}), {where}."
    )
    caption = (
        f"At every step it guides, PAG runs the model a second time with the attention of {p.layers} {perturbed}, "
        f"and moves its prediction away from the perturbed one: "
        f"guided x0 = plain + {p.scale:g} x (plain - perturbed). At step {p.step + 1} the two predictions of these "
        f"samples differ by {p.difference:.1f} grey levels on average; the bottom row shows that difference "
        f"{factor} times larger (mid-grey: no difference, light: the plain prediction is brighter, dark: darker). "
        f"Repeated over the {p.guided_steps} steps it guides, these pushes make the differences between the two "
        f"panels."
    )
    return SimpleNamespace(grids=grids, tile=tile, labels=labels, title=title, caption=caption)
