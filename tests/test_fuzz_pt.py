"""Mutated torch.save archives (.pt/.ckpt, zip and legacy): load_vae, what the CLI loads files with,
answers each with VAELoadError naming the file, or loads it (a complete, finite VAE). Nothing else
comes out, no pickle code ever runs (a sentinel file that every payload would create stays absent),
no case hangs and the file's bytes are never changed. 2,000 seeded mutations (byte flips,
truncation, mutated data.pkl opcodes, swapped, renamed and dropped zip members, injected GLOBALs),
plus each hostile pickle and each tensor kind an earlier run got past the clear error."""
import hashlib
import io
import pickle
import pickletools
import random
import resource
import warnings
import zipfile

import pytest
import torch

from vae_fix.errors import VAELoadError
from vae_fix.loader import LoadedVAE, load_vae
from vae_fix.model import VAEConfig, random_vae
from fuzzing import CASE_SECONDS, deadline

CASES = 2_000
OPCODES = [op.code.encode("latin-1") for op in pickletools.opcodes]
HOSTILE_INTS = [0, 1, -1, 255, 2 ** 31 - 1, -2 ** 31, 2 ** 40, 2 ** 62, 2 ** 200, -2 ** 70]
HOSTILE_STRINGS = ["", "0", "1", "cpu", "cuda:0", "meta", "99999", "../../etc/passwd", "x" * 100_000, "\udcff",
                   "encoder.conv_in.weight", "state_dict", "storage", "é" * 300]
GLOBALS = ["torch FloatStorage", "torch BoolStorage", "torch ComplexFloatStorage", "torch QInt8Storage",
           "torch LongStorage", "torch BFloat16Storage", "torch.cuda HalfStorage", "torch.storage UntypedStorage",
           "torch._utils _rebuild_tensor", "torch._utils _rebuild_qtensor", "torch._utils _rebuild_sparse_tensor",
           "torch._utils _rebuild_meta_tensor_no_storage", "torch._utils _rebuild_nested_tensor",
           "torch._utils _rebuild_wrapper_subclass", "torch._utils _rebuild_parameter", "torch._utils _rebuild_tensor_v3",
           "torch._utils _rebuild_device_tensor_from_numpy", "torch._tensor _rebuild_from_type_v2", "torch Size",
           "torch float4_e2m1fn_x2", "torch complex64", "torch.nn.parameter Parameter", "collections Counter",
           "builtins set", "builtins bytearray", "_codecs encode", "torch device", "torch Tensor",
           "posix system", "os system", "builtins eval", "builtins exec", "builtins open", "builtins getattr",
           "subprocess Popen", "torch.storage _load_from_bytes", "torch.serialization load", "torch load"]


def payload(marker) -> list[bytes]:
    """Pickle fragments that, if anything ran them, would create `marker` (each pushes one value)."""
    shell = f"touch '{marker}'"
    code = f"open({str(marker)!r}, 'w').close()"
    return [global_op("posix system") + string_op(shell) + b"\x85R",
            global_op("os system") + string_op(shell) + b"\x85R",
            global_op("builtins eval") + string_op(code) + b"\x85R",
            global_op("builtins exec") + string_op(code) + b"\x85R",
            global_op("builtins open") + string_op(str(marker)) + string_op("w") + b"\x86R",
            global_op("subprocess Popen") + b"(" + string_op("touch") + string_op(str(marker)) + b"l\x85R"]


def global_op(name: str) -> bytes:
    return b"c" + name.replace(" ", "\n").encode() + b"\n"


def string_op(s: str) -> bytes:
    data = s.encode("utf-8", "surrogatepass")
    return b"X" + len(data).to_bytes(4, "little") + data


def int_op(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + v.to_bytes(2, "little")
    if -2 ** 31 <= v < 2 ** 31:
        return b"J" + v.to_bytes(4, "little", signed=True)
    data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def zip_of(members: list[tuple[str, bytes]], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression) as z:
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """(suffix, bytes, zip members or None) of a tiny complete VAE saved three ways."""
    cfg = VAEConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, z_channels=4, latent_channels=4,
                    mid_attention=False)
    sd = random_vae(cfg, 0).half().state_dict()
    out = []
    for suffix, obj, zipped in ((".pt", sd, True), (".ckpt", {"state_dict": sd, "global_step": 1000}, True),
                                (".pt", sd, False)):
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=zipped)
        raw = buf.getvalue()
        members = None
        if zipped:
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
        out.append((suffix, raw, members))
    return out


def flip(rng: random.Random, data: bytes, most: int = 8) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, most)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def mutate_pickle(rng: random.Random, pkl: bytes, marker) -> bytes:
    """One opcode of data.pkl replaced, dropped, repeated or given a hostile argument, or code injected."""
    ops = list(pickletools.genops(pkl))
    i = rng.randrange(len(ops) - 1)
    op, arg, pos = ops[i]
    end = ops[i + 1][2]
    kind = rng.randrange(7)
    if kind == 0:
        new = rng.choice(OPCODES) + pkl[pos + 1:end]
    elif kind == 1:
        new = b""
    elif kind == 2:
        new = pkl[pos:end] * rng.choice([2, 3, 1000])
    elif kind == 3 and isinstance(arg, int):
        new = int_op(rng.choice(HOSTILE_INTS + [arg + 1, arg - 1, arg * 1000]))
    elif kind == 4 and isinstance(arg, str) and op.name != "GLOBAL":
        new = string_op(rng.choice(HOSTILE_STRINGS))
    elif kind == 5 and op.name == "GLOBAL":
        new = global_op(rng.choice(GLOBALS))
    else:  # code injected at an opcode boundary: refused at its GLOBAL, never run
        return pkl[:pos] + rng.choice(payload(marker)) + pkl[pos:]
    return pkl[:pos] + new + pkl[end:]


def mutate_members(rng: random.Random, members: list, marker) -> bytes:
    members = list(members)
    names = [n for n, _ in members]
    data_names = [n for n in names if "/data/" in n]
    prefix = names[0].split("/")[0]
    kind = rng.randrange(9)
    if kind == 0:  # a member dropped (often the pickle or a tensor's record)
        drop = rng.choice([names[0], rng.choice(data_names), rng.choice(names)])
        members = [(n, d) for n, d in members if n != drop]
    elif kind == 1:  # two tensors' records swapped
        a, b = rng.sample(range(len(members)), 2) if rng.random() < 0.2 else \
            [names.index(n) for n in rng.sample(data_names, 2)]
        (na, da), (nb, db) = members[a], members[b]
        members[a], members[b] = (na, db), (nb, da)
    elif kind == 2:  # a member renamed
        j = rng.randrange(len(members))
        members[j] = (rng.choice([f"{prefix}/data/99999", "other/data.pkl", f"{prefix}/data.pkl", "x",
                                  f"{prefix}/../data.pkl", f"{prefix}/data/0", members[j][0] + "x"]), members[j][1])
    elif kind == 3:  # a member repeated, with other bytes
        name = rng.choice(names)
        members.append((name, rng.choice([b"", b"\0" * 64, dict(members)[rng.choice(names)]])))
    elif kind == 4:  # members in another order, or compressed
        rng.shuffle(members)
        return zip_of(members, rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    elif kind == 5:  # the byte order or format version given another value
        name = rng.choice([n for n in names if n.endswith(("byteorder", "version", "alignment"))])
        members[names.index(name)] = (name, rng.choice([b"big", b"little", b"", b"middle", b"999", b"-1",
                                                         b"\xff" * 9, b"9" * 5000]))
    elif kind == 6:  # a tensor's record shortened or grown
        name = rng.choice(data_names)
        d = dict(members)[name]
        members[names.index(name)] = (name, rng.choice([d[:len(d) // 2], d + d, d[:-1], b""]))
    elif kind == 7:  # a whole hostile pickle in place of data.pkl
        body = b"\x80\x02}(" + string_op("encoder.conv_in.weight") + rng.choice(payload(marker)) + b"u."
        members[0] = (names[0], body)
    else:  # a record's bytes flipped
        j = rng.randrange(len(members))
        if members[j][1]:
            members[j] = (members[j][0], flip(rng, members[j][1]))
    return zip_of(members)


def mutate(rng: random.Random, raw: bytes, members, marker) -> bytes:
    kind = rng.randrange(4 if members is None else 8)
    if kind == 0:
        return flip(rng, raw, 16)
    if kind == 1:
        return raw[:rng.randrange(len(raw))]
    if kind == 2:  # a span deleted, or random bytes inserted
        at = rng.randrange(len(raw))
        return raw[:at] + raw[at + rng.randint(1, 4096):] if rng.random() < 0.5 else \
            raw[:at] + rng.randbytes(rng.randint(1, 64)) + raw[at:]
    if kind == 3:
        if members is None:  # legacy format: code injected into its first pickle
            return rng.choice(payload(marker)) + raw
        return zip_of(members[:1] + [(members[0][0], flip(rng, members[0][1]))])
    pkl = members[0][1]
    if kind == 4:
        new = flip(rng, pkl, 4)
    elif kind == 5:
        new = pkl[:rng.randrange(len(pkl))]
    elif kind == 6:
        new = mutate_pickle(rng, pkl, marker)
    else:
        return mutate_members(rng, members, marker)
    return zip_of([(members[0][0], new)] + members[1:])


def outcome(path, marker) -> str:
    """'loaded' or 'refused'; fails on anything else, on code that ran, on a changed file, on a hang."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        with deadline(CASE_SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = load_vae(path)
        assert isinstance(vae, LoadedVAE) and all(bool(p.isfinite().all()) for p in vae.model.parameters())
        result = "loaded"
    except VAELoadError as e:
        assert path.name in str(e) and len(str(e)) < 2000, str(e)[:300]
        result = "refused"
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(e).__name__}: {str(e)[:300]}")
    assert not marker.exists(), "a pickle in the file ran code"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "loading changed the file"
    return result


def test_mutated_torch_archives_give_only_the_clear_error(bases, tmp_path):
    rng, marker = random.Random(2024), tmp_path / "ran"
    counts = {"loaded": 0, "refused": 0}
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(CASES):
        suffix, raw, members = bases[i % len(bases)]
        path = tmp_path / f"mutant{suffix}"
        path.write_bytes(mutate(rng, raw, members, marker))
        try:
            counts[outcome(path, marker)] += 1
        except (AssertionError, pytest.fail.Exception) as e:
            raise AssertionError(f"case {i} ({suffix}, {'zip' if members else 'legacy'}): {e}") from None
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - grown  # KiB on Linux
    assert counts["refused"] > CASES // 2 and counts["loaded"] > 50, counts
    assert grown < 1_000_000, f"peak memory grew by {grown} KiB"


@pytest.mark.parametrize("which", range(6), ids=["posix.system", "os.system", "eval", "exec", "open", "Popen"])
@pytest.mark.parametrize("container", ["zip", "legacy", "bare-pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(bases, tmp_path, which, container):
    marker = tmp_path / "ran"
    evil = b"\x80\x02}(" + string_op("encoder.conv_in.weight") + payload(marker)[which] + b"u."
    members = bases[0][2]
    data = {"zip": lambda: zip_of([(members[0][0], evil)] + members[1:]),
            "legacy": lambda: evil + bases[2][1], "bare-pickle": lambda: evil}[container]()
    path = tmp_path / "evil.ckpt"
    path.write_bytes(data)
    with pytest.raises(VAELoadError, match="evil.ckpt") as e:
        load_vae(path)
    assert "refused" in str(e.value) and "nothing in the file was run" in str(e.value)
    assert not marker.exists()


def test_the_sentinel_works_every_payload_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "ran"
    for k, fragment in enumerate(payload(marker)):
        made = pickle.loads(b"\x80\x02" + fragment + b".")
        getattr(made, "wait", getattr(made, "close", lambda: None))()
        assert marker.exists(), f"payload {k} would not have been noticed"
        marker.unlink()


def test_a_reduce_class_from_the_test_helpers_is_refused(tmp_path):
    from vae_files import OpensFile, RunsShell
    marker = tmp_path / "ran"
    for i, evil in enumerate([RunsShell(marker), OpensFile(marker), {"state_dict": {"x": RunsShell(marker)}}]):
        path = tmp_path / f"evil{i}.pt"
        torch.save(evil, path)
        with pytest.raises(VAELoadError, match=f"evil{i}.pt"):
            load_vae(path)
    assert not marker.exists()


@pytest.mark.parametrize("make", [
    lambda b: torch.nested.nested_tensor([b[:3], b[:5]]),                  # RuntimeError from .shape before
    lambda b: torch.zeros(32, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),  # NotImplementedError before
    lambda b: b.float().to(torch.complex64),
    lambda b: torch.quantize_per_tensor(b.float(), 0.1, 0, torch.qint8),
], ids=["nested", "float4", "complex", "quantized"])
def test_tensor_kinds_no_weights_file_holds_are_refused_by_name(tmp_path, make):
    cfg = VAEConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, z_channels=4, latent_channels=4,
                    mid_attention=False)
    sd = random_vae(cfg, 0).state_dict()
    path = tmp_path / "odd.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        sd["encoder.conv_in.bias"] = make(sd["encoder.conv_in.bias"])
        torch.save(sd, path)
    with pytest.raises(VAELoadError, match="odd.pt") as e:
        load_vae(path)
    assert "encoder.conv_in.bias" in str(e.value)


def test_a_huge_tensor_name_gives_a_short_message(tmp_path):
    cfg = VAEConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, z_channels=4, latent_channels=4,
                    mid_attention=False)
    sd = {**random_vae(cfg, 0).state_dict(), "encoder." + "x" * 5000: torch.zeros(1)}
    path = tmp_path / "longname.pt"
    torch.save(sd, path)
    with pytest.raises(VAELoadError, match="longname.pt") as e:
        load_vae(path)
    assert len(str(e.value)) < 2000
