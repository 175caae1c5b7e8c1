"""VAE Health Check inside a real ComfyUI server (CPU): the example workflow's API twin on a VAE
with a hole at a fixed cell (a black hole on every probe), on a smooth VAE (none), and on a VAE
whose hole follows a painted marker no probe carries (none either: a black hole is the VAE's, not
one image's). Uses the session server of tests/conftest.py."""
from __future__ import annotations

import json

import pytest

from host_models import CORNER
from host_server import api_workflow, failed, images_of, node_of, succeeded

pytestmark = pytest.mark.host
HEALTH = "VAE Health Check"
PROBES = 20  # 10 probe images at 128 and 256 px


def health(host, vae_name: str, report: bool = True) -> tuple[dict, dict]:
    prompt = api_workflow(HEALTH)
    node_of(prompt, "VAEFixLoadVAE")["inputs"]["vae_name"] = vae_name
    if report:
        prompt["report"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}
    return prompt, succeeded(host.run(prompt))


def test_a_hole_on_every_image_is_a_black_hole_in_every_probe(host):
    prompt, outputs = health(host, CORNER)
    line = outputs["3"]["text"][0]
    assert line.startswith(f"black hole at (0, 0) in {PROBES}/{PROBES} probes"), line
    report = json.loads(outputs["report"]["text"][0])
    verdict = report["verdict"]
    assert report["schema"] == 2 and verdict["black_hole"] is True and verdict["line"] == line
    top = verdict["cells"][0]
    assert (top["y"], top["x"], top["images"], top["of"]) == (0, 0, PROBES, PROBES) and top["logvar_raw_min"] < -40
    assert len(verdict["cells"]) == 1, "only the planted cell collapses"
    assert verdict["reach"]["reach_ratio"] > 0 and verdict["reach"]["y"] == 0
    picture = images_of(host, outputs, "2")[0]  # the node's own preview: every probe, the verdict on top
    assert picture.shape[1] > 1000 and picture.shape[0] > 256 and picture.std() > 10


def test_a_smooth_vae_has_no_black_hole(host):
    _, outputs = health(host, "smooth_sd.safetensors")
    report = json.loads(outputs["report"]["text"][0])
    assert outputs["3"]["text"][0].startswith(f"no black hole found ({PROBES} images")
    assert report["verdict"]["cells"] == [] and all(e["anomaly_count"] == 0 for e in report["images"])
    assert sum(e["content_outliers"]["count"] for e in report["images"]) > 0, \
        "the lone square's large means are reported as content, not as anomalies"


def test_full_sd_vae_runs_the_probes_under_model_management(host):
    """The published SD layout (fp16 file): 20 encodes at 128 and 256 px through the host's model."""
    _, outputs = health(host, "full_sd.safetensors", report=False)
    line = outputs["3"]["text"][0]
    assert "black hole at" not in line or "varying" in line, line  # its hole needs the marker
    assert "Requested to load" in host.log() or "loaded completely" in host.log()


def test_a_vae_without_a_posterior_is_refused_by_name(host):
    prompt = api_workflow(HEALTH)
    prompt["1"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
    err = failed(host.run(prompt))
    assert err["node_type"] == "VAEFixHealthCheck" and "TAESD" in err["exception_message"]
