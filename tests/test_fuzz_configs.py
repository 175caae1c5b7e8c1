"""Mutated diffusers config.json beside a valid diffusion_pytorch_model.safetensors: load_vae answers
each with VAELoadError naming the folder's config, or loads the VAE (whose info is still strict
JSON); nothing else comes out, no case hangs and neither file changes. 1,600 seeded mutations
(any value at any path replaced by a hostile one or a wrong type, keys dropped, renamed and added,
numbers JSON forbids or no parser holds, deep nesting, unicode, truncated and re-encoded text),
plus regression cases for what an earlier run found."""
import copy
import hashlib
import json
import random
import resource
import warnings

import pytest
from run_cli import run_cli

from vae_fix.errors import VAELoadError
from vae_fix.jsonsafe import json_safe
from vae_fix.loader import LoadedVAE, load_vae, save_vae
from vae_fix.model import VAEConfig, random_vae
from fuzzing import CASE_SECONDS, deadline

CASES = 1_600
EXTRA = {"scaling_factor": 0.18215, "shift_factor": 0.0, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4,
         "force_upcast": True, "sample_size": 512, "_diffusers_version": "0.30.0"}
HOSTILE = [-1, 0, 1, -2 ** 63, 2 ** 64, 10 ** 4000, -10 ** 300, 1e308, -1e308, 5e-324, 1.5, -0.0, True, False, None,
           "", "4", "AutoencoderKL", "AutoencoderKLTemporalDecoder", "silu", "é☃\u0000\u202e", "\ud800", "x" * 100_000,
           [], {}, [None], [32, 32, 32], [2 ** 70, -1], [[32, 32]], {"a": 1}, {"_class_name": "AutoencoderKL"},
           list(range(10_000)), ["DownEncoderBlock2D"] * 5000, {str(i): i for i in range(2_000)}]
LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "1" * 5000, "-" + "9" * 4300, "1" * 4299,
            "[" * 100_000 + "]" * 100_000, "[" * 900 + "]" * 900, '{"a":' * 5000 + "1" + "}" * 5000,
            '"\\ud800\\udc00"', '"\\u0000"', "[1,]", "{", "tru", "0x10", "+1", ".5", "01"]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """(config dict, weights bytes) of a tiny diffusers-layout VAE folder that loads."""
    cfg = VAEConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, z_channels=4, latent_channels=4,
                    mid_attention=False)
    folder = save_vae(random_vae(cfg, 0).half(), tmp_path_factory.mktemp("cfg") / "vae", layout="diffusers")
    config = {**json.loads((folder / "config.json").read_text()), **EXTRA}
    (folder / "config.json").write_text(json.dumps(config))
    load_vae(folder)  # the unmutated folder loads
    return config, (folder / "diffusion_pytorch_model.safetensors").read_bytes()


def places(obj, at=()):
    """Every path into the JSON value (dict keys, list indices), the root included."""
    yield at
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from places(v, at + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from places(v, at + (i,))


def get(obj, at):
    for k in at:
        obj = obj[k]
    return obj


def put(obj, at, value):
    if not at:
        return value
    get(obj, at[:-1])[at[-1]] = value
    return obj


def retyped(rng: random.Random, v):
    """The same value with another type or sign, or absurdly large."""
    if isinstance(v, bool):
        return rng.choice([int(v), str(v).lower(), not v, [v]])
    if isinstance(v, (int, float)):
        return rng.choice([float(v), str(v), -v, v * 10 ** rng.choice([3, 30, 300]), [v], {"value": v}, v + 0.5])
    if isinstance(v, str):
        return rng.choice([[v], v.upper(), v + "\u0301", v[::-1], len(v), {"name": v}, v * 1000])
    if isinstance(v, list):
        return rng.choice([tuple(v)[:1], v * 2, v[:-1], v[::-1], {str(i): x for i, x in enumerate(v)}, str(v), [v]])
    return rng.choice([[], None, str(v), list(v) if isinstance(v, dict) else v])


def mutate(rng: random.Random, config: dict) -> bytes:
    doc = copy.deepcopy(config)
    spots = list(places(doc))
    at = rng.choice(spots[1:]) if rng.random() < 0.95 else ()
    kind = rng.randrange(8)
    raw = None
    if kind == 0:
        doc = put(doc, at, copy.deepcopy(rng.choice(HOSTILE)))
    elif kind == 1:  # a literal that Python's json.dumps never writes: spliced into the text
        doc, raw = put(doc, at, "\u0000SPLICE"), rng.choice(LITERALS)
    elif kind == 2 and at:  # a key or list element dropped
        del get(doc, at[:-1])[at[-1]]
    elif kind == 3:
        doc = put(doc, at, retyped(rng, get(doc, at)))
    elif kind == 4 and at and isinstance(get(doc, at[:-1]), dict):  # a key renamed (case, unicode, spaces)
        parent, key = get(doc, at[:-1]), at[-1]
        parent[rng.choice([key.upper(), key + " ", "\ufeff" + key, key.replace("_", "-"), ""])] = parent.pop(key)
    elif kind == 5:  # keys nobody expects, at the top
        doc[rng.choice(["", "é" * 500, "\u0000", "_class_name ", "x" * 10_000])] = rng.choice(HOSTILE)
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    if raw is not None:
        text = text.replace(b'"\\u0000SPLICE"', raw.encode()).replace('"\u0000SPLICE"'.encode(), raw.encode())
    if kind == 6:  # the text damaged: cut, bytes flipped, re-encoded, a key repeated
        how = rng.randrange(5)
        if how == 0:
            text = text[:rng.randrange(len(text))]
        elif how == 1:
            b = bytearray(text)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            text = bytes(b)
        elif how == 2:
            text = text.decode("utf-8", "surrogatepass").encode(rng.choice(["utf-16", "utf-32", "utf-8-sig"]),
                                                                "surrogatepass")
        elif how == 3:
            text = text[:-1] + b', "latent_channels": 16, "latent_channels": 4}'
        else:
            text = rng.choice([b"", b" ", b"\xff\xfe", b"null", b"[]", b'"AutoencoderKL"', b"4", b"\0" * 64])
    if kind == 7:  # a whole other document
        text = json.dumps(rng.choice([[], [config], {"vae": config}, {}, {"_class_name": "AutoencoderKL"}])).encode()
    return text


def outcome(folder, config) -> str:
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    try:
        with deadline(CASE_SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = load_vae(folder)
        assert isinstance(vae, LoadedVAE) and vae.config.latent_channels == 4
        json.dumps(json_safe(vae.file.to_json()), allow_nan=False)  # what `check` prints
        result = "loaded"
    except VAELoadError as e:
        assert folder.name in str(e), f"the message does not name the folder: {str(e)[:300]}"
        assert len(str(e)) < 2000, f"a {len(str(e))}-character message: {str(e)[:300]}"
        result = "refused"
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(e).__name__}: {str(e)[:300]}")
    assert hashlib.sha256(config.read_bytes()).hexdigest() == digest, "loading changed config.json"
    return result


def test_mutated_configs_give_only_the_clear_error(valid, tmp_path):
    config, weights = valid
    rng = random.Random(77)
    folders = [tmp_path / "mutantvae", tmp_path / "mutantpipe"]
    for folder, inner in zip(folders, [folders[0], folders[1] / "vae"]):
        inner.mkdir(parents=True)
        (inner / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    (folders[1] / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    counts = {"loaded": 0, "refused": 0}
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(CASES):
        folder = folders[i % 2]
        written = folder / ("config.json" if i % 2 == 0 else "vae/config.json")
        written.write_bytes(mutate(rng, config))
        try:
            counts[outcome(folder, written)] += 1
        except (AssertionError, pytest.fail.Exception) as e:
            raise AssertionError(f"case {i} ({folder.name}): {e}") from None
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - grown  # KiB on Linux
    for folder in folders:
        weights_now = next(folder.rglob("diffusion_pytorch_model.safetensors")).read_bytes()
        assert weights_now == weights, "loading changed the weights file"
    assert counts["refused"] > CASES // 3 and counts["loaded"] > CASES // 4, counts
    assert grown < 1_000_000, f"peak memory grew by {grown} KiB"


def folder_with(tmp_path, valid, text: str, name: str = "regress"):
    weights = valid[1]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text(text)
    return folder


def test_a_config_value_nested_900_deep_is_refused_not_a_crash_of_check(valid, tmp_path):
    # Before: it loaded, and `check --json` died with RecursionError (json_safe) printing the extras.
    config = {**valid[0], "latents_mean": "SPLICE"}
    folder = folder_with(tmp_path, valid, json.dumps(config).replace('"SPLICE"', "[" * 900 + "]" * 900))
    with pytest.raises(VAELoadError, match=r"regress/config\.json.*nested too deeply"):
        load_vae(folder)
    r = run_cli("check", "--vae", folder, "--json")
    assert r.returncode == 2 and "nested too deeply" in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]


def test_the_same_deep_value_in_a_files_metadata_copy_is_ignored(tmp_path):
    cfg = VAEConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, z_channels=4, latent_channels=4,
                    mid_attention=False)
    deep = '{"scaling_factor": 0.13, "latents_mean": ' + "[" * 900 + "]" * 900 + "}"
    path = save_vae(random_vae(cfg, 0).half(), tmp_path / "meta.safetensors",
                    metadata={"vae_fix.diffusers_config": deep})
    vae = load_vae(path)
    assert vae.file.extra_config == {} and any("ignored unreadable" in n for n in vae.file.notes)
    assert json.loads(vae.file.json_text())["extra_config"] == {}  # RecursionError before


def test_a_huge_config_json_is_refused_without_reading_it(valid, tmp_path):
    folder = folder_with(tmp_path, valid, json.dumps(valid[0]))
    with open(folder / "config.json", "r+b") as f:
        f.truncate(300_000_000)  # sparse: 300 MB of zeros that the loader must not read
    with pytest.raises(VAELoadError, match=r"regress/config\.json.*300000000 bytes"), deadline(CASE_SECONDS):
        load_vae(folder)


def test_a_huge_wrong_value_gives_a_short_message(valid, tmp_path):
    folder = folder_with(tmp_path, valid, json.dumps({**valid[0], "block_out_channels": list(range(20_000))}))
    with pytest.raises(VAELoadError) as e:
        load_vae(folder)
    assert "block_out_channels" in str(e.value) and len(str(e.value)) < 2000
