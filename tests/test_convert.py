"""`python -m vae_fix convert`: exit codes, messages, outputs (via subprocess and via cli.main)."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vae_fix import cli
from vae_fix.loader import read_vae
from vae_files import write_vae

ROOT = Path(__file__).resolve().parents[1]


def convert(*args):
    """Run the real CLI in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "vae_fix", "convert", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_subprocess_round_trip_is_bit_exact(tmp_path):
    src = write_vae(tmp_path, "sd", "checkpoint", "ckpt")
    to_diffusers = convert("--vae", src, "--to", "diffusers", "--out", tmp_path / "d", "--metadata", "license=test")
    assert to_diffusers.returncode == 0, to_diffusers.stderr
    assert "read" in to_diffusers.stdout and "compvis layout (torch-weights-only)" in to_diffusers.stdout
    assert "ignored 3 non-VAE tensors" in to_diffusers.stdout
    assert "wrote" in to_diffusers.stdout and "config.json" in to_diffusers.stdout
    back = convert("--vae", tmp_path / "d", "--to", "compvis", "--out", tmp_path / "back.safetensors")
    assert back.returncode == 0, back.stderr
    original = read_vae(src).state_dict
    result = load_file(str(tmp_path / "back.safetensors"))
    assert set(result) == set(original) and all(torch.equal(result[k], original[k]) for k in original)
    assert read_vae(tmp_path / "back.safetensors").metadata["license"] == "test"


def test_subprocess_bad_input_exits_2_without_traceback(tmp_path):
    result = convert("--vae", tmp_path / "nope.safetensors", "--to", "compvis", "--out", tmp_path / "o.safetensors")
    assert result.returncode == 2
    assert "Cannot load VAE" in result.stderr and "nope.safetensors" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.safetensors").exists()


def test_subprocess_usage_error_exits_2(tmp_path):
    result = convert("--vae", "x.safetensors", "--to", "onnx", "--out", tmp_path / "o")
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_subprocess_refuses_code_running_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"w": RunsShell(marker)}}, protocol=2))
    result = convert("--vae", path, "--to", "compvis", "--out", tmp_path / "o.safetensors")
    assert result.returncode == 2 and "refused" in result.stderr and "evil.ckpt" in result.stderr
    assert not marker.exists()


def run_main(capsys, *args):
    code = cli.main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_main_converts_to_single_diffusers_file(tmp_path, capsys):
    src = write_vae(tmp_path, "sd3", "diffusers", "folder")
    code, out, err = run_main(capsys, "--vae", src, "--to", "diffusers", "--out", tmp_path / "single.safetensors")
    assert code == 0, err
    assert "16-channel KL VAE" in out and "without quant_conv" in out
    assert "encoder.down_blocks.0.resnets.0.conv1.weight" in load_file(str(tmp_path / "single.safetensors"))


def test_main_refuses_existing_output_unless_overwrite(tmp_path, capsys):
    src = write_vae(tmp_path, "sd")
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    code, _, err = run_main(capsys, "--vae", src, "--to", "compvis", "--out", target)
    assert code == 2 and "already exists" in err and "--overwrite" in err and target.read_bytes() == b"keep me"
    code, _, err = run_main(capsys, "--vae", src, "--to", "compvis", "--out", target, "--overwrite")
    assert code == 0, err
    assert read_vae(target).config.latent_channels == 4


@pytest.mark.parametrize("args,expected", [
    (("--to", "compvis", "--out", "{tmp}/folder"), "does not end in .safetensors"),
    (("--to", "compvis", "--out", "{src}", "--overwrite"), "it is the input itself"),
    (("--to", "compvis", "--out", "{tmp}/o.safetensors", "--metadata", "novalue"), "is not KEY=VALUE"),
])
def test_main_rejects_bad_arguments(tmp_path, capsys, args, expected):
    src = write_vae(tmp_path, "sd")
    args = [a.format(tmp=tmp_path, src=src) for a in args]
    code, _, err = run_main(capsys, "--vae", src, *args)
    assert code == 2 and expected in err and err.startswith("error: ")


def test_main_refuses_encoder_only_vae(tmp_path, capsys):
    src = write_vae(tmp_path, "svd", "diffusers", "folder")
    code, out, err = run_main(capsys, "--vae", src, "--to", "compvis", "--out", tmp_path / "svd.safetensors")
    assert code == 2 and "decoder was not loaded" in err
    assert "decoder not loaded" in out  # the note was printed before the refusal
    assert not (tmp_path / "svd.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncate", "nan"])
def test_main_reports_damaged_input(tmp_path, capsys, damage):
    src = write_vae(tmp_path, "sd")
    if damage == "truncate":
        src.write_bytes(src.read_bytes()[:5000])
    else:
        from safetensors.torch import save_file
        sd = load_file(str(src))
        sd["decoder.conv_in.bias"][0] = float("nan")
        save_file(sd, str(src))
    code, _, err = run_main(capsys, "--vae", src, "--to", "diffusers", "--out", tmp_path / "o")
    assert code == 2 and src.name in err
    assert ("truncated" if damage == "truncate" else "decoder.conv_in.bias (1 NaN, 0 inf)") in err
    assert not (tmp_path / "o").exists()
