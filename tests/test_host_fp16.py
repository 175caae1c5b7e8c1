"""VAE fp16 Fix inside a real ComfyUI server (CPU): a VAE that overflows fp16 (its streams scaled up
exactly), fixed by the node, then run by core VAE Encode / VAE Decode in fp16, against the same
file decoded in fp32; saved to models/vae under a new name and loaded back by the strict loader.
A Wan 2.1 VAE (the host's own model) likewise, its fp16 emulated on the CPU; families the rescaling
cannot cover are refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest

from host_family_vaes import family_vae
from host_models import IMAGE, NORM_OVERFLOW, OVERFLOW
from host_server import failed, images_of, succeeded

pytestmark = pytest.mark.host


def roundtrip(vae_ref: list) -> dict:
    return {"e": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": vae_ref}},
            "d": {"class_type": "VAEDecode", "inputs": {"samples": ["e", 0], "vae": vae_ref}},
            "s": {"class_type": "PreviewImage", "inputs": {"images": ["d", 0]}}}


def load(name: str, dtype: str) -> dict:
    return {"class_type": "VAEFixLoadVAE", "inputs": {"vae_name": name, "dtype": dtype}}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_the_fixed_vae_runs_in_fp16_in_core_nodes_like_the_original_in_fp32(host):
    image = {"class_type": "LoadImage", "inputs": {"image": IMAGE}}
    ref = succeeded(host.run({"img": image, "v": load(OVERFLOW, "fp32"), **roundtrip(["v", 0])}))
    broken = succeeded(host.run({"img": image, "v": load(OVERFLOW, "fp16"), **roundtrip(["v", 0])}))
    fixed_prompt = {"img": image, "v": load(OVERFLOW, "fp32"), **roundtrip(["f", 0]),
                    "f": {"class_type": "VAEFixFp16Fix", "inputs": {"vae": ["v", 0], "headroom": 16.0, "dtype": "fp16",
                                                                     "probe_sizes": "64", "check_size": 128,
                                                                     "save_as": "overflow_fixed.safetensors"}},
                    "r": {"class_type": "PreviewAny", "inputs": {"source": ["f", 1]}}}
    fixed = succeeded(host.run(fixed_prompt, timeout=600))
    want, bad, got = (images_of(host, o, "s")[0] for o in (ref, broken, fixed))
    assert psnr(bad, want) < 20, "in fp16 the unfixed VAE should be ruined (inf/NaN)"
    assert psnr(got, want) > 35, "the fixed VAE in fp16 should look like the original in fp32"
    report = json.loads(fixed["r"]["text"][0])
    assert report["fp16_safe"] and report["changed"] and report["largest_after"] <= report["bound"] * 1.01
    assert images_of(host, fixed, "f")[0].shape[1] >= 480  # the activation plot, the node's preview
    again = succeeded(host.run({"img": image, "v": load("overflow_fixed.safetensors", "fp16"), **roundtrip(["v", 0])}))
    assert psnr(images_of(host, again, "s")[0], want) > 35, "the saved file is the fix"
    err = failed(host.run(fixed_prompt))  # the name is taken now: refused, nothing replaced
    assert err["node_type"] == "VAEFixFp16Fix" and "already exists" in err["exception_message"]


def test_a_layer_no_rescaling_reaches_is_named_or_fine_tuned_with_finetune_steps(host):
    image = {"class_type": "LoadImage", "inputs": {"image": IMAGE}}
    fix = {"class_type": "VAEFixFp16Fix", "inputs": {"vae": ["v", 0], "headroom": 16.0, "dtype": "fp16", "probe_sizes": "64",
                                                     "check_size": 64}}
    err = failed(host.run({"img": image, "v": load(NORM_OVERFLOW, "fp32"), "f": fix, **roundtrip(["f", 0])}))
    assert err["node_type"] == "VAEFixFp16Fix" and "decoder.mid.block_1.norm1" in err["exception_message"]
    fix["inputs"]["finetune_steps"] = 20
    ref = succeeded(host.run({"img": image, "v": load(NORM_OVERFLOW, "fp32"), **roundtrip(["v", 0])}))
    out = succeeded(host.run({"img": image, "v": load(NORM_OVERFLOW, "fp32"), "f": fix, **roundtrip(["f", 0]),
                              "r": {"class_type": "PreviewAny", "inputs": {"source": ["f", 1]}}}, timeout=600))
    report = json.loads(out["r"]["text"][0])
    assert report["fp16_safe"] and report["finetuned"]["layers"][0] == "decoder.mid.block_1.norm1"
    assert psnr(images_of(host, out, "s")[0], images_of(host, ref, "s")[0]) > 35, "core fp16 decode of the fix"


def test_a_wan_vae_that_overflows_fp16_is_fixed_on_the_hosts_own_model(host):
    name, _ = family_vae(host, "wan21", overflow="Wan")
    image = {"class_type": "LoadImage", "inputs": {"image": IMAGE}}
    fix = {"class_type": "VAEFixFp16Fix", "inputs": {"vae": ["v", 0], "headroom": 16.0, "dtype": "fp32", "probe_sizes": "64",
                                                     "check_size": 64, "save_as": "wan_fixed.safetensors"}}
    out = succeeded(host.run({"img": image, "v": load(name, "fp32"), "f": fix, **roundtrip(["f", 0]),
                              "r": {"class_type": "PreviewAny", "inputs": {"source": ["f", 1]}}}, timeout=900))
    report = json.loads(out["r"]["text"][0])
    assert report["family"].startswith("Wan 2.1") and report["fp16"] == "emulated", report["family"]
    assert report["fp16_safe"] and report["changed"] and report["largest_before"] > 65504 >= report["largest_after"]
    rows = report["proof"] + report["held_out"]
    assert not any(r["original_fp16_decode_finite"] or r["original_fp16_finite"] for r in rows), "it must overflow first"
    assert min(r["fp16_psnr_db"] for r in rows) >= 40 and max(r["fp32_pixel_max_abs_diff"] for r in rows) < 1e-4
    original = succeeded(host.run({"img": image, "v": load(name, "fp32"), **roundtrip(["v", 0])}))
    saved = succeeded(host.run({"img": image, "v": load("wan_fixed.safetensors", "fp32"), **roundtrip(["v", 0])}))
    want = images_of(host, original, "s")[0]
    assert psnr(images_of(host, out, "s")[0], want) > 40 and psnr(images_of(host, saved, "s")[0], want) > 40


def test_a_family_the_rescaling_cannot_cover_is_refused_by_name(host):
    name, _ = family_vae(host, "hunyuan_image")
    fix = {"class_type": "VAEFixFp16Fix", "inputs": {"vae": ["v", 0], "headroom": 16.0, "dtype": "fp32", "probe_sizes": "64"}}
    err = failed(host.run({"v": load(name, "fp32"), "f": fix,
                           "r": {"class_type": "PreviewAny", "inputs": {"source": ["f", 1]}}}))
    assert err["node_type"] == "VAEFixFp16Fix" and "Hunyuan Image 2.1" in err["exception_message"]
    assert "parameter-free shortcuts" in err["exception_message"] and "Wan 2.1" in err["exception_message"]
