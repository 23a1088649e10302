"""
compare.png's drawing (guided_diffusion/run/compare_picture.py) on synthetic samples: where each part is, which samples
are framed, and that the difference row is the predictions' difference amplified by the factor its label names.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import grid_tiles

from guided_diffusion.run import compare_picture as cp

SIZE = 64  # a 16x16 sample as drawn (enlarged 4x)


def tiles(picture, region, ncol, padding):
    images = grid_tiles(picture, region, SIZE, padding)
    assert region[3] == ncol * (SIZE + padding) - padding
    return images


def enlarged(images):
    return images.repeat(4, axis=1).repeat(4, axis=2)


@pytest.fixture(scope="module")
def drawn():
    rng = np.random.default_rng(0)
    plain = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    guided = plain.copy()
    # Samples 3, 10 and 40 change by 16 levels or more on average, sample 20 by 15 (not framed).
    for k, level in ((3, 40), (10, 16), (40, 100), (20, 15)):
        guided[k] = np.where(plain[k] < 128, plain[k].astype(int) + level, plain[k].astype(int) - level)
    indices = cp.most_changed(plain, guided)
    predicted = rng.integers(60, 200, (8, 16, 16, 3), dtype=np.uint8)
    perturbed = np.clip(predicted.astype(int) + rng.integers(-3, 4, predicted.shape), 0, 255).astype(np.uint8)
    predictions = SimpleNamespace(
        indices=indices, plain=predicted, perturbed=perturbed, step=1, steps=10, t=800, guided_steps=10,
        difference=float(np.abs(predicted.astype(int) - perturbed).mean()), scale=3.0,
        layers="the middle_block.1 block", perturbation="identity",
    )
    picture, regions = cp.draw(plain, guided, ["No guidance (seed 0)", "PAG (same seeds)"], predictions)
    return SimpleNamespace(
        plain=plain, guided=guided, predictions=predictions, picture=picture, regions=regions,
        text=" ".join(regions["text"]),
    )


def test_the_panels_hold_the_samples_side_by_side(drawn):
    picture, regions = drawn.picture, drawn.regions
    np.testing.assert_array_equal(tiles(picture, regions["left"], 8, cp.PADDING), enlarged(drawn.plain))
    np.testing.assert_array_equal(tiles(picture, regions["right"], 8, cp.PADDING), enlarged(drawn.guided))
    (top, left, height, width), (top_r, left_r, _, _) = regions["left"], regions["right"]
    assert top == top_r and left + width < left_r
    # Under the panels: the bottom part's two grids, one above the other, inside the picture.
    assert regions["finals"][0] > top + height
    assert regions["predictions"][0] > regions["finals"][0] + regions["finals"][2]
    bottom = regions["predictions"][0] + regions["predictions"][2]
    assert bottom < picture.shape[0] and left_r + width <= picture.shape[1]
    # Readable, not huge: 16x16 samples drawn 64 pixels wide, the whole picture under 1200x1200.
    assert picture.shape[0] < 1200 and picture.shape[1] < 1200


def test_the_changed_samples_are_framed_and_counted(drawn):
    picture, regions = drawn.picture, drawn.regions
    top, left, _, _ = regions["right"]
    framed = []
    for k in range(64):
        row, col = divmod(k, 8)
        # The pixel just above and left of each sample: its frame's colour, or the black padding.
        corner = picture[top + row * (SIZE + cp.PADDING) - 1, left + col * (SIZE + cp.PADDING) - 1]
        assert tuple(corner) in (cp.FRAME, (0, 0, 0))
        framed += [k] if tuple(corner) == cp.FRAME else []
    assert framed == [3, 10, 40]
    assert regions["facts"].changed == 3
    assert "Framed: the 3 of 64 samples the guidance changed most, by 16 or more grey levels" in drawn.text
    assert "(every sample changed, by 0.0 to 100.0)" in drawn.text


def test_the_difference_row_is_amplified_as_labelled(drawn):
    p, regions = drawn.predictions, drawn.regions
    factor = regions["facts"].factor
    # About 1.7 levels on average, the largest factor keeping it under 64 levels: 32.
    assert factor == 32 and f"plain - perturbed, x{factor}" in regions["text"]
    assert f"that difference {factor} times larger" in drawn.text
    assert f"differ by {p.difference:.1f} grey levels" in drawn.text
    rows = tiles(drawn.picture, regions["predictions"], 8, 2)
    np.testing.assert_array_equal(rows[:8], enlarged(p.plain))
    np.testing.assert_array_equal(rows[8:16], enlarged(p.perturbed))
    shown = rows[16:, ::4, ::4, 0].astype(float)
    np.testing.assert_array_equal(tiles(drawn.picture, regions["difference"], 8, 2)[:, ::4, ::4, 0], shown)
    difference = (p.plain.astype(float) - p.perturbed).mean(axis=3)
    np.testing.assert_array_equal(shown, np.clip(np.rint(128 + factor * difference), 0, 255))
    # The first two rows: the same samples' finals, without and with guidance.
    finals = tiles(drawn.picture, regions["finals"], 8, 2)
    np.testing.assert_array_equal(finals[:8], enlarged(drawn.plain[p.indices]))
    np.testing.assert_array_equal(finals[8:], enlarged(drawn.guided[p.indices]))


def test_most_changed_are_the_largest_changes_in_panel_order():
    plain = np.zeros((12, 2, 2, 3), np.uint8)
    guided = plain.copy()
    for k, level in enumerate([5, 0, 9, 1, 7, 3, 8, 2, 6, 4, 11, 10]):
        guided[k] = level
    assert cp.most_changed(plain, guided, count=4).tolist() == [2, 6, 10, 11]


def test_amplification_keeps_the_typical_difference_under_the_target():
    base = np.full((1, 4, 4, 3), 100, np.uint8)
    assert cp.amplification(base, base + 3) == 16  # 3 x 16 = 48 <= 64 < 3 x 32
    assert cp.amplification(base, base + 100) == 1  # already large: shown as it is
    assert cp.amplification(base, base) == 64  # no difference: the largest factor, all mid-grey


def test_without_predictions_the_picture_has_only_the_panels():
    plain = np.zeros((4, 16, 16, 1), np.uint8)
    picture, regions = cp.draw(plain, plain + 50, ["a", "b"])
    assert "predictions" not in regions and "finals" not in regions
    assert picture.shape[2] == 3 and regions["facts"].changed == 4
    assert not any("Below" in line for line in regions["text"])
    np.testing.assert_array_equal(tiles(picture, regions["right"], 4, cp.PADDING), np.full((4, SIZE, SIZE, 3), 50))


def test_labels_use_a_truetype_font_of_readable_size():
    from PIL import ImageFont, features

    if not features.check("freetype2"):
        pytest.skip("this Pillow has no FreeType: the labels fall back to its bitmap font")
    font = cp.label_font(cp.TEXT_SIZE)
    assert isinstance(font, ImageFont.FreeTypeFont)
    _, top, _, bottom = font.getbbox("Hg")
    assert bottom - top >= 12


def test_long_titles_wrap_within_their_panel_and_no_frame_is_explained():
    from PIL import ImageDraw, Image

    plain = np.zeros((4, 16, 16, 3), np.uint8)
    title = "PAG: scale 3.0, layers 'middle', interval all, perturbation mask (drop_rate=0.5) (same seeds)"
    picture, regions = cp.draw(plain, plain + 3, ["No guidance (seed 0)", title])
    lines = [line for line in regions["text"] if line in title]
    assert len(lines) > 1 and " ".join(lines) == title
    font = cp.label_font(cp.TEXT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert max(measure.textlength(line, font=font) for line in lines) <= regions["right"][3]
    text = " ".join(regions["text"])
    assert "The guidance changed no sample by 16 or more grey levels" in text and "(each changed by 3.0 to 3.0)" in text
    # No frame, and no frame in the legend either: the picture holds no orange.
    assert not (picture == np.array(cp.FRAME, np.uint8)).all(axis=2).any()
