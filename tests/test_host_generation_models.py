"""The pack's VAE under the host's model management (issue 16, item 4), seen from outside.

`comfy.model_management.load_models_gpu` logs "Requested to load <class>" exactly when it adds a
model to `current_loaded_models` (a model already there is only marked in use). In these graphs
the only AutoencoderKL ever placed is the one Load VAE (strict) built (the checkpoint's own VAE is
never used), so the server log of each run says whether the host had to (re)load the pack's VAE.
Only the strict loader builds VAEs; every other node runs the host VAE it is given (nodes/host.py).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from host_checkpoints import cpu_sized, generation_models, node
from host_server import api_workflow, id_of, images_of, succeeded

pytestmark = pytest.mark.host
LOADED = "Requested to load AutoencoderKL"


def decoded(host, latent_node: dict | None) -> tuple[np.ndarray, str]:
    """(picture, log of the run) of the swap workflow decoding the sampler's latent through
    `latent_node` (an identity on it: a new node makes VAE Decode run again with the cached VAE)."""
    prompt = cpu_sized(api_workflow("SD1.5 text to image with a swapped VAE"))
    del prompt[id_of(prompt, "PreviewAny")]
    if latent_node is not None:
        prompt["via"] = latent_node
        prompt[id_of(prompt, "VAEDecode")]["inputs"]["samples"] = ["via", 0]
    start = len(host.log())
    outputs = succeeded(host.run(prompt, timeout=600))
    time.sleep(0.5)  # the log is a file the server appends to
    return images_of(host, outputs, id_of(prompt, "SaveImage"))[0], host.log()[start:]


def free(host, **flags) -> None:
    status, _ = host.post_json("/free", flags)
    assert status == 200
    time.sleep(1.5)  # the prompt worker wakes on the flag and unloads before it takes the next prompt


def test_strict_vae_is_loaded_freed_and_reloaded_by_the_host(host):
    generation_models(host, "sd15")
    free(host, unload_models=True)  # whatever earlier tests left loaded
    first, log = decoded(host, node("LatentMultiply", samples=["3", 0], multiplier=1.0))
    assert LOADED in log, "the pack's VAE was not placed by comfy.model_management"
    again, log = decoded(host, node("LatentFromBatch", samples=["3", 0], batch_index=0, length=1))
    assert LOADED not in log and np.array_equal(first, again), "a loaded VAE was loaded a second time"
    free(host, unload_models=True)  # the same (cached) VAE object is unloaded by the host ...
    reloaded, log = decoded(host, node("RepeatLatentBatch", samples=["3", 0], amount=1))
    assert LOADED in log and np.array_equal(first, reloaded)  # ... and placed again when used
    free(host, unload_models=True, free_memory=True)  # also drops the cache: the loader runs again
    rebuilt, log = decoded(host, None)
    assert "got prompt" in log and LOADED in log and np.array_equal(first, rebuilt)
