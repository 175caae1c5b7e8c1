"""VAE Fix engine: load any KL VAE safely, read its raw posterior, find and fix its anomalies.

Plain torch; never imports ComfyUI. Submodules are imported on demand to keep the CLI quick.
"""
__version__ = "0.1.0"
