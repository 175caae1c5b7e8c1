"""The finiteness check (vae_fix/finite.py) on tensors as a real safetensors file maps them: merged
into a few long sums, exact wherever a sum is not finite, and never reading memory it does not hold."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vae_fix.containers import read_container
from vae_fix.errors import VAELoadError
from vae_fix.finite import _back_to_back, check_built, check_finite


def mapped(tmp_path, tensors: dict) -> dict:
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return read_container(path).tensors


def test_a_mapped_file_of_one_dtype_is_read_as_one_run_holding_every_value(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = mapped(tmp_path, {f"t{i}": torch.randn(3 + i, 5, generator=g) for i in range(40)})
    runs = _back_to_back(sd.values())
    assert len(runs) == 1 and runs[0].numel() == sum(t.numel() for t in sd.values())
    assert torch.equal(runs[0].sort().values, torch.cat([t.reshape(-1) for t in sd.values()]).sort().values)


def test_dtypes_break_runs_and_copies_or_views_are_read_alone():
    a, b = torch.randn(10), torch.randn(4, dtype=torch.float16)
    view = torch.randn(6, 6)[:, ::2]  # not contiguous
    runs = _back_to_back([a, b, view, a[2:5]])
    assert sorted(r.numel() for r in runs) == [3, 4, 10, 18]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_nan_anywhere_in_a_mapped_file_is_found_and_named(tmp_path, where):
    tensors = {f"t{i}": torch.ones(64, 9) for i in range(12)}
    key, index = {"first": ("t0", 0), "middle": ("t6", 300), "last": ("t11", 575)}[where]
    tensors[key].view(-1)[index] = float("nan")
    with pytest.raises(VAELoadError, match=rf"1 tensors contain NaN.*{key} \(1 NaN, 0 inf\)"):
        check_finite(mapped(tmp_path, tensors), "w.safetensors")


def test_finite_values_whose_sum_overflows_pass_and_infinity_of_either_sign_does_not(tmp_path):
    huge = torch.full((4096,), 3e38)  # finite; their float32 sum is inf
    check_finite(mapped(tmp_path, {"a": huge, "b": -huge}), "huge.safetensors")
    for value in (float("inf"), float("-inf")):
        bad = huge.clone()
        bad[9] = value
        with pytest.raises(VAELoadError, match=r"a \(0 NaN, 1 inf\)"):
            check_finite({"a": bad, "b": -huge}, "inf.safetensors")


def test_a_model_in_float16_with_weights_beyond_its_range_is_refused_naming_them():
    layer = torch.nn.Linear(4, 2)
    with torch.no_grad():
        layer.bias[0] = 1e6
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    check_built(layer, sd, "wide.safetensors")  # float32: in range
    with pytest.raises(VAELoadError, match=r"finite in the file but overflow.*bias \(torch\.float16\)"):
        check_built(layer.half(), sd, "wide.safetensors")
