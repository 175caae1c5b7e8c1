"""Load VAE (strict) for every VAE family the host builds (#12 item 3), inside a real ComfyUI server.

Each family is a random-weight file made by the host's own classes in the layout the host detects
(tests/host_family_vaes.py). Load VAE (strict) loads it, and core VAE Encode/Decode give exactly
what they give through core's Load VAE on the same file; a copy missing one weight, or holding one
tensor more, is refused naming that key (core would only warn); a file no family matches is refused
by name. The padding option switches a KL VAE to reflection padding (EQ-VAE style retrained VAEs).
HunyuanVideo 1.5 and the Hunyuan Image refiner (1.26 B parameters each, a minute each on 2 cores)
join the families with VAEFIX_ALL_FAMILIES=1, as in test_host_families.py.

Needs a ComfyUI checkout (`COMFYUI_PATH`, see tests/conftest.py).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from host_family_vaes import SENTINELS, family_vae
from host_models import CLEAN
from host_prompts import core, encode, load_image, ours, preview_text, save_latent, saved_latent, server_still_serves
from host_server import failed, images_of, succeeded

pytestmark = pytest.mark.host
IMAGE = "gradient64.png"
FAMILIES = ["wan21", "hunyuan_video", "hunyuan_image", "mochi", "ltxv", "svd", "cosmos", "wan22"] + (
    ["hunyuan_video15", "hunyuan_image_refiner"] if os.environ.get("VAEFIX_ALL_FAMILIES") == "1" else [])
NO_DECODE = {"svd", "hunyuan_image_refiner"}  # their decoders take what an image's latent is not: encode only
EXTRA_KEY = "decoder.vae_fix_stray.weight"


def roundtrip(loader: dict, tag: str, decode: bool) -> dict:
    """Loader "1" → VAE Encode of a 64 px image → Save Latent "4" (→ VAE Decode → Save Image "6")."""
    prompt = {"1": loader, "2": load_image(IMAGE), "3": encode(["2", 0], ["1", 0]), "4": save_latent(["3", 0], tag)}
    if decode:
        prompt["5"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}}
        prompt["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": tag}}
    return prompt


def outputs_of(host, loader: dict, tag: str, decode: bool) -> tuple:
    prompt = roundtrip(loader, tag, decode)
    if loader["class_type"] == "VAEFixLoadVAE":
        prompt["9"] = preview_text(["1", 1])
    outputs = succeeded(host.run(prompt, timeout=600))
    picture = images_of(host, outputs, "6")[0] if decode else None
    info = json.loads(outputs["9"]["text"][0]) if "9" in outputs else None
    return saved_latent(host, outputs, "4"), picture, info


@pytest.fixture(scope="module")
def family_file(host):
    """`family_file(family)`: (file name, what was built). Every family's file is built in the
    background, in test order, while the families built before it are tested."""
    pool = ThreadPoolExecutor(1)
    futures = {family: pool.submit(family_vae, host, family) for family in FAMILIES}
    yield lambda family: futures[family].result()
    pool.shutdown(wait=True, cancel_futures=True)


def damaged_copy(host, name: str, family: str) -> tuple[str, str]:
    """(a copy of the file without one of its weights and with one stray tensor, the key removed)."""
    with safe_open(str(host.vae_dir / name), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    weights = sorted(k for k in tensors if k.endswith(".weight") and k not in SENTINELS[family])
    removed = weights[len(weights) // 2]
    tensors[EXTRA_KEY] = torch.ones(3, dtype=torch.float16)
    save_file({k: v for k, v in tensors.items() if k != removed}, str(host.vae_dir / f"damaged_{name}"), metadata)
    return f"damaged_{name}", removed


def refusal(host, name: str, dtype: str = "auto") -> str:
    err = failed(host.run(roundtrip(ours(name, dtype), "refused", decode=False)))
    assert err["node_type"] == "VAEFixLoadVAE" and err["exception_type"].endswith("VAELoadError"), err
    assert name in err["exception_message"], err["exception_message"]  # the file is named
    return err["exception_message"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_strictly_as_core_runs_it_and_a_damaged_copy_is_refused(host, family_file, family):
    name, built = family_file(family)
    decode = family not in NO_DECODE
    latent, picture, info = outputs_of(host, ours(name), f"strict_{family}", decode)
    core_latent, core_picture, _ = outputs_of(host, core(name), f"core_{family}", decode)
    assert info["family"] == family and info["family_name"] == info["comfyui"]["kind"]
    assert info["tensors"] == built["tensors"] and info["latent_channels"] == built["latent_channels"]
    assert latent.shape == core_latent.shape and latent.std() > 0, "an empty latent would match anything"
    assert torch.equal(latent, core_latent)
    if decode:
        assert picture.shape[:2] == (64, 64) and np.array_equal(picture, core_picture)

    damaged, removed = damaged_copy(host, name, family)
    try:  # core would load it with a warning and run with one weight unset
        message = refusal(host, damaged)
    finally:
        (host.vae_dir / damaged).unlink()
    assert "is missing from the file" in message and removed in message
    assert "1 of the file's tensors is not used" in message and EXTRA_KEY in message


def copy_of(host, name: str, new_name: str, change) -> str:
    """A copy of a family file in models/vae with `change(tensors)` applied (it returns the new dict)."""
    with safe_open(str(host.vae_dir / name), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(change(tensors), str(host.vae_dir / new_name), metadata)
    return new_name


def test_a_weight_holding_nan_is_refused_naming_it(host, family_file):
    name, _ = family_file("wan21")

    def poison(tensors):
        tensors["decoder.head.2.weight"] = tensors["decoder.head.2.weight"].clone()
        tensors["decoder.head.2.weight"].view(-1)[7] = float("nan")
        return tensors
    message = refusal(host, copy_of(host, name, "nan_wan21.safetensors", poison))
    assert "decoder.head.2.weight (1 NaN, 0 inf)" in message


def test_a_kl_weight_holding_inf_is_refused_though_only_the_built_model_is_summed(host):
    # the built model is checked (a sum per weight); the file is read only to name what is not finite
    def poison(tensors):
        tensors["encoder.conv_in.weight"] = tensors["encoder.conv_in.weight"].clone()
        tensors["encoder.conv_in.weight"].view(-1)[3] = float("inf")
        return tensors
    message = refusal(host, copy_of(host, CLEAN, "inf_sdxl.safetensors", poison))
    assert "encoder.conv_in.weight (0 NaN, 1 inf)" in message and "inf_sdxl.safetensors" in message


def test_finite_weights_that_overflow_float16_are_refused_in_float16_and_load_in_float32(host):
    def huge(tensors):
        tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"].clone()
        tensors["decoder.conv_out.bias"][1] = 1e6  # finite, beyond float16's 65504
        return tensors
    name = copy_of(host, CLEAN, "huge_sdxl.safetensors", huge)
    message = refusal(host, name, "fp16")
    assert "decoder.conv_out.bias (torch.float16)" in message and "overflow" in message, message
    assert "NaN" not in message.split("expected")[0]  # the file itself is finite: not called damaged
    succeeded(host.run(roundtrip(ours(name, "fp32"), "huge_fp32", decode=False)))


def test_a_weight_of_the_wrong_shape_is_refused_naming_it_and_the_family(host, family_file):
    name, _ = family_file("wan21")
    shrunk = copy_of(host, name, "shape_wan21.safetensors",
                     lambda t: {**t, "decoder.head.2.weight": t["decoder.head.2.weight"][:2].clone()})
    message = refusal(host, shrunk)
    assert "1 tensor has the wrong shape for ComfyUI's Wan 2.1" in message
    assert "decoder.head.2.weight [2, 96, 3, 3, 3] (expected [3, 96, 3, 3, 3])" in message


def test_mochi_decoder_without_its_prefix_is_read_under_the_names_the_host_gives_it(host, family_file):
    """ComfyUI puts 'decoder.' before every key of a Mochi file whose keys lack it: the strict check
    compares under those names, so the decoder's weights count as loaded and only the encoder,
    which the file does not hold, is missing (core would run its encoder on unset weights)."""
    name, _ = family_file("mochi")
    bare = copy_of(host, name, "mochi_bare_decoder.safetensors",
                   lambda t: {k.removeprefix("decoder."): v for k, v in t.items() if k.startswith("decoder.")})
    message = refusal(host, bare)
    assert "missing from the file" in message and "First offending keys: encoder." in message
    assert "not used" not in message


def test_a_file_no_family_matches_is_refused_by_name(host):
    name = "no_family.safetensors"
    save_file({"backbone.stem.weight": torch.ones(8, 3, 3, 3), "head.bias": torch.zeros(8)}, str(host.vae_dir / name))
    message = refusal(host, name)
    assert "no VAE family matches its 2 tensors" in message and "not a KL VAE either" in message
    server_still_serves(host)


def flat_latent_decoded(host, padding: str) -> tuple[np.ndarray, dict]:
    """tiny_sd decodes an all-zero latent (Empty Latent Image): the picture and the loader's info."""
    loader = dict(ours("tiny_sd.safetensors"), inputs={"vae_name": "tiny_sd.safetensors", "dtype": "fp32",
                                                       "padding": padding})
    prompt = {"1": loader, "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"flat_{padding}"}},
              "9": preview_text(["1", 1])}
    outputs = succeeded(host.run(prompt))
    return images_of(host, outputs, "4")[0].astype(int), json.loads(outputs["9"]["text"][0])


def test_reflect_padding_removes_the_border_a_zero_padded_kl_decoder_draws(host):
    """A flat latent has no edges: with reflection padding every convolution sees the same values at
    the border as inside, so the picture is flat; zero padding draws a frame."""
    zeros, zeros_info = flat_latent_decoded(host, "zeros")
    reflect, reflect_info = flat_latent_decoded(host, "reflect")
    assert zeros_info["padding"].startswith("zeros") and reflect_info["padding"].startswith("reflect (")
    assert int(reflect_info["padding"].split("(")[1].split()[0]) > 10  # every 3x3 convolution
    assert np.ptp(reflect, axis=(0, 1)).max() <= 1  # flat, up to 8-bit rounding
    assert np.ptp(zeros, axis=(0, 1)).max() > 5     # a frame


def test_reflect_padding_encodes_as_the_engine_with_padding_reflect(host):
    from vae_fix.images import load_image as read_png
    from vae_fix.loader import load_vae

    loader = {"class_type": "VAEFixLoadVAE", "inputs": {"vae_name": "tiny_sd.safetensors", "dtype": "fp32",
                                                       "padding": "reflect"}}
    latent, _, _ = outputs_of(host, loader, "reflect_tiny", decode=False)
    x = read_png(host.input_dir / IMAGE)
    with torch.no_grad():
        reflect = load_vae(host.vae_dir / "tiny_sd.safetensors", padding="reflect").model.encode(x * 2 - 1)
        zeros = load_vae(host.vae_dir / "tiny_sd.safetensors").model.encode(x * 2 - 1)
    assert (reflect - zeros).abs().max() > 1e-3, "the padding would make no difference to compare"
    assert torch.allclose(latent, reflect, atol=1e-4)


def test_reflect_padding_on_a_video_family_is_refused_naming_the_option(host, family_file):
    name, _ = family_file("wan21")
    loader = {"class_type": "VAEFixLoadVAE", "inputs": {"vae_name": name, "dtype": "auto", "padding": "reflect"}}
    err = failed(host.run(roundtrip(loader, "wan_reflect", decode=False)))
    assert err["exception_type"].endswith("InputError") and "padding" in err["exception_message"]
    assert "Wan 2.1" in err["exception_message"]
