"""Memory before work: the CPU allocator's failure is out-of-memory too, an encode that would not fit
the memory available is tiled before it starts (and the posterior says why), and one that would not
fit even in the smallest tiles is refused naming its size."""
import pytest
import torch

from vae_fix.codec import model_codec
from vae_fix.errors import InputError
from vae_fix.memory import available_memory, is_out_of_memory
from vae_fix.model import preset_config, random_vae
from vae_fix.posterior import read_posterior


def test_the_cpu_allocators_failure_is_recognised_as_out_of_memory():
    with pytest.raises(RuntimeError) as real:
        torch.empty(2 ** 45)  # 128 TiB: refused by the CPU allocator, not by the kernel's OOM killer
    assert is_out_of_memory(real.value)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_memory_limit_is_read_and_caps_what_is_planned(monkeypatch):
    free = available_memory(torch.device("cpu"))
    assert free is None or free > 0
    monkeypatch.setenv("VAEFIX_MEMORY_LIMIT", "64M")
    assert available_memory(torch.device("cpu")) == 64 * 2 ** 20
    monkeypatch.setenv("VAEFIX_MEMORY_LIMIT", "lots")
    with pytest.raises(InputError, match="VAEFIX_MEMORY_LIMIT"):
        available_memory(torch.device("cpu"))


@pytest.fixture(scope="module")
def codec():
    return model_codec(random_vae(preset_config("sd", small=True), 2))


def test_an_encode_over_the_memory_available_is_tiled_before_it_starts(codec, monkeypatch):
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    need = codec.encode_bytes(tuple(image.shape))
    whole = read_posterior(codec, image)
    assert whole.tiling is None
    monkeypatch.setenv("VAEFIX_MEMORY_LIMIT", str(need // 3))
    tiled = read_posterior(codec, image)
    assert tiled.tiling is not None and tiled.tiling.reason.startswith("memory estimate")
    side = tiled.tiling.tile + 2 * tiled.tiling.overlap
    assert codec.encode_bytes((1, 3, side, side)) <= need // 3 and tiled.tiling.tiles_per_image > 1
    assert any("did not fit: tiled (memory estimate" in n for n in tiled.notes)
    # crop-in-the-middle tiles with context; the mid-block attention sees only its tile, so values
    # move a little everywhere (measured: median 0.008 nats here, against a spread of several nats)
    diff = (tiled.logvar_raw - whole.logvar_raw).abs()
    assert float(diff.median()) < 0.05 and float(diff.max()) < 2.0


def test_an_encode_that_fits_no_tile_is_refused_naming_its_size(codec, monkeypatch):
    monkeypatch.setenv("VAEFIX_MEMORY_LIMIT", "1K")
    with pytest.raises(InputError) as e:
        read_posterior(codec, torch.rand(1, 3, 256, 320))
    assert "256x320 px" in str(e.value) and "VAEFIX_MEMORY_LIMIT" in str(e.value)
