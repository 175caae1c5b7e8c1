"""Our AutoencoderKL against diffusers' on identical random weights (fp32, relative error <= 1e-5).

Each case builds a diffusers model, randomises every parameter (GroupNorm affine and biases too),
converts its state dict to CompVis with `vae_fix.layouts`, loads it into ours strictly, and
compares encoder moments (mean + raw log-variance) and decoder output.
Relative error = max|ours - diffusers| / max|diffusers|.
"""
import pytest
import torch

from vae_fix import layouts
from vae_fix.model import AutoencoderKL, infer_config
from vae_files import randomize_

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def diffusers_kl(block_out_channels, layers_per_block, latent_channels, quant=True, attn_levels=(),
                 mid_attention=True, seed=0):
    levels = range(len(block_out_channels))
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=tuple("AttnDownEncoderBlock2D" if i in attn_levels else "DownEncoderBlock2D" for i in levels),
        up_block_types=tuple("AttnUpDecoderBlock2D" if i in attn_levels else "UpDecoderBlock2D" for i in reversed(levels)),
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=32,
        use_quant_conv=quant, use_post_quant_conv=quant, mid_block_add_attention=mid_attention,
    )
    return randomize_(model, seed).eval()


def ours_from(reference) -> AutoencoderKL:
    compvis, layout, prefix, ignored = layouts.to_compvis(reference.state_dict())
    assert (layout, prefix, ignored) == ("diffusers", "", [])
    model = AutoencoderKL(infer_config(compvis)).eval()
    model.load_state_dict(compvis, strict=True)
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def compare(reference, ours, size=32, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1   # [B, 3, H, W] in -1..1
    x_before = x.clone()
    with torch.no_grad():
        ref_moments = reference.encode(x).latent_dist.parameters  # raw moments, logvar unclamped
        our_moments = ours.moments(x)
        c = ours.config.latent_channels
        z = torch.randn(batch, c, *our_moments.shape[-2:], generator=g)  # [B, C, h, w]
        ref_image = reference.decode(z).sample
        our_image = ours.decode(z)
    assert torch.equal(x, x_before), "the model modified its input"
    assert ref_moments.std() > 1e-3 and ref_image.std() > 1e-3, "degenerate reference output"
    return rel_err(our_moments, ref_moments), rel_err(our_image, ref_image)


CASES = {
    # name: (block_out_channels, layers_per_block, latent_channels, quant convs, extra)
    "sd1_sd2": ((32, 64, 64), 1, 4, True, {}),
    "sdxl": ((32, 64, 64), 2, 4, True, {"seed": 7}),
    "sd3_flux_16ch_no_quant": ((32, 64, 64), 1, 16, False, {}),
    "retrained_8ch": ((32, 64, 64), 1, 8, True, {}),
    "widths_64_128_128_lpb1": ((64, 128, 128), 1, 4, True, {}),
    "widths_64_128_128_lpb3": ((64, 128, 128), 3, 4, True, {}),
    "two_levels_no_mid_attention": ((32, 64), 2, 4, True, {"mid_attention": False}),
    "attention_in_blocks": ((32, 64, 64), 1, 4, True, {"attn_levels": (2,)}),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_diffusers(name):
    channels, layers, latent, quant, extra = CASES[name]
    reference = diffusers_kl(channels, layers, latent, quant, **extra)
    ours = ours_from(reference)
    cfg = ours.config
    assert (cfg.latent_channels, cfg.use_quant_conv, cfg.num_res_blocks) == (latent, quant, layers)
    assert [cfg.base_channels * m for m in cfg.channel_mult] == list(channels)
    moments_err, image_err = compare(reference, ours)
    assert moments_err <= TOL, f"{name}: encoder moments differ, relative error {moments_err:.2e}"
    assert image_err <= TOL, f"{name}: decoder output differs, relative error {image_err:.2e}"


def test_full_sd_layout_matches_diffusers():
    reference = diffusers_kl((128, 256, 512, 512), 2, 4, True, seed=3)
    ours = ours_from(reference)
    assert ours.config.downscale == 8 and ours.config.channel_mult == (1, 2, 4, 4)
    moments_err, image_err = compare(reference, ours, size=64, batch=1)
    assert moments_err <= TOL and image_err <= TOL, (moments_err, image_err)


def test_comparison_detects_a_wrong_mapping():
    """The check can fail: swap two attention weights and the error is far above tolerance."""
    reference = diffusers_kl((32, 64, 64), 1, 4, True)
    ours = ours_from(reference)
    with torch.no_grad():
        q, k = ours.encoder.mid.attn_1.q.weight, ours.encoder.mid.attn_1.k.weight
        q_copy = q.clone()
        q.copy_(k)
        k.copy_(q_copy)
    moments_err, _ = compare(reference, ours)
    assert moments_err > 1e-3


def test_round_trip_diffusers_names_bit_exact():
    reference = diffusers_kl((32, 64, 64), 2, 4, True, attn_levels=(1,))
    original = reference.state_dict()
    compvis, *_ = layouts.to_compvis(original)
    back = layouts.compvis_to_diffusers(compvis, infer_config(compvis))
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) and back[k].shape == original[k].shape for k in original)


def test_diffusers_config_builds_the_same_model():
    reference = diffusers_kl((32, 64, 64), 2, 8, True, attn_levels=(1,), mid_attention=False)
    cfg = ours_from(reference).config
    rebuilt = diffusers.AutoencoderKL(**{k: v for k, v in layouts.diffusers_config(cfg).items() if not k.startswith("_")})
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in reference.state_dict().items()}


# ---------------------------------------------------------------- through real files

@pytest.mark.parametrize("quant,latent", [(True, 4), (False, 16)])
def test_diffusers_save_pretrained_folder_loads_and_matches(tmp_path, quant, latent):
    from vae_fix.loader import load_vae
    reference = diffusers_kl((32, 64, 64), 2, latent, quant, seed=11)
    reference.save_pretrained(tmp_path / "vae")  # diffusers' own writer: real config.json and weights file
    loaded = load_vae(tmp_path / "vae")
    assert loaded.file.container == "diffusers-folder" and loaded.file.extra_config["scaling_factor"] == 0.18215
    moments_err, image_err = compare(reference, loaded.model)
    assert moments_err <= TOL and image_err <= TOL, (moments_err, image_err)


def diffusers_temporal(seed=0):
    model = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3, layers_per_block=2, latent_channels=4)
    return randomize_(model, seed).eval()


def test_svd_temporal_vae_encoder_matches_diffusers(tmp_path):
    """SVD's VAE: diffusers folder and the sgm (CompVis) layout both load encoder-only, same moments."""
    from safetensors.torch import save_file
    from vae_fix.loader import load_vae
    reference = diffusers_temporal(seed=5)
    reference.save_pretrained(tmp_path / "svd_vae")
    sgm, layout, _, _ = layouts.to_compvis(reference.state_dict())
    # names of ComfyUI's comfy/ldm/modules/temporal_ae.py VideoDecoder
    assert {"decoder.mid.block_1.time_stack.in_layers.2.weight", "decoder.mid.block_2.mix_factor",
            "decoder.up.0.block.2.time_stack.out_layers.3.bias", "decoder.conv_out.time_mix_conv.weight"} <= set(sgm)
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in sgm.items()}, str(tmp_path / "svd.safetensors"))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = reference.encode(x).latent_dist.parameters
        for path in (tmp_path / "svd_vae", tmp_path / "svd.safetensors"):
            loaded = load_vae(path)
            assert loaded.config.decoder_kind == "none"
            assert any("decoder not loaded" in n for n in loaded.file.notes)
            assert rel_err(loaded.model.moments(x), ref) <= TOL, path
