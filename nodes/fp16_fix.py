"""VAE fp16 Fix: the same VAE with its weights rescaled so half precision cannot overflow, fp32
outputs unchanged, proven on the probes; optionally saved to models/vae (engine: `vae_fix.fp16_fix`)."""
from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..vae_fix import loader
from ..vae_fix.builders.planted import demo_image
from ..vae_fix.errors import InputError
from ..vae_fix.fp16_fix import DEFAULT_HEADROOM, fixed_file, fp16_fix
from ..vae_fix.probes import check_sizes, probe_images
from ..vae_fix.result import write_file_atomically
from . import host, wire


class VAEFp16Fix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixFp16Fix",
            display_name="VAE fp16 Fix",
            category="VAE Fix/loaders",
            description=("Rescales a KL VAE's weights exactly (every GroupNorm ignores the scale of its input) so no "
                         "activation on the built-in probes exceeds fp16's range over `headroom`: black or NaN images "
                         "from half precision go away, fp32 outputs stay the same. Proven before it is handed on: fp16 "
                         "must be finite and at least 40 dB from fp32, else the node stops and names the layer."),
            inputs=[
                io.Vae.Input("vae", tooltip="A KL VAE (Load VAE, Load VAE (strict), a checkpoint's VAE); it is not changed."),
                io.Float.Input("headroom", default=DEFAULT_HEADROOM, min=1.0, max=1024.0, step=1.0,
                               tooltip="Activations are kept under 65504 / headroom, for images the probes did not cover."),
                io.Combo.Input("dtype", options=list(host.DTYPES), default="fp16",
                               tooltip="Precision the fixed VAE runs in (fp16: what the fix is for)."),
                io.String.Input("probe_sizes", default="128, 256", optional=True,
                                tooltip="Sizes (px) of the built-in probes the scales are measured on and the proof runs on. "
                                        "On a CPU without native fp16 the proof is slow: smaller sizes are much quicker."),
                io.Int.Input("check_size", default=512, min=64, max=4096, step=64, optional=True,
                             tooltip="Side (px) of the held-out picture the proof also runs on (one the scales never saw)."),
                io.String.Input("save_as", default="", optional=True,
                                tooltip="Also write the fixed VAE to models/vae under this new name (a .safetensors file, CompVis layout); empty: do not save."),
            ],
            outputs=[
                io.Vae.Output("fixed_vae", display_name="VAE", tooltip="The fixed VAE, a normal ComfyUI VAE."),
                io.String.Output("report", display_name="report", tooltip="JSON: factors, peaks before/after, the proof."),
                io.Image.Output("plot", display_name="plot",
                                tooltip="Largest activation per layer before (grey) and after (orange), against fp16's limit."),
            ],
        )

    @classmethod
    def execute(cls, vae, headroom, dtype, probe_sizes="128, 256", check_size=512, save_as="") -> io.NodeOutput:
        target = host.new_vae_path(save_as) if save_as.strip() else None
        (check,) = check_sizes([check_size], "check_size")
        images, names = probe_images(check_sizes(probe_sizes, "probe_sizes"))
        source = loader.vae_from_state_dict(host.kl_state_dict(vae), "the VAE input")
        result = fp16_fix(loader.build_model(source).model, images, names, held_out=[demo_image(check, check, None)],
                          held_out_names=[f"demo@{check}"], headroom=headroom, progress=host.progress_fn())
        if not result.safe:
            raise InputError("vae", "no exact rescaling makes it safe in fp16: " + "; ".join(result.limits or [result.summary()]),
                             "a VAE whose every activation can be rescaled (the report lists the layers)")
        fixed = fixed_file(result, source)
        if target:
            write_file_atomically(target, lambda path: loader.save_vae(fixed, path))
        plot = wire.images_to_batch([result.pictures()["activations"]])
        return io.NodeOutput(host.to_host_vae(fixed, dtype), result.json_text(), plot, ui=ui.PreviewImage(plot, cls=cls))


NODES = [VAEFp16Fix]
