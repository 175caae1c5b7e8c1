"""Half precision with the automatic float32 redo: `decode` / `encode` (CLI and engine) and every
feature reading moments, on a VAE that really overflows fp16 (asserted first) and on one that does not."""
import pytest
import torch

from vae_fix.builders.overflow import overflowing_vae
from vae_fix.builders.planted import demo_image
from vae_fix.codec import model_codec
from vae_fix.images import load_image
from vae_fix.latent_io import read_latent, write_latent
from vae_fix.loader import load_vae, save_vae
from vae_fix.model import preset_config, random_vae
from vae_fix.posterior import read_posterior
from vae_fix.repair import psnr
from vae_fix.safe import first_finite, safe_decode, safe_encode

from run_cli import run_cli, strict_json


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("safe")
    save_vae(overflowing_vae(), d / "overflow.safetensors")
    save_vae(random_vae(preset_config("sd", small=True), 1), d / "plain.safetensors")
    image = demo_image(64, 64, None)  # fp16 convolutions are slow on a CPU
    from vae_fix.images import save_png
    save_png(image[0], d / "image.png")
    reference = load_vae(d / "overflow.safetensors").codec()
    z = safe_encode(reference, load_image(d / "image.png")).output
    write_latent(z, d / "z.latent")
    return d, z, safe_decode(reference, z).output


def test_fp16_really_overflows_then_the_redo_gives_the_fp32_picture(files):
    d, z, want = files
    half = load_vae(d / "overflow.safetensors", dtype=torch.float16).model
    with torch.no_grad():
        assert not torch.isfinite(half.decode(z.half())).all(), "the test VAE must give NaN/inf in fp16 first"
    run = safe_decode(model_codec(half), z)
    assert run.redone and run.dtype_used == "float32"
    assert run.attempts[0]["dtype"] == "float16" and run.attempts[0]["non_finite"] > 0
    assert torch.isfinite(run.output).all() and psnr(run.output, want) > 40
    assert "decoded again in float32" in run.summary()


def test_cli_decode_and_encode_in_fp16_write_finite_outputs_and_say_they_were_redone(files, tmp_path):
    d, z, want = files
    r = run_cli("decode", "--vae", d / "overflow.safetensors", "--latent", d / "z.latent", "--dtype", "fp16",
                "--out", tmp_path / "dec")
    assert r.returncode == 0, r.stderr
    report = strict_json(tmp_path / "dec" / "safe_run.json")
    assert report["redone_in_float32"] and report["dtype_used"] == "float32"
    assert psnr(load_image(tmp_path / "dec" / "decoded.png"), want) > 40
    r = run_cli("encode", "--vae", d / "overflow.safetensors", "--image", d / "image.png", "--dtype", "fp16",
                "--out", tmp_path / "enc")
    assert r.returncode == 0, r.stderr
    assert strict_json(tmp_path / "enc" / "safe_run.json")["redone_in_float32"]
    got = read_latent(tmp_path / "enc" / "encoded.latent")
    assert got.shape == z.shape and (got - z).abs().max() < 1e-2 * z.abs().max()


def test_a_vae_that_fits_fp16_is_not_redone(files, tmp_path):
    d, z, _ = files
    r = run_cli("decode", "--vae", d / "plain.safetensors", "--latent", d / "z.latent", "--dtype", "fp16",
                "--out", tmp_path / "dec")
    assert r.returncode == 0, r.stderr
    report = strict_json(tmp_path / "dec" / "safe_run.json")
    assert report["dtype_used"] == "float16" and not report["redone_in_float32"] and len(report["attempts"]) == 1
    plain = load_vae(d / "plain.safetensors").codec()
    run = safe_decode(plain, z)  # a float32 VAE: one attempt, nothing to redo
    assert run.dtype_used == "float32" and not run.redone and len(run.attempts) == 1


def test_moments_in_fp16_are_redone_and_the_posterior_says_so(files):
    d, _, _ = files
    image = load_image(d / "image.png")
    half = load_vae(d / "overflow.safetensors", dtype=torch.float16).codec()
    post, ref = read_posterior(half, image), read_posterior(load_vae(d / "overflow.safetensors").codec(), image)
    assert any("moments in float16 gave" in n and "redone in float32" in n for n in post.notes)
    assert torch.isfinite(post.logvar_raw).all()
    assert (post.mean - ref.mean).abs().max() < 1e-2 * ref.mean.abs().max()
    fine = read_posterior(load_vae(d / "plain.safetensors", dtype=torch.float16).codec(), image)
    assert not any("redone" in n for n in fine.notes)


def test_bad_latents_and_vaes_get_the_clear_error(files, tmp_path):
    d, z, _ = files
    bad = z.clone()
    bad[0, 0, 0, 0] = float("nan")
    write_latent(bad, tmp_path / "nan.latent")
    r = run_cli("decode", "--vae", d / "plain.safetensors", "--latent", tmp_path / "nan.latent", "--out", tmp_path / "o")
    assert r.returncode == 2 and "nan.latent" in r.stderr and "non-finite" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    write_latent(torch.zeros(1, 16, 8, 8), tmp_path / "wide.latent")
    r = run_cli("decode", "--vae", d / "plain.safetensors", "--latent", tmp_path / "wide.latent", "--out", tmp_path / "o")
    assert r.returncode == 2 and "[B, 4, h, w]" in r.stderr
    with pytest.raises(Exception, match="non-finite values even in float32"):
        first_finite("decode", [("float16", lambda: torch.full((2,), float("nan"))),
                                ("float32", lambda: torch.full((2,), float("inf")))])
