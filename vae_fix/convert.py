"""Convert a VAE file to the CompVis or the diffusers layout, every tensor copied bit for bit.

One call for the CLI (`python -m vae_fix convert`) and the node (Convert VAE File): the output is
checked before anything is read, the source is read and validated strictly, then written
atomically. The result tells what was read and what was written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError
from .loader import VAEFile, read_vae, save_vae
from .result import Result

LAYOUTS = ("compvis", "diffusers")


@dataclass
class ConvertResult(Result):
    source: VAEFile
    written: Path
    layout: str

    json_name = "convert"

    def files(self) -> list[Path]:
        return sorted(self.written.iterdir()) if self.written.is_dir() else [self.written]

    def to_json(self) -> dict:
        files = self.files()
        return {"read": self.source.info(),
                "wrote": {"path": str(self.written), "layout": self.layout, "tensors": len(self.source.state_dict),
                          "bytes": sum(f.stat().st_size for f in files if f.is_file()),
                          "files": [f.name for f in files]}}

    def written_summary(self) -> str:
        wrote = self.to_json()["wrote"]
        return (f"wrote  {self.written}: {self.layout} layout, {wrote['tensors']} tensors unchanged, "
                f"{wrote['bytes'] / 1e6:.1f} MB ({', '.join(wrote['files'])})")

    def summary(self) -> str:
        return f"read   {self.source.summary()}\n{self.written_summary()}"


def convert_vae(source, to: str, out, *, metadata: Optional[dict] = None, overwrite: bool = False,
                on_read: Optional[Callable[[VAEFile], None]] = None, out_name: str = "out",
                overwrite_name: str = "overwrite=True") -> ConvertResult:
    """Read `source` (any file or folder `read_vae` takes) and write it to `out` in layout `to`.

    `metadata` is merged into the source's safetensors metadata. `on_read(file)` is called once the
    source is validated, before writing (the CLI prints what it read, so a refused write still shows
    the loader's notes). `out_name`/`overwrite_name` are how errors name the output and the
    permission to replace it (a CLI flag, a node input).
    """
    source, out = Path(source), Path(out)
    if to not in LAYOUTS:
        raise InputError("layout", f"{to!r} is not a layout this can write", "'compvis' or 'diffusers'")
    if to == "compvis" and out.suffix != ".safetensors":
        raise InputError(out_name, f"'{out}' does not end in .safetensors", "a .safetensors path for the CompVis layout")
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise InputError(out_name, "it is the input itself", "a different path (the input is never modified)")
    if out.exists() and not overwrite:
        raise InputError(out_name, f"'{out}' already exists", f"a new path, or {overwrite_name} to replace it")
    vae = read_vae(source)
    if on_read is not None:
        on_read(vae)
    return ConvertResult(vae, save_vae(vae, out, layout=to, metadata=metadata), to)
