"""Hostile or half-broken VAE files that an earlier fuzzing run got past the clear error: each is now
refused by name, quickly, with nothing allocated beyond the file's own size."""
import json

import pytest
import torch

from vae_fix.errors import VAEFixError
from vae_fix.loader import read_vae
from vae_files import random_compvis, write_state_dict, write_vae


def test_a_stray_time_stack_key_is_damage_not_an_svd_decoder(tmp_path):
    sd = random_compvis("sd")
    key = next(k for k in sd if k.startswith("decoder.up.0.block.0.conv1"))
    sd[key.replace("conv1", "time_stack.0")] = sd.pop(key)
    with pytest.raises(VAEFixError) as e:
        read_vae(write_state_dict(sd, tmp_path / "renamed.safetensors", "safetensors"))
    assert "renamed.safetensors" in str(e.value) and "temporal" not in str(e.value)


def test_a_class_name_that_is_not_a_string_is_refused(tmp_path):
    folder = write_vae(tmp_path, "sd", layout="diffusers", container="folder", name="listed")
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = ["AutoencoderKL"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VAEFixError, match="not a KL autoencoder"):
        read_vae(folder)


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(1).expand(10 ** 9),                    # 4 bytes of data, 4 GB when read
    lambda: torch.zeros(4, 4).to_sparse(),
], ids=["stride-0-view", "sparse"])
def test_pt_tensors_that_are_not_plain_are_refused_before_anything_grows(tmp_path, make):
    sd = random_compvis("sd")
    sd["encoder.conv_in.bias"] = make()
    path = tmp_path / "odd.pt"
    torch.save(sd, path)
    assert path.stat().st_size < 50_000_000
    with pytest.raises(VAEFixError, match="not plain dense tensors") as e:
        read_vae(path)
    assert "odd.pt" in str(e.value) and "encoder.conv_in.bias" in str(e.value)


def test_a_deeply_nested_config_json_is_refused(tmp_path):
    folder = write_vae(tmp_path, "sd", layout="diffusers", container="folder", name="deep")
    (folder / "config.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(VAEFixError, match="nested too deeply"):
        read_vae(folder)


def _rewrite_offsets(path, move):
    """The safetensors file at `path` with `move(name, [begin, end])` applied to every tensor's offsets."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = move(name, entry["data_offsets"])
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: the data stays put
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])


@pytest.mark.parametrize("kind", ["overlap", "gap"])
def test_tensors_that_overlap_or_leave_gaps_are_refused(tmp_path, kind):
    """Two weights in one stretch of bytes (or bytes that belong to none) is not a file safetensors
    writes: refused from the header, naming the tensor, before any data is read."""
    path = write_state_dict(random_compvis("sd"), tmp_path / f"{kind}.safetensors", "safetensors")
    first = "decoder.conv_in.bias"

    def move(name, offsets):
        if name != first:
            return offsets
        size = offsets[1] - offsets[0]
        return [0, size] if kind == "overlap" and offsets[0] else [offsets[0] + 1, offsets[1] + 1]
    _rewrite_offsets(path, move)
    with pytest.raises(VAEFixError, match="overlap or leave a gap") as e:
        read_vae(path)
    assert f"{kind}.safetensors" in str(e.value)
