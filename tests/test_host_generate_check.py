"""The "Generate, check, repair, decode" SD1.5 workflow (issue 16) in a real ComfyUI server, CPU-sized
(64 px, 4 steps; the file unchanged): it samples, decodes with the strict-loaded VAE, gives the VAE's
verdict on the probes, inspects the generated image, repairs the sampled latent and decodes again."""
from __future__ import annotations

import json

import numpy as np
import pytest

from host_checkpoints import cpu_sized, generation_models
from host_prompts import write_thumbnail
from host_server import api_workflow, images_of, node_of, succeeded

pytestmark = pytest.mark.host
NAME = "SD1.5 generate, check, repair, decode"
VERDICT_STARTS = ("no black hole found", "black hole", "log-variance collapse")


def test_generate_check_repair_decode_runs_and_repairs_only_what_the_verdict_flags(host):
    models = generation_models(host, "sd15")
    prompt = cpu_sized(api_workflow(NAME))
    assert node_of(prompt, "CheckpointLoaderSimple")["inputs"]["ckpt_name"] == models["checkpoint"]
    assert node_of(prompt, "VAEFixLoadVAE")["inputs"]["vae_name"] == models["vae"]
    prompt["repair_report"] = {"class_type": "PreviewAny", "inputs": {"source": ["11", 2]}}
    outputs = succeeded(host.run(prompt, timeout=600))
    verdict, summary = outputs["16"]["text"][0], outputs["10"]["text"][0]
    assert verdict.startswith(VERDICT_STARTS) and ("probe" in verdict or "images" in verdict), verdict
    assert summary.startswith("Verdict: ") and summary.splitlines()[0][9:].startswith(VERDICT_STARTS)
    before, after = images_of(host, outputs, "8")[0], images_of(host, outputs, "13")[0]
    assert before.shape == after.shape == (64, 64, 3) and before.std() > 1
    report = json.loads(outputs["repair_report"]["text"][0])
    repaired = sum(image["repaired_cells"] for image in report["images"])
    assert (repaired == 0) == np.array_equal(before, after), "pixels change exactly when cells are repaired"
    panel = images_of(host, outputs, "14")[0]
    assert panel.shape[1] > 2 * 64
    write_thumbnail(NAME, panel)
