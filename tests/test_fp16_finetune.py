"""`fp16-fix --finetune`: a VAE whose overflow no exact rescaling reaches (a decoder norm whose own
output passes fp16's range) is refused without it, naming the layer, and made fp16-safe with it,
its outputs held to the original's."""
import torch

from vae_fix.builders.overflow import norm_overflow_vae
from vae_fix.builders.planted import demo_image
from vae_fix.cli import main
from vae_fix.errors import InputError
from vae_fix.fp16_fix import MIN_PSNR, fp16_fix
from vae_fix.fp16_tune import consumers
from vae_fix.loader import load_vae, save_vae
from vae_fix.probes import probe_images

from run_cli import run_cli, strict_json

NORM = "decoder.mid.block_1.norm1"


def test_the_norm_overflow_is_named_and_not_written_as_a_fix():
    model = norm_overflow_vae()
    images, names = probe_images((64,))
    result = fp16_fix(model, images[:4], names[:4])
    assert all(not r["original_fp16_decode_finite"] for r in result.proof), "the test VAE must break in fp16 first"
    assert not result.safe and any(lim.startswith(NORM + ":") for lim in result.limits)
    assert "fp16-safe: NO" in result.summary() and "finite on 0/4" in result.summary()
    try:
        result.require_safe("vae")
        raise AssertionError("an unsafe fix was handed out")
    except InputError as e:
        assert NORM in str(e) and "vae" in str(e)


def test_consumers_follow_the_compvis_names():
    model = norm_overflow_vae()
    assert consumers(model, NORM) == ["decoder.mid.block_1.conv1"]
    assert consumers(model, "decoder.mid.attn_1.norm") == [f"decoder.mid.attn_1.{c}" for c in "qkv"]
    assert consumers(model, "decoder.norm_out") == ["decoder.conv_out"]
    assert consumers(model, "decoder.mid.block_1.conv1") == []


def test_cli_finetune_writes_a_safe_file_with_the_outputs_held(tmp_path):
    src = save_vae(norm_overflow_vae(seed=1), tmp_path / "norm.safetensors")
    original = src.read_bytes()
    common = ["--check-sizes", "64", "--probe-sizes", "64", "--quiet"]  # refused without --finetune: test_host_fp16
    out = tmp_path / "tuned.safetensors"
    assert main(["fp16-fix", "--vae", str(src), "--out", str(out), "--finetune", "--finetune-steps", "30", *common]) == 0
    report = strict_json(tmp_path / "tuned_fp16_report" / "fp16_fix.json")
    assert report["fp16_safe"] and report["limits"] == [] and report["largest_after"] <= report["bound"] * 1.01
    assert report["finetuned"]["layers"] == [NORM, "decoder.mid.block_1.conv1"]
    assert report["finetuned"]["settings"]["steps"] == 30 and NORM in report["finetuned"]["over_before"]
    rows = report["proof"] + report["held_out"]
    assert all(r["fp16_decode_finite"] and not r["original_fp16_decode_finite"] for r in rows)
    assert min(r["fp16_psnr_db"] for r in rows) >= MIN_PSNR                 # against the original's fp32
    assert max(r["fp32_pixel_max_abs_diff"] for r in rows) < 0.02           # not exact, but held
    assert max(r["fp32_mean_max_rel_diff"] for r in rows) == 0.0            # only decoder layers were trained
    fixed, before = load_vae(out), load_vae(src)
    assert src.read_bytes() == original, "the input was modified"
    assert set(fixed.file.state_dict) == set(before.file.state_dict)
    assert all(torch.equal(v, before.file.state_dict[k]) for k, v in fixed.file.state_dict.items() if k.startswith("encoder."))
    with torch.no_grad():
        z = fixed.model.moments(demo_image(64, 64, None) * 2 - 1)[:, :4]
        assert torch.isfinite(fixed.model.half().decode(z.half())).all()
    r = run_cli("fp16-fix", "--vae", str(src), "--out", str(tmp_path / "n.safetensors"), "--finetune",
                "--finetune-steps", "0")
    assert r.returncode == 2 and "--finetune-steps" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "n.safetensors").exists()
