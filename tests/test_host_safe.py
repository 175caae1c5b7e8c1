"""Safe VAE Decode / Safe VAE Encode inside a real ComfyUI server (CPU), on a VAE that really
overflows fp16 (its streams scaled up exactly): core's nodes in fp16 give a ruined picture (asserted
first), the safe nodes give the fp32 picture and say they redid the work; the VAE is not changed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from host_models import IMAGE, OVERFLOW
from host_server import images_of, succeeded

pytestmark = pytest.mark.host

IMG = {"class_type": "LoadImage", "inputs": {"image": IMAGE}}


def load(dtype: str) -> dict:
    return {"class_type": "VAEFixLoadVAE", "inputs": {"vae_name": OVERFLOW, "dtype": dtype}}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def core_roundtrip(vae: str) -> dict:
    return {"e": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": [vae, 0]}},
            "d": {"class_type": "VAEDecode", "inputs": {"samples": ["e", 0], "vae": [vae, 0]}},
            "s": {"class_type": "PreviewImage", "inputs": {"images": ["d", 0]}}}


def test_safe_nodes_give_the_fp32_picture_where_core_fp16_is_ruined_and_leave_the_vae_as_it_was(host):
    want = images_of(host, succeeded(host.run({"img": IMG, "v": load("fp32"), **core_roundtrip("v")})), "s")[0]
    prompt = {"img": IMG, "v": load("fp16"), "v32": load("fp32"),
              "se": {"class_type": "VAEFixSafeVAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["v", 0]}},
              "sd": {"class_type": "VAEFixSafeVAEDecode", "inputs": {"samples": ["se", 0], "vae": ["v", 0]}},
              "ss": {"class_type": "PreviewImage", "inputs": {"images": ["sd", 0]}},
              "re": {"class_type": "PreviewAny", "inputs": {"source": ["se", 1]}},
              "rd": {"class_type": "PreviewAny", "inputs": {"source": ["sd", 1]}},
              # after the safe nodes ran on it, core's nodes still see the same fp16 VAE: still ruined
              **core_roundtrip("v"), "e": {"class_type": "VAEEncode", "inputs": {"pixels": ["sd", 0], "vae": ["v", 0]}}}
    out = succeeded(host.run(prompt, timeout=600))
    broken, safe = images_of(host, out, "s")[0], images_of(host, out, "ss")[0]
    assert psnr(broken, want) < 20, "core's fp16 VAE Encode/Decode should be ruined by the overflow"
    assert psnr(safe, want) > 35, "the safe nodes should give the fp32 picture"
    for node in ("re", "rd"):
        report = json.loads(out[node]["text"][0])
        assert report["redone_in_float32"] and report["dtype_used"] == "float32"
        assert report["attempts"][0]["dtype"] == "float16" and report["attempts"][0]["non_finite"] > 0


def test_on_a_vae_that_is_finite_the_safe_decode_is_core_vae_decode_exactly(host):
    prompt = {"img": IMG, "v": load("fp32"), **core_roundtrip("v"),
              "sd": {"class_type": "VAEFixSafeVAEDecode", "inputs": {"samples": ["e", 0], "vae": ["v", 0]}},
              "ss": {"class_type": "PreviewImage", "inputs": {"images": ["sd", 0]}},
              "rd": {"class_type": "PreviewAny", "inputs": {"source": ["sd", 1]}}}
    out = succeeded(host.run(prompt))
    assert np.array_equal(images_of(host, out, "s")[0], images_of(host, out, "ss")[0])
    report = json.loads(out["rd"]["text"][0])
    assert report["dtype_used"] == "float32" and not report["redone_in_float32"] and len(report["attempts"]) == 1

