"""Mutated latent files (ComfyUI .latent with and without its version key, `samples`, `mean`,
`latent`, a lone tensor; float32/16, bfloat16) through read_latent: each is refused with InputError
naming the file, or read as a float32 `[B, C, h, w]` (or video `[B, C, T, h, w]`) latent with no empty dimension, at most
MAX_LATENT_CHANNELS channels and only finite values (unless non-finite ones were allowed). Nothing
else comes out, no case hangs, the file is unchanged. 4,000 seeded mutations of the header (bytes,
length, fields, dtypes and shapes that still fit the data, names, metadata, numbers JSON forbids,
nesting) and of the data, plus regression cases."""
import json
import math
import random
import resource

import pytest
import torch
from safetensors.torch import save

from vae_fix.edit import MAX_LATENT_CHANNELS
from vae_fix.errors import InputError, VAELoadError
from vae_fix.latent_io import read_latent
from vae_fix.loader import read_vae
import fuzzing

CASES = 10_000
HOSTILE = [-1, 2 ** 64, 1.5, "7", None, [], {}, True, [1], [0, 2 ** 70], [[0, 1]], "F32", {"a": 1}, [2 ** 63, 0]]
SAME_SIZE = {1: ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"], 2: ["F16", "BF16", "I16", "U16"],
             4: ["F32", "I32", "U32"], 8: ["F64", "I64", "U64"]}
SIZE = {d: n for n, ds in SAME_SIZE.items() for d in ds}
NAMES = ["latent_tensor", "samples", "mean", "latent", "latent_format_version_0", "z", "", "x" * 5000, "LATENT"]


@pytest.fixture(scope="module")
def bases():
    """(header dict, data bytes) of each kind of latent file read_latent reads."""
    g = torch.Generator().manual_seed(0)
    z = lambda *shape: torch.randn(shape, generator=g)
    version = {"latent_format_version_0": torch.tensor([])}
    files = [({"latent_tensor": z(1, 4, 8, 8), **version}, {"vae_fix": "raw VAE latent"}),
             ({"latent_tensor": z(1, 4, 8, 8)}, None),                  # old SD1 file: scaled on read
             ({"samples": z(2, 4, 4, 6).half()}, None), ({"mean": z(1, 16, 4, 4).bfloat16()}, None),
             ({"latent": z(4, 8, 8)}, None), ({"z": z(1, 4, 6, 6), "noise": z(3)}, {"k": "v"})]
    out = []
    for tensors, meta in files:
        raw = save(tensors, meta)
        n = int.from_bytes(raw[:8], "little")
        out.append((json.loads(raw[8:8 + n]), raw[8 + n:]))
    return out


def pack(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    return (len(header_text) if length is None else length).to_bytes(8, "little") + header_text + data


def refit(rng: random.Random, entry: dict) -> list:
    """Another shape that fills the same bytes: other factorings, other ranks, a zero-size one."""
    count = math.prod(entry["shape"]) if entry["shape"] else 1
    if count == 0:
        return rng.choice([[0], [1, 0, 4, 4], [0, 4, 8, 8]])
    split = [d for d in range(1, count + 1) if count % d == 0]
    a = rng.choice(split)
    b = rng.choice([d for d in split if (count // a) % d == 0])
    return rng.choice([[count], [1, count], [a, count // a], [1, a, count // a], [a, b, count // a // b],
                       [1, a, b, count // a // b], [1, 1, a, b, count // a // b], [1] * 7 + [count], [count, 1, 1, 1]])


def mutate(rng: random.Random, header: dict, data: bytes) -> bytes:
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    kind = rng.randrange(10)
    if kind == 0:  # bytes of the JSON flipped
        b = bytearray(json.dumps(h).encode())
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return pack(bytes(b), data)
    if kind == 1:  # the header or the data cut
        text = json.dumps(h).encode()
        return pack(text[:rng.randrange(len(text))], data) if rng.random() < 0.3 else \
            pack(text, data[:rng.randrange(len(data) + 1)])
    if kind == 2:  # a wrong length prefix
        text = json.dumps(h).encode()
        return pack(text, data, rng.choice([0, 1, 7, len(text) - 1, len(text) + 1, 2 ** 63, 2 ** 40, 2 ** 64 - 1]))
    if kind == 3:  # a hostile value in one field
        h[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE)
    elif kind == 4:  # another dtype of the same width: the same bytes read as integers, bools, float8 ...
        h[name]["dtype"] = rng.choice(SAME_SIZE[SIZE[h[name]["dtype"]]])
    elif kind == 5:  # another shape over the same bytes
        h[name]["shape"] = refit(rng, h[name])
    elif kind == 6:  # renamed, dropped or repeated under another name
        entry = h.pop(name)
        if rng.random() < 0.8:
            h[rng.choice(NAMES)] = entry
        if rng.random() < 0.3 and names[1:]:
            h[rng.choice(NAMES)] = dict(h.get(names[-1], entry))
    elif kind == 7:  # data bytes flipped: NaN, inf, huge and denormal values
        b = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.choice([0xFF, 0x7F, 0x80, 0x00, rng.randrange(256)])
        return pack(json.dumps(h).encode(), bytes(b))
    elif kind == 8:  # metadata of the wrong type or size
        h["__metadata__"] = rng.choice([[], "x", None, {"k": 1}, {"k": "v" * 100_000}, {str(i): "" for i in range(2000)}])
    else:  # numbers JSON does not allow, deep nesting
        text = json.dumps(h).encode()
        target = json.dumps(h[name]["data_offsets"]).encode()
        literal = rng.choice(["[0, Infinity]", "[0, NaN]", "[0, 1e999]", "[0, " + "1" * 5000 + "]",
                              "[" * 100_000 + "]" * 100_000, "[" * 500 + "]" * 500, "[0, -0]", "[0.0, 64.0]"])
        return pack(text.replace(target, literal.encode(), 1), data)
    return pack(json.dumps(h).encode(), data)


def outcome(path, allow_nonfinite: bool) -> str:
    def valid_latent(z) -> None:
        assert isinstance(z, torch.Tensor) and z.dtype == torch.float32 and z.dim() in (4, 5), (type(z), z)
        assert 0 not in z.shape and z.shape[1] <= MAX_LATENT_CHANNELS, z.shape
        finite = int(z.isfinite().sum())
        assert finite == z.numel() or (allow_nonfinite and finite > 0), (finite, z.numel())

    return fuzzing.outcome(path, lambda: read_latent(path, allow_nonfinite), valid_latent)


def test_mutated_latents_give_only_the_clear_error_or_a_valid_latent(bases, tmp_path):
    rng = random.Random(4321)
    counts = {"read": 0, "refused": 0}
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(CASES):
        header, data = bases[i % len(bases)]
        path = tmp_path / "mutant.latent"
        path.write_bytes(mutate(rng, header, data))
        try:
            counts[outcome(path, allow_nonfinite=rng.random() < 0.3)] += 1
        except (AssertionError, pytest.fail.Exception) as e:
            raise AssertionError(f"case {i} (base {i % len(bases)}): {e}") from None
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - grown  # KiB on Linux
    assert counts["refused"] > CASES // 3 and counts["read"] > CASES // 5, counts
    assert grown < 500_000, f"peak memory grew by {grown} KiB"


def test_every_base_latent_reads(bases, tmp_path):
    for k, (header, data) in enumerate(bases):
        path = tmp_path / f"base{k}.latent"
        path.write_bytes(pack(json.dumps(header).encode(), data))
        assert outcome(path, allow_nonfinite=False) == "read", k


def test_a_huge_dimension_beside_a_zero_is_refused_by_the_header_check(bases, tmp_path):
    # Before: the header check passed it (0 elements fill 0 bytes) and torch's reshape raised TypeError.
    header, data = bases[0]
    header = {**header, "latent_format_version_0": {"dtype": "F32", "shape": [2 ** 63, 0], "data_offsets": [0, 0]}}
    path = tmp_path / "huge.latent"
    path.write_bytes(pack(json.dumps(header).encode(), data))
    with pytest.raises(InputError, match=r"huge\.latent.*shape no tensor can have"):
        read_latent(path)


@pytest.mark.parametrize("reader,error", [(read_latent, InputError), (read_vae, VAELoadError)], ids=["latent", "vae"])
def test_safetensors_own_errors_are_quoted_short(bases, tmp_path, reader, error):
    # Before: safetensors' "invalid offset for tensor `xxx…`" quoted a 5,000-character name whole.
    header, data = bases[0]
    header = {**header, "x" * 5000: dict(header["latent_tensor"])}  # two tensors over the same bytes
    path = tmp_path / "shared.safetensors"
    path.write_bytes(pack(json.dumps(header).encode(), data))
    with pytest.raises(error, match="shared.safetensors") as e:
        reader(path)
    assert type(e.value) is error and len(str(e.value)) < 1200, len(str(e.value))
