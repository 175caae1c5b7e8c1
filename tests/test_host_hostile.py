"""Hostile VAE files inside a real ComfyUI server: each class the loader once got wrong (deep or
infinite JSON, tens of thousands of tensors, stride-0 and sparse .pt tensors, a stray temporal key,
a pickle that runs code) comes back from Load VAE (strict) as a short node error naming the file,
quickly; no pickle runs, no file changes, and the server serves the next prompt."""
from __future__ import annotations

import hashlib
import time

import pytest

from host_prompts import encode_decode, ours, server_still_serves
from host_server import failed
from hostile_inputs import SENTINEL, write_hostile_vaes

pytestmark = pytest.mark.host
NAMES = ["hostile_deep_header.safetensors", "hostile_infinite_offsets.safetensors", "hostile_many_tensors.safetensors",
         "hostile_many_blocks.safetensors", "hostile_time_stack.safetensors", "hostile_stride0.pt", "hostile_sparse.pt",
         "hostile_pickle.ckpt"]


@pytest.mark.parametrize("name", NAMES)
def test_a_hostile_vae_file_is_a_short_node_error_and_the_server_goes_on(host, name, tmp_path):
    expected = write_hostile_vaes(tmp_path)  # the same files, to learn what each refusal must say
    path = host.vae_dir / name
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    start = time.monotonic()
    err = failed(host.run(encode_decode(ours(name), "gradient.png")))
    elapsed = time.monotonic() - start
    message = err["exception_message"]
    assert err["node_type"] == "VAEFixLoadVAE" and err["exception_type"].endswith("VAELoadError")
    assert name in message and expected[name] in message and len(message) < 1024, message
    assert elapsed < 10, f"refusing {name} took {elapsed:.1f} s"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not (host.vae_dir.parent / SENTINEL).exists() and not (host.base / SENTINEL).exists()
    server_still_serves(host)
