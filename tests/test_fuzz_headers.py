"""Hostile safetensors headers: the loader answers every one with its clear error (or loads it when
the mutation left a valid file), fast, with a short message, never another exception. 10,000+
seeded mutations per run, plus regression cases for each class found by an earlier fuzzing run."""
import json
import random
import pytest

from vae_fix.errors import VAEFixError
from vae_fix.loader import BOUND_META_KEY, CONFIG_META_KEY, NORM_META_KEY, read_vae, save_vae
from vae_fix.model import VAEConfig, random_vae
from fuzzing import CASE_SECONDS, deadline

CASES = 10_500
HOSTILE = [-1, 2 ** 64, 1.5, "7", None, [], {}, True, [1], [0, 2 ** 70], [[0, 1]], "F32", {"a": 1}]
PACK_KEYS = [BOUND_META_KEY, NORM_META_KEY, CONFIG_META_KEY]  # what the loader reads back
PACK_VALUES = ["nan", "inf", "-3", "1e999", "0.05", "1" * 5000, "pixel", "group", "Pixel", "pixel\x00", "", "{}",
               '{"scaling_factor": "x"}', '{"shift_factor": 1e999}', 3, None, [1], {"a": 1}]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A tiny but complete KL VAE file (430 KB): its header, its data."""
    cfg = VAEConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, z_channels=4, latent_channels=4,
                    mid_attention=False)
    path = save_vae(random_vae(cfg, 0).half(), tmp_path_factory.mktemp("fuzz") / "tiny.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def pack(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    return (len(header_text) if length is None else length).to_bytes(8, "little") + header_text + data


def mutate(rng: random.Random, header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    kind = rng.randrange(8)
    if kind == 0:  # flip bytes of the JSON
        b = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return pack(bytes(b), data)
    if kind == 1:  # cut the header or the data
        return pack(text[:rng.randrange(len(text))], data) if rng.random() < 0.5 else pack(text, data[:rng.randrange(len(data))])
    if kind == 2:  # a wrong length prefix
        return pack(text, data, rng.choice([0, 1, len(text) - 1, len(text) + 1, 2 ** 63, 2 ** 40]))
    h = json.loads(text)
    name = rng.choice([k for k in h if k != "__metadata__"])
    if kind == 3:  # a hostile value in one field
        h[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE)
    elif kind == 4:  # numbers JSON does not allow, or too large for any parser
        literal = rng.choice(["Infinity", "-Infinity", "NaN", "1e999", "1" * 5000])
        return pack(text.replace(json.dumps(h[name]["data_offsets"]).encode(), f"[0, {literal}]".encode(), 1), data)
    elif kind == 5:  # deep nesting, in a tensor entry or in the metadata
        deep = "[" * rng.choice([100, 10_000, 200_000]) + "]" * rng.choice([0, 1])
        return pack(text.replace(b'"__metadata__": {', f'"__metadata__": {{"x": {deep}, '.encode(), 1), data)
    elif kind == 6:  # renamed, dropped or duplicated keys
        entry = h.pop(name)
        if rng.random() < 0.7:
            h[rng.choice(["encoder.down.9999.block.0.conv1.weight", "decoder.time_stack.0.weight", name + "x",
                          "encoder.down." + "9" * 5000 + ".block.0.conv1.weight", ""])] = entry
    elif rng.random() < 0.5:  # metadata of the wrong type
        h["__metadata__"] = rng.choice([[], "x", {"vae_fix.diffusers_config": "[" * 50_000}, {"k": 1}, None])
    else:  # a hostile value under a key the loader reads back (a study variant, a diffusers setting)
        h["__metadata__"] = {rng.choice(PACK_KEYS): rng.choice(PACK_VALUES) for _ in range(rng.randint(1, 3))}
    return pack(json.dumps(h).encode(), data)


def test_ten_thousand_mutated_headers_give_only_the_clear_error(valid, tmp_path):
    header, data = valid
    rng, path = random.Random(1234), tmp_path / "mutant.safetensors"
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(CASES):
        path.write_bytes(mutate(rng, header, data))
        try:
            with deadline(CASE_SECONDS):
                read_vae(path)
            outcomes["loaded"] += 1
        except VAEFixError as e:
            outcomes["refused"] += 1
            assert len(str(e)) < 1200, f"case {i}: a {len(str(e))}-character message"
            assert "mutant.safetensors" in str(e), f"case {i}: the message does not name the file"
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {i}: {type(e).__name__}: {str(e)[:300]}")
    assert outcomes["refused"] > CASES // 2, outcomes


@pytest.mark.parametrize("hostile", [
    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}',
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e999]}}',
    b'{"__metadata__": {"vae_fix.diffusers_config": "' + b"[" * 100_000 + b'"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
], ids=["deep-header", "infinity", "1e999", "deep-config-metadata"])
def test_regressions_are_refused_with_the_clear_error(tmp_path, hostile):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(pack(hostile, b"\0" * 4))
    with pytest.raises(VAEFixError, match="bad.safetensors"):
        read_vae(path)


def test_twenty_thousand_empty_levels_are_refused_without_walking_them(tmp_path):
    # Before: 316 s and 2.2 GB (bench/bench_hostile.py: now milliseconds)
    entries = {f"encoder.down.{i}.block.0.conv1.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
               for i in range(19_999)}
    path = tmp_path / "levels.safetensors"
    path.write_bytes(pack(json.dumps(entries).encode(), b""))
    with pytest.raises(VAEFixError) as e, deadline(CASE_SECONDS):
        read_vae(path)
    assert len(str(e.value)) < 1200
