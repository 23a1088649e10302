"""
PAG's successors as perturbations (perturbations.py): SEG (the queries), SoftPAG (the map, per head) and TPG (the
block's output), each held to a hand-written statement of its rule, on every guided path, at scale 0, on per-sample
streams, and through the PAG flags.
"""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.methods import perturbations
from guided_diffusion.run.guidance import PAGFlags, describe_guidance, guide_model
from guided_diffusion.common.errors import UsageError
from guided_diffusion.methods.pag import PAGGuidedModel, perturb_attention
from guided_diffusion.methods.perturbations import make_perturbation, seg_blur, seg_kernel_size
from guided_diffusion.common.random_streams import batch_streams, perturbation_generator
from guided_diffusion.script_util import create_gaussian_diffusion

from conftest import GUIDED_PATHS, flag_args
from test_perturbations import LAYOUTS, batch, blocks_clean, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

SUCCESSORS = {
    "seg": dict(seg_sigma=1.0),
    "seg_inf": dict(seg_sigma=math.inf),
    "soft": dict(soft_alpha=0.6),
    "soft_head": dict(soft_alpha=1.0, soft_heads="1"),
    "tpg": {},
}


def kind_of(name):
    return name.split("_")[0]


# --- hand-written statements of the rules --------------------------------------------------------------------------


def test_seg_kernel_sizes_and_clamping():
    # k = ceil(6 sigma) + 1 - (ceil(6 sigma) mod 2), at most W for odd W and W + 1 for even W.
    table = {
        # sigma: (k unclamped, on 8x8, 16x16, 32x32)
        0.1: (1, 1, 1, 1),
        0.3: (3, 3, 3, 3),
        0.5: (3, 3, 3, 3),
        1.0: (7, 7, 7, 7),
        1.4: (9, 9, 9, 9),
        2.0: (13, 9, 13, 13),
        3.0: (19, 9, 17, 19),
        10.0: (61, 9, 17, 33),
    }
    for sigma, (unclamped, *clamped) in table.items():
        assert seg_kernel_size(sigma, 10 ** 6 + 1) == unclamped
        for width, size in zip((8, 16, 32), clamped):
            assert seg_kernel_size(sigma, width) == size, (sigma, width)
    assert seg_kernel_size(100.0, 7) == 7 and seg_kernel_size(100.0, 9) == 9


def reflect(i, n):
    return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


def hand_blur(grid, sigma):
    """
    One channel [h, w]: sum over the kernel's taps of K(a) K(b) grid[reflect(y + a), reflect(x + b)], with K the
    normalized exp(-a^2 / 2 sigma^2) at a = -(k-1)/2 .. (k-1)/2, in float64.
    """
    h, w = grid.shape
    k = seg_kernel_size(sigma, w)
    taps = np.arange(k) - (k - 1) / 2
    weights = np.exp(-(taps ** 2) / (2 * sigma ** 2))
    weights /= weights.sum()
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            for a, wa in zip(taps.astype(int), weights):
                for b, wb in zip(taps.astype(int), weights):
                    out[y, x] += wa * wb * grid[reflect(y + a, h), reflect(x + b, w)]
    return out


@pytest.mark.parametrize("side, sigma", [(8, 1.0), (8, 3.0), (16, 2.0), (16, 10.0), (32, 0.5), (32, 5.0)])
def test_seg_blur_equals_the_hand_written_rule(side, sigma):
    q = torch.randn(2, 3, side * side, generator=torch.Generator().manual_seed(side))
    out = seg_blur(q, (side, side), sigma)
    for n in range(2):
        for c in range(3):
            expected = hand_blur(q[n, c].double().reshape(side, side).numpy(), sigma)
            np.testing.assert_allclose(out[n, c].reshape(side, side).numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("side", [8, 16, 32])
def test_seg_infinite_sigma_is_the_mean_query(side):
    q = torch.randn(4, 5, side * side, generator=torch.Generator().manual_seed(3))
    mean = q.mean(dim=-1, keepdim=True).expand_as(q)
    for sigma in (math.inf, 1e4, 9999.5):
        assert torch.equal(seg_blur(q, (side, side), sigma), mean)
    # 9999 itself is a finite blur: a nearly flat kernel clamped to the grid, over reflect padding, which is not
    # the mean.
    finite = seg_blur(q, (side, side), 9999.0)
    assert not torch.allclose(finite, mean, atol=1e-2)
    expected = hand_blur(q[0, 0].double().reshape(side, side).numpy(), 9999.0)
    np.testing.assert_allclose(finite[0, 0].reshape(side, side).numpy(), expected, rtol=0, atol=2e-6)


def naive_block(block, x, queries=None, weights=None, output=None):
    """
    AttentionBlock written out per head: softmax(q^T k / sqrt(C)) v with hooks on q [N*H, C, T] and the map, then
    proj_out and output(x, h) (default x + h). Both qkv layouts.
    """
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(x))
    heads = block.attention.n_heads
    width = qkv.shape[1] // (3 * heads)
    if type(block.attention).__name__ == "QKVAttentionLegacy":
        q, k, v = qkv.reshape(b * heads, 3 * width, -1).split(width, dim=1)
    else:
        q, k, v = (part.reshape(b * heads, width, -1) for part in qkv.chunk(3, dim=1))
    if queries is not None:
        q = queries(q)
    logits = torch.einsum("nct,ncs->nts", q, k) / math.sqrt(width)
    attn = torch.softmax(logits, dim=-1)
    if weights is not None:
        attn = weights(attn)
    h = block.proj_out(torch.einsum("nts,ncs->nct", attn, v).reshape(b, c, -1))
    out = x + h if output is None else output(x, h)
    return out.reshape(b, c, *spatial)


def block_input(block, side=8, n=2, seed=5):
    return torch.randn(n, block.channels, side, side, generator=torch.Generator().manual_seed(seed))


def middle(model):
    return model.middle_block[1]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sigma", [0.7, 2.0, math.inf])
def test_seg_block_blurs_only_the_queries(layout, sigma):
    model = tiny_unet(**LAYOUTS[layout])
    block = model.output_blocks[0][1]  # 4x4 tokens; the tests above hold the blur on larger grids
    x = block_input(block, side=4)
    with torch.no_grad(), perturb_attention(model, "output_blocks.0.1", kind="seg", seg_sigma=sigma):
        ours = block(x)
    expected = naive_block(block, x, queries=lambda q: seg_blur(q, (4, 4), sigma))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_soft_pag_end_points_and_heads(layout):
    model = tiny_unet(**LAYOUTS[layout])
    x, t, kwargs = batch(3)
    with torch.no_grad():
        plain = model(x, t, **kwargs)
        with perturb_attention(model, "all", kind="soft", soft_alpha=0.0):
            soft0 = model(x, t, **kwargs)
        with perturb_attention(model, "all", kind="soft", soft_alpha=1.0):
            soft1 = model(x, t, **kwargs)
        with perturb_attention(model, "all"):
            pag = model(x, t, **kwargs)
    torch.testing.assert_close(soft0, plain, rtol=0, atol=1e-6)  # u = 0: the plain model
    torch.testing.assert_close(soft1, pag, rtol=0, atol=1e-5)  # u = 1 on every head: PAG
    # Head 1 of 2 at u = 0.3: head 0 keeps A, head 1 gets 0.7 A + 0.3 I.
    block = middle(model)
    xb = block_input(block, side=4)

    def by_hand(weight):
        eye = torch.eye(weight.shape[-1])
        heads = torch.arange(weight.shape[0]) % 2
        return torch.where((heads == 1)[:, None, None], 0.7 * weight + 0.3 * eye, weight)

    with torch.no_grad(), perturb_attention(model, "middle", kind="soft", soft_alpha=0.3, soft_heads="1"):
        ours = block(xb)
    torch.testing.assert_close(ours, naive_block(block, xb, weights=by_hand), rtol=0, atol=1e-5)
    # A head the block lacks is refused when the blocks are chosen, before anything runs.
    with pytest.raises(ValueError, match=r"soft_heads 2 names a head the block \(middle_block.1\) lacks \(it has 2: 0..1\)"):
        with perturb_attention(model, "middle", kind="soft", soft_alpha=0.3, soft_heads=[2]):
            pytest.fail("the body ran")
    with pytest.raises(ValueError, match=r"soft_heads 2 names a head the block \(middle_block.1\) lacks"):
        PAGGuidedModel(model, 1.0, "middle", kind="soft", soft_alpha=0.3, soft_heads=[2])


def test_tpg_is_a_permutation_of_the_branch_plus_the_unpermuted_skip():
    model = tiny_unet()
    block = middle(model)
    x = block_input(block, side=4, n=3)
    tokens = 16
    with torch.no_grad():
        plain = block(x).reshape(3, block.channels, -1)
        h = plain - x.reshape(3, block.channels, -1)
        seeds = [perturbation_generator(4, i) for i in (2, 7, 9)]
        tpg = make_perturbation("tpg").with_generators(seeds)
        with perturb_attention(model, "middle", kind=tpg):
            ours = block(x).reshape(3, block.channels, -1)
    flat_x = x.reshape(3, block.channels, -1)
    for r, index in enumerate((2, 7, 9)):
        perm = torch.randperm(tokens, generator=perturbation_generator(4, index))
        assert sorted(perm.tolist()) == list(range(tokens)) and perm.tolist() != list(range(tokens))
        torch.testing.assert_close(ours[r], flat_x[r] + h[r][:, perm], rtol=0, atol=1e-6)
        # The reference's rule, the tokens entering the branch shuffled, gives the same: the branch is
        # permutation-equivariant (GroupNorm over all tokens, 1x1 convolutions, attention without positions).
        shuffled = flat_x[r : r + 1][:, :, perm].reshape(1, block.channels, 4, 4)
        with torch.no_grad():
            branch = block(shuffled).reshape(1, block.channels, -1) - flat_x[r : r + 1][:, :, perm]
        torch.testing.assert_close(ours[r], flat_x[r] + branch[0], rtol=0, atol=1e-5)


def test_tpg_without_streams_shares_one_permutation_as_the_reference():
    model = tiny_unet()
    block = middle(model)
    x = block_input(block, side=4, n=2)
    with torch.no_grad():
        h = block(x).reshape(2, block.channels, -1) - x.reshape(2, block.channels, -1)
        torch.manual_seed(8)
        with perturb_attention(model, "middle", kind="tpg"):
            ours = block(x).reshape(2, block.channels, -1)
    torch.manual_seed(8)
    perm = torch.randperm(16)
    torch.testing.assert_close(ours, x.reshape(2, block.channels, -1) + h[:, :, perm], rtol=0, atol=1e-6)


# --- with PAGGuidedModel ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SUCCESSORS)
def test_guided_paths_agree(name):
    model = tiny_unet()
    x, t, kwargs = batch(5)  # t = 0, 417, 999, 250, 600
    layers = "input_blocks.3.1,output_blocks.0.1,output_blocks.3.1"
    outs = {}
    for t_range in [None, (250, 600)]:
        for mode, flags in GUIDED_PATHS.items():
            guided = PAGGuidedModel(model, 2.0, layers, t_range=t_range, kind=kind_of(name), **flags,
                                    **SUCCESSORS[name])
            with torch.no_grad(), batch_streams(1, [0, 1, 2, 3, 4]):
                outs[mode, t_range] = guided(x, t, **kwargs)
            assert blocks_clean(model)
    for t_range in [None, (250, 600)]:
        for mode in ("batched", "shared_prefix"):
            torch.testing.assert_close(outs[mode, t_range], outs["naive", t_range], rtol=0, atol=1e-5)
    with torch.no_grad():
        plain = model(x, t, **kwargs)
    assert torch.equal(outs["naive", (250, 600)][[0, 2]], plain[[0, 2]])
    assert not torch.allclose(outs["naive", None], plain, atol=1e-3)  # the perturbation changes the output


def test_tpg_samples_do_not_depend_on_their_batch_or_the_pag_mode(monkeypatch):
    seen = []
    real = perturbations.TPGPerturbation.permutations

    def recording(self, rows, tokens, device):
        out = real(self, rows, tokens, device)
        seen.append(out)
        return out

    monkeypatch.setattr(perturbations.TPGPerturbation, "permutations", recording)
    model = tiny_unet()
    x, t, kwargs = batch(3)
    t = torch.full_like(t, 417)
    outputs, draws = {}, {}
    for name, indices, mode in [
        ("three", [5, 6, 7], dict()),
        ("last two", [6, 7], dict()),
        ("two passes", [5, 6, 7], dict(batched=False)),
        ("no sharing", [5, 6, 7], dict(share_prefix=False)),
    ]:
        seen.clear()
        keep = slice(3 - len(indices), None)
        guided = PAGGuidedModel(model, 2.0, "all", kind="tpg", **mode)
        with torch.no_grad(), batch_streams(9, indices):
            outputs[name] = guided(x[keep], t[keep], y=kwargs["y"][keep])
        draws[name] = seen[:]
    assert len(draws["three"]) == 7  # one permutation per row and perturbed block
    for name in ("two passes", "no sharing"):
        assert all(torch.equal(a, b) for a, b in zip(draws["three"], draws[name]))
        torch.testing.assert_close(outputs[name], outputs["three"], rtol=0, atol=1e-5)
    assert all(torch.equal(a[1:], b) for a, b in zip(draws["three"], draws["last two"]))
    torch.testing.assert_close(outputs["last two"], outputs["three"][1:], rtol=0, atol=1e-5)
    # Sample 6's first permutation is the first draw of its own perturbation stream.
    assert torch.equal(draws["three"][0][1], torch.randperm(draws["three"][0].shape[1],
                                                            generator=perturbation_generator(9, 6)))


# --- flags -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, kind, params, text",
    [
        (dict(pag_perturbation="seg", pag_seg_sigma="inf"), "seg", dict(seg_sigma=math.inf), "seg (seg_sigma=inf)"),
        (dict(pag_perturbation="seg", pag_seg_sigma="4"), "seg", dict(seg_sigma=4.0), "seg (seg_sigma=4)"),
        (dict(pag_perturbation="tpg"), "tpg", {}, "tpg"),
        (dict(pag_perturbation="soft", pag_soft_alpha="0.5"), "soft", dict(soft_alpha=0.5),
         "soft (soft_alpha=0.5, soft_heads=None)"),
        (dict(pag_perturbation="soft", pag_soft_alpha="1", pag_soft_heads="1,0"), "soft",
         dict(soft_alpha=1.0, soft_heads="1,0"), "soft (soft_alpha=1, soft_heads=0,1)"),
    ],
)
def test_successor_flags(values, kind, params, text):
    args = flag_args(pag_scale=2.0, **values)
    spec = PAGFlags().spec(args)
    assert (spec.kind, spec.params) == (kind, params)
    assert spec.perturbation.describe() == text
    assert f"perturbation {text}" in describe_guidance(args)
    model = tiny_unet()
    guided = guide_model(model, create_gaussian_diffusion(steps=1000), args)
    assert guided.perturbation.describe() == text


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(pag_perturbation="seg"), "--pag_perturbation seg needs --pag_seg_sigma (std of SEG's Gaussian blur"),
        (dict(pag_perturbation="seg", pag_seg_sigma="0"), "perturbation 'seg': seg_sigma must be > 0 (or inf), got 0"),
        (dict(pag_perturbation="seg", pag_seg_sigma="nan"), "seg_sigma must be finite, got nan"),
        (dict(pag_perturbation="mask", pag_drop_rate="0.5", pag_seg_sigma="2"),
         "--pag_seg_sigma applies to --pag_perturbation seg only, not 'mask'"),
        (dict(pag_perturbation="soft", pag_soft_alpha="1.5"), "soft_alpha must be in [0, 1], got 1.5"),
        (dict(pag_perturbation="soft", pag_soft_alpha="0.5", pag_soft_heads="a"), "soft_heads must be 'all' or"),
        (dict(pag_perturbation="tpg", pag_soft_alpha="0.5"), "--pag_soft_alpha applies to --pag_perturbation soft"),
    ],
)
def test_successor_flag_errors(values, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PAGFlags().spec(flag_args(pag_scale=2.0, **values))


def test_a_soft_head_the_model_lacks_is_a_flag_error_before_sampling():
    args = flag_args(pag_scale=2.0, pag_perturbation="soft", pag_soft_alpha="0.5", pag_soft_heads="0,9")
    with pytest.raises(UsageError, match=r"--pag_perturbation soft: .*soft_heads 0,9 names a head the block \(\S+\) lacks"):
        guide_model(tiny_unet(), create_gaussian_diffusion(steps=1000), args)


def test_ignored_successor_flags_are_named():
    from guided_diffusion.run.guidance import ignored_flags_warnings

    lines = ignored_flags_warnings(flag_args(pag_perturbation="seg", pag_seg_sigma="2"))
    assert lines and "--pag_perturbation seg --pag_seg_sigma 2" in lines[0]


def test_docs_table_lists_every_registered_kind():
    import os
    import re

    from conftest import REPO_ROOT

    with open(os.path.join(REPO_ROOT, "docs", "pag.md")) as f:
        rows = re.findall(r"^\| `(\w+)` \|", f.read(), flags=re.M)
    assert set(perturbations.PERTURBATIONS) <= set(rows)


# --- the samplers --------------------------------------------------------------------------------------------------

FEW = ["--num_samples", "4", "--timestep_respacing", "3"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--pag_perturbation", "seg", "--pag_seg_sigma", "inf"],
        ["--pag_perturbation", "soft", "--pag_soft_alpha", "0.5", "--pag_soft_heads", "0"],
        ["--pag_perturbation", "tpg"],
    ],
)
def test_image_sample_runs_each_successor_with_compare(image_sample, tmp_path, monkeypatch, flags):
    monkeypatch.setenv("PAG_ADM_DIGEST_DIR", str(tmp_path / "digests"))
    out = tmp_path / "guided"
    argv = FEW + ["--batch_size", "4", "--pag_scale", "2.0", "--pag_layers", "middle", *flags]
    path = image_sample.main(argv + ["--out_dir", str(out), "--compare", "True"])
    assert (out / "compare.png").is_file()
    with np.load(path) as data:
        guided = data["arr_0"]
    with np.load(next((out / "baseline").glob("samples_*.npz"))) as data:
        assert not np.array_equal(data["arr_0"], guided)  # the perturbation changed the samples
    if flags[1] == "tpg":
        # Each sample's permutations come from its own stream: another batch size gives the same samples (up to
        # the kernels' rounding for another batch shape).
        path = image_sample.main(FEW + ["--batch_size", "3", "--pag_scale", "2.0", "--pag_layers", "middle", *flags,
                                        "--out_dir", str(tmp_path / "by3")])
        with np.load(path) as data:
            assert np.abs(data["arr_0"].astype(int) - guided.astype(int)).max() <= 1


# --- rows ----------------------------------------------------------------------------------------------------------


def test_successor_rows():
    from guided_diffusion.run.guidance import check_guidance_args
    from guided_diffusion.methods.pag import resolve_layers
    from test_perturbations import adm256_uncond_blocks, parse_row, row_names

    expected = {
        "adm256_uncond_ddpm250_seg": ("seg", dict(seg_sigma=math.inf), "middle_block.1"),
        "adm256_uncond_ddpm250_tpg": ("tpg", {}, "input"),
        "adm256_uncond_ddpm250_softpag": (
            "soft", dict(soft_alpha=0.5), "input_blocks.14.1,input_blocks.16.1,input_blocks.17.1,middle_block.1"
        ),
        "digits16_lab_seg": ("seg", dict(seg_sigma=math.inf), "middle"),
        "digits16_lab_tpg": ("tpg", {}, "middle"),
        "digits16_lab_soft": ("soft", dict(soft_alpha=0.5), "middle"),
    }
    assert row_names("digits16_lab_*") == sorted(n for n in expected if n.startswith("digits16"))
    model = adm256_uncond_blocks()
    for name, (kind, params, layers) in expected.items():
        row, args = parse_row(name)
        check_guidance_args(args)
        spec = PAGFlags().spec(args)
        assert (spec.kind, spec.params, args.pag_layers, args.pag_scale) == (kind, params, layers, 3.0)
        assert row.published == {}
        if name.startswith("adm256"):
            assert "not tuned for ADM" in row.title
            assert (args.class_cond, args.timestep_respacing, args.use_ddim) == (False, "250", False)
            assert resolve_layers(model, layers)
