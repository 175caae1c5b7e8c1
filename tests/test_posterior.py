import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vae_fix.codec import Codec, model_codec
from vae_fix.errors import InputError
from vae_fix.images import load_image
from vae_fix.model import preset_config, random_vae
from vae_fix.posterior import LOGVAR_MAX, LOGVAR_MIN, prepare_images, read_posterior


def pooled_moments(x):
    """A local stand-in encoder: 8x8 average of each colour -> 2 mean and 2 log-variance channels.

    Input -1..1. mean = (r, g); logvar_0 = 40 * b - 5 (spans -45..35, both sides of the clamp);
    logvar_1 = -20.
    """
    p = F.avg_pool2d(x, 8)
    return torch.cat([p[:, :2], 40 * p[:, 2:3] - 5, torch.full_like(p[:, :1], -20.0)], dim=1)


def fn_codec(moments_fn, downscale: int = 8) -> Codec:
    """A codec around a plain moments function on the CPU in float32."""
    return Codec("stand-in", 2, downscale, torch.device("cpu"), torch.float32, moments=moments_fn)


def cell_image(rgb_cells):
    """[h, w, 3] cell colours in 0..1 -> [1, 3, 8h, 8w] image, each 8x8 cell a flat colour."""
    t = torch.tensor(rgb_cells, dtype=torch.float32).permute(2, 0, 1)[None]
    return t.repeat_interleave(8, 2).repeat_interleave(8, 3)


def test_statistics_match_a_hand_computation():
    # cell (0,0): r,g = 1,0.5 -> mu = (1, 0); b = 0 -> logvar_0 = 40*(-1) - 5 = -45 (below the floor)
    # cell (0,1): r,g = 0,0   -> mu = (-1, -1); b = 1 -> logvar_0 = 35 (above the ceiling)
    img = cell_image([[[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    post = read_posterior(fn_codec(pooled_moments), img)
    assert post.latent_size == (1, 2) and post.latent_channels == 2
    assert torch.allclose(post.mean[0, :, 0, 0], torch.tensor([1.0, 0.0]))
    assert post.logvar_raw[0, 0, 0, 0].item() == pytest.approx(-45.0)
    assert post.logvar_raw[0, 0, 0, 1].item() == pytest.approx(35.0)
    assert post.logvar[0, 0, 0, 0].item() == LOGVAR_MIN == -30.0
    assert post.logvar[0, 0, 0, 1].item() == LOGVAR_MAX == 20.0
    assert post.std[0, 0, 0, 0].item() == pytest.approx(math.exp(-15.0), rel=1e-5)
    # KL per element 0.5 * (mu^2 + e^lv - 1 - lv) with the clamped lv, summed over channels
    kl00 = 0.5 * (1 + math.exp(-30) - 1 + 30) + 0.5 * (0 + math.exp(-20) - 1 + 20)
    kl01 = 0.5 * (1 + math.exp(20) - 1 - 20) + 0.5 * (1 + math.exp(-20) - 1 + 20)
    assert post.kl[0, 0, 0].item() == pytest.approx(kl00, rel=1e-5)
    assert post.kl[0, 0, 1].item() == pytest.approx(kl01, rel=1e-5)
    assert post.kl_total[0].item() == pytest.approx(kl00 + kl01, rel=1e-5)
    assert post.logvar_raw_min()[0, 0, 0].item() == pytest.approx(-45.0)


def test_real_model_mean_is_what_encode_returns_and_input_untouched():
    vae = random_vae(preset_config("sd", small=True), seed=1)
    img = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    before = img.clone()
    post = read_posterior(model_codec(vae), img)
    assert torch.equal(img, before)
    assert post.latent_size == (8, 12)  # small preset downscales by 4, read from the model's config
    with torch.no_grad():
        enc = vae.encode(img * 2 - 1)
        raw = vae.moments(img * 2 - 1)[:, 4:]
    assert torch.allclose(post.mean, enc, atol=1e-5)
    assert torch.allclose(post.logvar_raw, raw, atol=1e-5)
    assert post.mean.dtype == torch.float32 and post.tiling is None and not post.size.changed


def test_statistics_are_float32_when_the_model_runs_in_bfloat16():
    vae = random_vae(preset_config("sd", small=True), seed=1).to(torch.bfloat16)
    post = read_posterior(model_codec(vae), torch.rand(1, 3, 16, 16))
    for t in (post.mean, post.logvar_raw, post.logvar, post.std, post.kl, post.kl_total):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())


@pytest.mark.parametrize("policy,processed,latent,offset,padding", [
    ("crop", (32, 48), (4, 6), (2, 1), (0, 0)),
    ("pad", (40, 56), (5, 7), (0, 0), (3, 6)),
])
def test_sizes_not_a_multiple_of_8_are_handled_and_reported(policy, processed, latent, offset, padding):
    img = torch.rand(1, 3, 37, 50)
    post = read_posterior(fn_codec(pooled_moments), img, size_policy=policy)
    s = post.size
    assert s.changed and s.policy == policy and s.original == (37, 50)
    assert s.processed == processed and s.offset == offset and s.padding == padding
    assert post.latent_size == latent
    assert "not a multiple of 8" in s.describe() and s.to_dict()["changed"] is True


def test_crop_keeps_the_centre_and_pad_repeats_the_edge():
    img = torch.rand(1, 3, 20, 20)
    x, _ = prepare_images(img, 8, "crop")
    assert torch.equal(x, img[:, :, 2:18, 2:18])
    x, _ = prepare_images(img, 8, "pad")
    assert x.shape[2:] == (24, 24) and torch.equal(x[:, :, :20, :20], img)
    assert torch.equal(x[:, :, 23, :20], img[:, :, 19, :])


def test_an_rgba_png_loads_without_alpha_and_reads(tmp_path):
    rgba = np.zeros((16, 24, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10  # nearly transparent red: alpha must be ignored
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.shape == (1, 3, 16, 24)
    post = read_posterior(fn_codec(pooled_moments), img)
    assert post.mean[0, 0].allclose(torch.full((2, 3), 200 / 255 * 2 - 1))


@pytest.mark.parametrize("bad,fragment", [
    (torch.rand(3, 16, 16), "3 dimensions"),
    (torch.rand(1, 4, 16, 16), "drop alpha"),
    (torch.rand(1, 3, 0, 16), "empty"),
    (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "uint8"),
    (torch.rand(1, 3, 16, 16) * 2 - 1, "(x + 1) / 2"),
    ("not a tensor", "got str"),
])
def test_bad_images_raise_input_error_naming_the_problem(bad, fragment):
    with pytest.raises(InputError) as e:
        read_posterior(fn_codec(pooled_moments), bad)
    assert "images" in str(e.value) and fragment in str(e.value)


def test_bad_options_raise_input_error():
    img = torch.rand(1, 3, 16, 16)
    with pytest.raises(InputError, match="size_policy"):
        read_posterior(fn_codec(pooled_moments), img, size_policy="stretch")
    with pytest.raises(InputError, match="tile"):
        read_posterior(fn_codec(pooled_moments), img, tile=12)
    with pytest.raises(InputError, match="downscale"):
        read_posterior(fn_codec(pooled_moments, downscale=4), img)  # the stand-in downscales by 8
    with pytest.raises(InputError, match="smaller than one latent cell"):
        read_posterior(fn_codec(pooled_moments), torch.rand(1, 3, 5, 16))


def test_batches_report_progress_and_a_raising_callback_cancels():
    img = torch.rand(5, 3, 16, 16)
    calls = []
    post = read_posterior(fn_codec(pooled_moments), img, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert torch.allclose(post.mean, read_posterior(fn_codec(pooled_moments), img).mean)

    def cancel(done, total):
        if done:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        read_posterior(fn_codec(pooled_moments), img, batch_size=2, progress=cancel)


def test_requested_tiles_give_the_same_moments_for_a_local_encoder():
    img = torch.rand(2, 3, 72, 104)
    whole = read_posterior(fn_codec(pooled_moments), img)
    tiled = read_posterior(fn_codec(pooled_moments), img, tile=32, tile_overlap=16)
    assert tiled.tiling.reason == "requested" and tiled.tiling.tiles_per_image == 3 * 4
    assert torch.allclose(tiled.logvar_raw, whole.logvar_raw) and torch.allclose(tiled.mean, whole.mean)


def test_out_of_memory_falls_back_to_tiles_and_says_so():
    sizes = []

    def small_memory(x):  # runs out of memory on anything larger than 64x64 pixels
        sizes.append(tuple(x.shape[2:]))
        if x.shape[2] * x.shape[3] > 64 * 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return pooled_moments(x)

    img = torch.rand(1, 3, 256, 192)
    post = read_posterior(fn_codec(small_memory), img)
    assert post.tiling is not None and post.tiling.reason == "out of memory"
    assert post.tiling.tile <= 64 and any("out of memory" in n for n in post.notes)
    assert torch.allclose(post.logvar_raw, read_posterior(fn_codec(pooled_moments), img).logvar_raw)


def test_other_errors_are_not_mistaken_for_out_of_memory():
    def broken(x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        read_posterior(fn_codec(broken), torch.rand(1, 3, 16, 16))
