"""VAE Fix engine: load any KL VAE safely, read its raw posterior, find and fix its anomalies.

Plain torch; never imports ComfyUI. The public API, imported on first use to keep the CLI quick:

    from vae_fix import load_vae, VAELoadError
    vae = load_vae("vae.safetensors")          # strict: every weight checked, no pickle ever run
    result = inspect_vae(vae.codec())           # the verdict on the built-in probe images
"""
__version__ = "0.1.0"

_PUBLIC = {  # name -> the submodule that defines it
    "load_vae": "loader", "read_vae": "loader", "save_vae": "loader", "LoadedVAE": "loader", "VAEFile": "loader",
    "VAELoadError": "errors", "InputError": "errors", "VAEFixError": "errors",
    "inspect_vae": "inspect", "read_posterior": "posterior", "safe_decode": "safe", "safe_encode": "safe",
    "fp16_fix": "fp16_fix",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vae_fix' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
