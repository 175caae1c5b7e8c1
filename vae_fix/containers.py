"""The files a VAE comes in, read safely and written atomically; what the tensors mean is `loader`'s job.

Reads `.safetensors`/`.sft` (metadata returned), diffusers folders (`config.json` +
`diffusion_pytorch_model.safetensors` or `.bin`, also a pipeline folder's `vae/`) and
`.ckpt/.pt/.pth/.bin` only through `torch.load(weights_only=True)`, so a pickle that would run
code is refused and nothing in it runs. Every damage (empty, truncated, corrupt, not a weights
file) is a VAELoadError naming the file.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import VAELoadError
from .layouts import VAE_ROOTS

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
EXPECTED_INPUT = ("a .safetensors file, a .ckpt/.pt/.pth/.bin weights file, or a diffusers folder "
                  "(config.json + diffusion_pytorch_model.safetensors)")
MAX_HEADER = 16_000_000  # bytes of JSON header: a full SDXL checkpoint needs ~0.3 MB (the format allows 100 MB)
MAX_TENSORS = 20_000     # a full SD3 checkpoint with its text encoders holds ~3,000
MAX_METADATA = 1_000     # __metadata__ entries
MAX_CONFIG = 1_000_000   # bytes of a diffusers config.json (diffusers writes ~1 KB)
MAX_CONFIG_DEPTH = 8     # nesting of a config.json or its metadata copy (diffusers': 2)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
                torch.uint32, torch.uint64}  # DTYPE_BYTES's: what a torch file may hold too


@dataclass
class RawWeights:
    """What a container held, before any check of the names or shapes."""
    tensors: dict
    weights_path: Path
    container: str                   # "safetensors" | "diffusers-folder" | "torch-weights-only"
    metadata: dict = field(default_factory=dict)
    config_json: dict | None = None  # a diffusers folder's config.json
    notes: list = field(default_factory=list)


def read_container(path: Path) -> RawWeights:
    """The tensors of a file or diffusers folder (on the CPU, as stored)."""
    if not path.exists():
        raise VAELoadError(path, "no such file or folder", EXPECTED_INPUT)
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise VAELoadError(path, f"unknown file type '{suffix or '(no extension)'}'", EXPECTED_INPUT)


def write_safetensors(tensors: dict, path: Path, metadata: dict) -> Path:
    """Write next to the target and rename, so an interrupted save never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _check_size(path: Path) -> int:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise VAELoadError(path, f"cannot read it ({e.strerror})", EXPECTED_INPUT) from None
    if size == 0:
        raise VAELoadError(path, "the file is empty (0 bytes)", "a complete weights file (the download or copy may have failed)")
    return size


def safetensors_header(path: Path, expected: str) -> dict:
    """The checked JSON header of a safetensors file (`check_header`): bounded and coherent before
    any tensor is read. VAELoadError naming the file otherwise."""
    size = _check_size(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise VAELoadError(path, f"not a valid safetensors file: it is {size} bytes but its first 8 bytes give a "
                               f"header length of {n} bytes (truncated, or not a safetensors file; at most "
                               f"{MAX_HEADER} read)", expected)
        header = _parse_header(path, f.read(n), expected)
    data = size - 8 - n
    ends = check_header(header, data, path, expected)
    if ends != data:
        raise VAELoadError(path, f"truncated or padded: its header describes {8 + n + ends} bytes but the file has {size}",
                           expected)
    return header


def _read_safetensors(path: Path) -> RawWeights:
    expected = "a complete .safetensors file (8-byte header length, JSON header, tensor data)"
    safetensors_header(path, expected)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise VAELoadError(path, f"corrupt safetensors file ({type(e).__name__}: {str(e)[:200]})", expected) from None
    return RawWeights(tensors, path, "safetensors", metadata)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_header(path: Path, raw: bytes, expected: str) -> dict:
    """The JSON header as a dict; NaN/Infinity and nesting deeper than JSON parsers survive are refused."""
    try:
        header = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise VAELoadError(path, "corrupt safetensors header (nested too deeply)", expected) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise VAELoadError(path, f"corrupt safetensors header ({type(e).__name__}: {str(e)[:200]})", expected) from None
    if not isinstance(header, dict):
        raise VAELoadError(path, f"corrupt safetensors header (a JSON {type(header).__name__}, not an object)", expected)
    return header


def check_header(header: dict, data: int, path, expected: str) -> int:
    """Every entry well-formed (dtype, shape, offsets that fit `data` bytes and agree with the shape),
    counts bounded, tensors packed one after another as the format requires (none overlapping
    another, no gaps), before any tensor is touched. Returns the end of the last tensor."""
    def bad(why: str):
        return VAELoadError(path, f"corrupt safetensors header ({why})", expected)

    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or len(meta) > MAX_METADATA or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad(f"__metadata__ must map at most {MAX_METADATA} strings to strings")
    if len(header) - ("__metadata__" in header) > MAX_TENSORS:
        raise bad(f"{len(header)} entries, more than the {MAX_TENSORS} any VAE or checkpoint holds")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shown = name[:80]
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPE_BYTES:
            raise bad(f"tensor '{shown}' has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_whole(d) for d in shape)):
            raise bad(f"tensor '{shown}' has an invalid shape")
        if math.prod(d or 1 for d in shape) >= 2 ** 63:  # even with a zero in it: torch's sizes are int64
            raise bad(f"tensor '{shown}' has a shape no tensor can have ({str(shape)[:60]})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"tensor '{shown}' has invalid data offsets {str(offsets)[:60]}")
        if offsets[1] > data:
            raise VAELoadError(path, f"truncated: its header describes tensor '{shown}' ending at data byte "
                               f"{offsets[1]} but the file holds {data} data bytes", expected)
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_BYTES[entry["dtype"]] != offsets[1] - offsets[0]:
            raise bad(f"tensor '{shown}' of shape {shape[:8]} does not fill its {offsets[1] - offsets[0]} bytes")
        spans.append((offsets[0], offsets[1], shown))
    end = 0
    for begin, stop, shown in sorted(spans):
        if begin != end:
            raise bad(f"tensor '{shown}' starts at data byte {begin}, where the previous one ends at {end} "
                      "(tensors overlap or leave a gap)")
        end = stop
    return end


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read_torch(path: Path) -> RawWeights:
    _check_size(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the outcome is reported below
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VAELoadError(path, _refusal(str(e)), "a plain weights file (tensors in dicts), or a .safetensors file") from None
    except Exception as e:  # zip, pickle and storage errors all mean the same thing here
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise VAELoadError(path, f"not a readable PyTorch weights file, truncated or corrupt ({detail})",
                           "a complete .ckpt/.pt/.pth/.bin saved by torch.save") from None
    notes = []
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        others = sorted(str(k) for k in obj if k != "state_dict")
        notes.append("weights were wrapped in 'state_dict'" + (f" (also held: {', '.join(others[:5])})" if others else ""))
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise VAELoadError(path, f"it holds a {type(obj).__name__}, not a dict of tensors", "a state dict (name → tensor)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if odd := [k for k, v in tensors.items() if _not_plain(v)]:
        raise VAELoadError(path, f"{len(odd)} tensors are not plain dense tensors (sparse, nested, on the meta device, "
                           "or views that repeat a smaller storage, which would grow when read)",
                           "dense tensors each with its own data, as torch.save writes a state dict", odd[:8])
    if odd := [f"{k} ({v.dtype})" for k, v in tensors.items() if v.dtype not in TORCH_DTYPES]:
        raise VAELoadError(path, f"{len(odd)} tensors have a dtype no weights file uses (complex, packed sub-byte or "
                           "exotic float8 types)", "float32, float16 or bfloat16 weights", odd[:8])
    skipped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad := [k for k in skipped if k.startswith(VAE_ROOTS)]:
        raise VAELoadError(path, "some VAE entries are not tensors", "a tensor for every weight", bad)
    if skipped:
        notes.append(f"skipped {len(skipped)} non-tensor entries ({', '.join(skipped[:5])})")
    return RawWeights(tensors, path, "torch-weights-only", notes=notes)


def _not_plain(v: torch.Tensor) -> bool:
    """Sparse, nested, meta, or a view (stride 0, overlapping) whose storage is smaller than its elements."""
    if v.is_nested or v.layout != torch.strided or v.device.type != "cpu" or v.is_quantized:
        return True
    try:
        return v.numel() > 0 and v.untyped_storage().nbytes() < v.numel() * v.element_size()
    except RuntimeError:
        return True


def _refusal(message: str) -> str:
    """Why torch's weights-only unpickler said no, in the user's terms."""
    wanted = re.search(r"GLOBAL ([\w.]+)", message)
    if wanted:
        return (f"refused: unpickling it would call or build '{wanted.group(1)}', which a weights-only load never "
                "allows (a weights file does not need it; nothing in the file was run)")
    opcode = re.search(r"[Uu]nsupported operand (\d+)", message)
    step = f" (pickle opcode {opcode.group(1)})" if opcode else ""
    return (f"refused: the weights-only unpickler cannot read it{step}; it is corrupt, not a PyTorch file, or a "
            "pickle that builds arbitrary objects (nothing in the file was run)")


def _read_folder(path: Path) -> RawWeights:
    folder, notes = path, []
    if not (folder / "config.json").is_file():
        if not (path / "vae" / "config.json").is_file():
            raise VAELoadError(path, "a folder without config.json (and without vae/config.json)",
                               "a diffusers model folder (config.json + diffusion_pytorch_model.safetensors) "
                               "or a pipeline folder with a vae/ subfolder")
        folder = path / "vae"
        notes.append("read the vae/ subfolder of a pipeline folder")
    config_json = _read_config(folder / "config.json")
    variants = sorted(folder.glob("diffusion_pytorch_model.*.safetensors")) + sorted(folder.glob("diffusion_pytorch_model.*.bin"))
    weights = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()] + variants
    if not weights:
        raise VAELoadError(folder, "no weights file next to config.json", f"{WEIGHT_NAMES[0]} (or {WEIGHT_NAMES[1]})")
    if weights[0].name not in WEIGHT_NAMES:
        notes.append(f"read the variant weights file {weights[0].name}")
    raw = _read_safetensors(weights[0]) if weights[0].suffix == ".safetensors" else _read_torch(weights[0])
    return replace(raw, container="diffusers-folder", config_json=config_json, notes=notes + raw.notes)


def _read_config(path: Path) -> dict:
    """A diffusers config.json: a JSON object, bounded in size and depth (diffusers writes ~1 KB, 2 deep)."""
    expected = "a diffusers config.json (a JSON object)"
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG:
            raise ValueError(f"{size} bytes, more than the {MAX_CONFIG} read")
        config = json.loads(path.read_text(), parse_constant=_no_constant)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except RecursionError:
        config = None
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise VAELoadError(path, f"not a valid config file ({str(e)[:200]})", expected) from None
    if config is None or json_depth(config) > MAX_CONFIG_DEPTH:
        raise VAELoadError(path, "not a valid config file (nested too deeply)", expected)
    return config


def json_depth(value) -> int:
    """How deeply a parsed JSON value nests (1 for a number), counted without recursion."""
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
    return depth
