"""The fp16 fix on VAEs that really overflow half precision: made so by exact, function-preserving
factors on a random VAE's residual streams (asserted to give inf/NaN in fp16 first), then fixed."""
import copy
import json

import pytest
import torch

from vae_fix.builders.overflow import overflowing_vae
from vae_fix.builders.planted import demo_image
from vae_fix.cli import main
from vae_fix.fp16_fix import KL, MIN_PSNR, _batches, fp16_fix, prove
from vae_fix.loader import load_vae, save_vae
from vae_fix.model import preset_config, random_vae
from vae_fix.probes import probe_images
from vae_fix.repair import psnr

from run_cli import run_cli, strict_json


def fp16_decode(model, image):
    with torch.no_grad():
        z = model.moments(image * 2 - 1)[:, :model.config.latent_channels]
        return copy.deepcopy(model).half().decode(z.half()).float(), model.decode(z)


@pytest.fixture(scope="module")
def fixed():
    model = overflowing_vae()
    images, names = probe_images((64,))  # fp16 convolutions are 30-100x slower than fp32 on CPUs without native fp16
    return model, fp16_fix(model, images[::2], names[::2], held_out=[demo_image(96, 96, None)], held_out_names=["demo@96"])


def test_the_overflowing_vae_really_overflows_and_equals_the_random_one_in_fp32():
    plain, scaled = random_vae(preset_config("sd", small=True), 0).eval(), overflowing_vae()
    image = demo_image(64, 64, None)
    half, full = fp16_decode(scaled, image)
    assert not torch.isfinite(half).all(), "the test VAE must break in fp16 before it is fixed"
    assert (full - fp16_decode(plain, image)[1]).abs().max() < 1e-2  # fp32 rounding at values of 1e5


def test_the_fix_makes_fp16_finite_and_close_and_keeps_fp32(fixed):
    original, result = fixed
    assert result.changed and result.safe and result.limits == []
    rows = result.proof + result.held_out
    assert all(not r["original_fp16_decode_finite"] for r in rows), "every image overflowed before"
    assert all(r["fp16_decode_finite"] and r["fp16_moments_finite"] for r in rows)
    assert min(r["fp16_psnr_db"] for r in rows) >= MIN_PSNR
    assert max(r["fp32_pixel_max_abs_diff"] for r in rows) < 1e-4     # of the 0..1 image range
    assert max(r["fp32_mean_max_rel_diff"] for r in rows) < 1e-4
    assert max(result.after.values()) <= result.bound * 1.01 < max(result.before.values())
    image = demo_image(128, 128, None)  # never seen, twice the probes' side
    half, full = fp16_decode(result.model, image)
    assert torch.isfinite(half).all() and psnr(((half + 1) / 2).clamp(0, 1), ((full + 1) / 2).clamp(0, 1)) > MIN_PSNR
    assert original is not result.model and not torch.equal(next(original.parameters()), next(result.model.parameters()))


def test_the_report_and_the_plot(fixed):
    _, result = fixed
    data = json.loads(result.json_text())
    assert data["fp16_safe"] and data["changed"] and data["largest_after"] <= data["bound"] * 1.01
    assert {p["layer"] for p in data["peaks"]} >= {"encoder.conv_in", "decoder.conv_out"}
    plot = result.pictures()["activations"]
    assert plot.shape[0] == 3 and plot.shape[2] >= 480 and plot.std() > 0.05
    assert "fp16-safe: yes" in result.summary()


def test_a_safe_vae_is_left_as_it_is():
    model = random_vae(preset_config("sd", small=True), 1).eval()
    images, names = probe_images((64,))
    result = fp16_fix(model, images[:3], names[:3])
    assert not result.changed and result.safe and "already fp16-safe" in result.summary()
    assert prove(model, copy.deepcopy(model), KL, images[:3], names[:3]) == result.proof  # every pass run twice


def test_the_proof_batches_same_size_images_and_keeps_their_order_and_rows():
    model = random_vae(preset_config("sd", small=True), 1).eval()
    images = [demo_image(s, s, None) for s in (64, 64, 96, 64)]
    names = [f"{i}@{x.shape[-1]}" for i, x in enumerate(images)]
    assert [n for _, n in _batches(images, names)] == [["0@64", "1@64"], ["2@96"], ["3@64"]]
    assert [len(n) for _, n in _batches([images[0]] * 70, ["p"] * 70)] == [64, 6]  # BATCH_PIXELS: 64 of 64 px
    rows = prove(model, model, KL, images, names, same=True)
    assert [(r["image"], r["size"]) for r in rows] == [(n, [int(n[2:])] * 2) for n in names]
    alone = prove(model, model, KL, images[1:2], names[1:2], same=True)[0]  # fp16 kernels differ by batch size
    assert alone["fp16_psnr_db"] == pytest.approx(rows[1]["fp16_psnr_db"], abs=1.0) and alone["fp16_psnr_db"] > MIN_PSNR
    assert alone["fp32_pixel_max_abs_diff"] == rows[1]["fp32_pixel_max_abs_diff"] == 0


@pytest.mark.parametrize("layout", ["compvis", "diffusers"])
def test_cli_writes_a_fixed_file_in_the_input_layout(tmp_path, layout):
    src = save_vae(overflowing_vae(seed=2), tmp_path / "big.safetensors", layout=layout)
    out = tmp_path / "fixed.safetensors"
    assert main(["fp16-fix", "--vae", str(src), "--out", str(out), "--check-sizes", "64", "--probe-sizes", "64", "--quiet"]) == 0
    fixed, before = load_vae(out), load_vae(src)
    assert fixed.file.layout == layout and set(fixed.file.state_dict) == set(before.file.state_dict)
    half, _ = fp16_decode(fixed.model, demo_image(64, 64, None))
    assert torch.isfinite(half).all()
    report = strict_json(tmp_path / "fixed_fp16_report" / "fp16_fix.json")
    assert report["fp16_safe"] and (tmp_path / "fixed_fp16_report" / "activations.png").is_file()


def test_cli_writes_nothing_for_a_safe_vae_or_bad_input(tmp_path):
    safe = save_vae(random_vae(preset_config("sd", small=True), 1), tmp_path / "safe.safetensors")
    out = tmp_path / "o.safetensors"
    assert main(["fp16-fix", "--vae", str(safe), "--out", str(out), "--check-sizes", "64", "--probe-sizes", "64", "--quiet"]) == 0
    assert not out.exists() and strict_json(tmp_path / "o_fp16_report" / "fp16_fix.json")["changed"] is False
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(safe.read_bytes()[:1000])
    for args, fragment in ((["--vae", str(broken)], "broken.safetensors"), (["--vae", str(safe), "--images", str(out)], "--images"),
                           (["--vae", str(safe), "--check-sizes", "100"], "--check-sizes")):
        r = run_cli("fp16-fix", *args, "--out", str(tmp_path / "n.safetensors"))
        assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "n.safetensors").exists() and not (tmp_path / "n_fp16_report").exists()
    r = run_cli("fp16-fix", "--vae", str(safe), "--out", str(safe))
    assert r.returncode == 2 and "exists" in r.stderr
