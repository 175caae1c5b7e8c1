"""Hostile VAE files, one per class the loader once got wrong (issue 13), written into a folder:
the host suite puts them in models/vae and loads each with Load VAE (strict)."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import torch

from vae_files import random_compvis, write_state_dict

SENTINEL = "pickle_ran.txt"  # a pickle that runs code would create this file


def _safetensors(path: Path, header_text: str, data: bytes = b"") -> None:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _zero_size_tensors(names) -> str:
    return json.dumps({n: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for n in names})


class _RunsCode:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "a pickle ran code"))


def write_hostile_vaes(folder: Path) -> dict[str, str]:
    """{file name: a word the refusal must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    _safetensors(folder / "hostile_deep_header.safetensors", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _safetensors(folder / "hostile_infinite_offsets.safetensors",
                 '{"encoder.conv_in.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}')
    _safetensors(folder / "hostile_many_tensors.safetensors", _zero_size_tensors(f"encoder.down.{i}" for i in range(20_001)))
    _safetensors(folder / "hostile_many_blocks.safetensors",
                 _zero_size_tensors(f"encoder.down.0.block.{i}.conv1.weight" for i in range(5_000)))
    sd = random_compvis("sd")
    key = next(k for k in sd if k.startswith("decoder.up.0.block.0.conv1"))
    renamed = dict(sd)
    renamed[key.replace("conv1", "time_stack.0")] = renamed.pop(key)
    write_state_dict(renamed, folder / "hostile_time_stack.safetensors", "safetensors")
    torch.save({**sd, "encoder.conv_in.bias": torch.zeros(1).expand(10 ** 9)}, folder / "hostile_stride0.pt")
    torch.save({**sd, "encoder.conv_in.bias": torch.zeros(4, 4).to_sparse()}, folder / "hostile_sparse.pt")
    with open(folder / "hostile_pickle.ckpt", "wb") as f:
        pickle.dump({"state_dict": _RunsCode(folder.parent / SENTINEL)}, f)
    return {"hostile_deep_header.safetensors": "header", "hostile_infinite_offsets.safetensors": "Infinity",
            "hostile_many_tensors.safetensors": "20001", "hostile_many_blocks.safetensors": "missing",
            "hostile_time_stack.safetensors": "missing", "hostile_stride0.pt": "not plain dense",
            "hostile_sparse.pt": "not plain dense", "hostile_pickle.ckpt": "pickle"}
