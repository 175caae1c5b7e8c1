"""Every VAE family the host builds, through every pack node with its default settings (#12).

Each family is a random-weight file made by the host's own classes in the layout the host detects
(tests/host_family_vaes.py), loaded by core Load VAE; the image is a 64 px photo. Every pack node
that takes a VAE, an image or a latent runs in its own prompt with the widgets at their defaults
(read from the server's /object_info, as the frontend does), so one node's failure names that node.

CPU time (2 cores, idle machine): every node with its defaults takes 16 s (SVD) to 3 min (Mochi)
per full-size family and 3.6 min on the two 1.26 B-parameter ones (HunyuanVideo 1.5, the Hunyuan
Image refiner), whose Health Check alone takes 50-114 s. CI (which must stay under 30 min) runs
every node on four families (Wan 2.1, Hunyuan Image 2.1, LTXV, SVD) and the fast nodes on those two
and on the three next heaviest in CI (Mochi 182 s, HunyuanVideo 1.0 99 s, Wan 2.2 90 s);
VAEFIX_ALL_FAMILIES=1 runs every node on all nine (11.8 min).
"""
from __future__ import annotations

import json
import os
import time

import pytest

from host_family_vaes import family_vae
from host_prompts import core, load_image, save_latent, saved_latent
from host_server import failed, succeeded

pytestmark = pytest.mark.host
PHOTO = "family_photo_64.png"
GAUSSIAN = ["wan21", "hunyuan_video", "hunyuan_image", "mochi", "ltxv", "wan22", "hunyuan_video15",
            "hunyuan_image_refiner", "svd"]
NO_DECODER = {"svd", "hunyuan_image_refiner"}   # their decoders take what an image latent is not
FP16_FIX = "VAEFixFp16Fix"
# the fp16 fix covers these video families, on the host's model: with its defaults (20 probes up to 256 px, a
# 512 px check) that takes far too long on a CPU, so test_host_fp16 runs it on Wan 2.1 with 64 px probes
FP16_COVERED = {"wan21", "wan22", "hunyuan_video"}
FILE_NODES = {"VAEFixLoadVAE", "VAEFixConvertVAE"}  # take a file, not a VAE: tested with the loader
FAMILY_NAMES = {"wan21": "Wan 2.1 / Qwen-Image (16 channels)", "hunyuan_video": "HunyuanVideo 1.0 (3-D KL)",
                "mochi": "Mochi (12 channels)", "ltxv": "LTXV (128 channels, 32x)"}
SLOW = {"VAEFixHealthCheck", "VAEFixLatentCellReach", "VAEFixLatentReachMap", "VAEFixRepairLatent", "VAEFixCompareVAEs"}
HEAVIEST = {"hunyuan_video15", "hunyuan_image_refiner",  # 1.26 B parameters each
            "mochi", "hunyuan_video", "wan22"}         # the slowest of the others with every node (CI time)
EVERY_NODE = set(GAUSSIAN) if os.environ.get("VAEFIX_ALL_FAMILIES") == "1" else set(GAUSSIAN) - HEAVIEST
NEEDS_DECODER = {"VAEFixLatentReachMap", "VAEFixLatentCellReach", "VAEFixRepairLatent", "VAEFixCompareVAEs"}
# (Safe VAE Decode runs the host's own decode, which takes each family's own latents)


@pytest.fixture(scope="module")
def photo(host) -> str:
    from vae_fix.images import save_png
    from vae_fix.probes import photo as probe_photo
    save_png(probe_photo("coffee", 64)[0], host.input_dir / PHOTO)
    return PHOTO


@pytest.fixture(scope="module")
def object_info(host) -> dict:
    return host.get_json("/object_info")


def pack_nodes(info: dict, family: str) -> list[str]:
    every = sorted(k for k in info if k.startswith("VAEFix") and k not in FILE_NODES
                   and not (k == FP16_FIX and family in FP16_COVERED))
    return every if family in EVERY_NODE else [k for k in every if k not in SLOW]


def with_defaults(info: dict, class_type: str, links: dict) -> dict:
    """`class_type` with every required input linked by its type (VAE, IMAGE, LATENT) or at its default."""
    inputs = {}
    for name, spec in info[class_type]["input"]["required"].items():
        kind = spec[0]
        if isinstance(kind, str) and kind in links:
            inputs[name] = links[kind]
        elif isinstance(kind, list):
            inputs[name] = spec[1].get("default", kind[0]) if len(spec) > 1 else kind[0]
        else:
            inputs[name] = spec[1]["default"]
    return {"class_type": class_type, "inputs": inputs}


def node_prompt(info: dict, class_type: str, vae_name: str, image: str) -> dict:
    prompt = {"1": core(vae_name), "2": load_image(image),
              "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}}}
    prompt["4"] = with_defaults(info, class_type, {"VAE": ["1", 0], "IMAGE": ["2", 0], "LATENT": ["3", 0]})
    if not info[class_type].get("output_node"):
        prompt["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}
    return prompt


def expected_refusal(family: str, class_type: str) -> str | None:
    """What a node must say when it cannot work on this family (None: it must work)."""
    if class_type == FP16_FIX:  # the families it does not cover, refused saying why
        return "a VAE this fix covers"
    if family in NO_DECODER and class_type in NEEDS_DECODER:
        return "does not decode image latents here"
    return None


@pytest.mark.parametrize("family", GAUSSIAN)
def test_every_pack_node_runs_on_the_family_with_its_defaults(host, photo, object_info, family):
    name, built = family_vae(host, family)
    results, seconds = {}, {}
    for class_type in pack_nodes(object_info, family):
        start = time.monotonic()
        entry = host.run(node_prompt(object_info, class_type, name, photo), timeout=600)
        seconds[class_type] = round(time.monotonic() - start, 1)
        refusal = expected_refusal(family, class_type)
        if refusal is None:
            results[class_type] = "ok" if entry["status"]["status_str"] == "success" else failed(entry)["exception_message"][:300]
        else:
            err = failed(entry)["exception_message"]
            results[class_type] = "refused" if refusal in err else f"wrong refusal: {err[:300]}"
    print(f"{family}: seconds per node {seconds}")
    bad = {k: v for k, v in results.items() if v not in ("ok", "refused")}
    assert not bad, f"{family} ({built['model']}): {json.dumps(bad, indent=1)}"


@pytest.mark.parametrize("family", ["cosmos"])
def test_a_deterministic_family_is_refused_by_name_where_a_posterior_is_needed(host, photo, object_info, family):
    name, _ = family_vae(host, family)
    for class_type in ("VAEFixInspectVAE", "VAEFixLogVarianceMap", "VAEFixHealthCheck"):
        err = failed(host.run(node_prompt(object_info, class_type, name, photo)))
        assert "Cosmos" in err["exception_message"] and "no posterior variance" in err["exception_message"], err
    for class_type in ("VAEFixLatentStatistics", "VAEFixLatentChannelEdit", "VAEFixLatentPreviewRGB"):
        succeeded(host.run(node_prompt(object_info, class_type, name, photo)))  # its latents are latents


def clip_prompt(info: dict, vae_name: str, frames: list[str]) -> dict:
    """Core Load VAE "1"; the frames chained by Image Batch into one IMAGE "b<n>"; core VAE Encode →
    Save Latent "s"; Inspect VAE (defaults: a batch is one clip) → its report in PreviewAny "p"."""
    prompt = {"1": core(vae_name), **{f"f{i}": load_image(f) for i, f in enumerate(frames)}}
    batch = "f0"
    for i in range(1, len(frames)):
        prompt[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": [batch, 0], "image2": [f"f{i}", 0]}}
        batch = f"b{i}"
    prompt["e"] = {"class_type": "VAEEncode", "inputs": {"pixels": [batch, 0], "vae": ["1", 0]}}
    prompt["s"] = save_latent(["e", 0], "clip")
    prompt["i"] = with_defaults(info, "VAEFixInspectVAE", {"VAE": ["1", 0], "IMAGE": [batch, 0]})
    prompt["p"] = {"class_type": "PreviewAny", "inputs": {"source": ["i", 2]}}
    return prompt


@pytest.mark.parametrize("family,n_frames,covered", [
    ("wan21", 6, [[0, 0], [1, 4]]),           # 1 + 4k frames: the sixth is not encoded
    ("hunyuan_video", 5, [[0, 0], [1, 4]]),
    ("mochi", 7, [[0, 0], [1, 6]]),
    ("ltxv", 9, [[0, 0], [1, 8]])])
def test_a_batch_of_frames_is_one_clip_whose_means_are_the_hosts_latents(host, object_info, family, n_frames, covered):
    from vae_fix.images import save_png
    from vae_fix.probes import photo as probe_photo
    name, built = family_vae(host, family)
    pan = probe_photo("chelsea", 64 + 4 * n_frames)[0]
    frames = []
    for t in range(n_frames):  # a photo panning right, 4 px a frame
        frames.append(f"clip_{t}.png")
        save_png(pan[:, :64, 4 * t:4 * t + 64], host.input_dir / frames[-1])
    outputs = succeeded(host.run(clip_prompt(object_info, name, frames), timeout=600))
    report = json.loads(outputs["p"]["text"][0])
    clip = report["settings"]["clip"]
    assert [f["input_frames"] for f in clip["latent_frames"]] == covered and clip["frames"] == n_frames
    assert clip["not_encoded"] == list(range(covered[-1][1] + 1, n_frames))
    latents = saved_latent(host, outputs, "s").float()   # core VAE Encode: [1, C, T, h, w]
    assert latents.shape[2] == len(covered) == len(report["images"])
    for t, entry in enumerate(report["images"]):          # the hooked means are the host's own latents
        mu = latents[0, :, t]
        assert entry["path"].startswith(f"latent frame {t} ")
        assert abs(entry["mean"]["min"] - float(mu.min())) < 1e-3 and abs(entry["mean"]["max"] - float(mu.max())) < 1e-3
        assert abs(entry["mean"]["mean"] - float(mu.mean())) < 1e-4
    assert report["vae"]["kind"] == FAMILY_NAMES[family]
