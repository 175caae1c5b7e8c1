"""Latent files that are empty, absurd or hostile: refused by name with exit 2 before any output
folder is written (the stats command, whose histogram would grow with the channel count)."""
import pytest
import torch
from safetensors.torch import save_file

from run_cli import run_cli


@pytest.mark.parametrize("shape", [(0, 4, 8, 8), (1, 0, 8, 8), (1, 4, 0, 8), (1, 5000, 2, 2)],
                         ids=["zero-batch", "zero-channels", "zero-height", "5000-channels"])
def test_empty_or_absurd_latents_are_refused_before_any_output(tmp_path, shape):
    path = tmp_path / "z.latent"
    save_file({"latent_tensor": torch.zeros(shape), "latent_format_version_0": torch.tensor([])}, str(path))
    out = tmp_path / "out"
    r = run_cli("stats", "--latent", str(path), "--out", str(out))
    assert r.returncode == 2 and "z.latent" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert str(list(shape)) in r.stderr and not out.exists()


def test_a_latent_with_a_hostile_header_is_refused_by_name(tmp_path):
    path = tmp_path / "deep.latent"
    header = b'{"latent_tensor": ' + b"[" * 100_000 + b"}"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    r = run_cli("stats", "--latent", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "deep.latent" in r.stderr and "nested too deeply" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
