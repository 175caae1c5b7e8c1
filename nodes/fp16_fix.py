"""VAE fp16 Fix: the same VAE with its weights rescaled so half precision cannot overflow, fp32
outputs unchanged, proven on the probes; optionally saved to models/vae (engine: `vae_fix.fp16_fix`)."""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix.fp16_fix import DEFAULT_HEADROOM
from ..vae_fix.fp16_tune import TuneSettings
from ..vae_fix.probes import check_sizes
from ..vae_fix.result import write_file_atomically
from . import host, host_fp16, wire


class VAEFp16Fix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixFp16Fix",
            display_name="VAE fp16 Fix",
            category="VAE Fix/loaders",
            description=("Rescales a VAE's weights exactly (every GroupNorm or RMS norm ignores the scale of its input) "
                         "so no activation on the built-in probes exceeds fp16's range over `headroom`: black or NaN "
                         "images from half precision go away, fp32 outputs stay the same. Proven before it is handed on: "
                         "fp16 must be finite and at least 40 dB from fp32, else the node stops and names the layer. "
                         "Covers KL VAEs (SD1.x/2.x, SDXL, SD3, Flux, retrained), HunyuanVideo 1.0 and Wan 2.1 / "
                         "Qwen-Image / 2.2 (video VAEs: proven on one-frame clips, fp16 emulated on a CPU); other families "
                         "are refused, saying why."),
            inputs=[
                io.Vae.Input("vae", tooltip="A VAE of a covered family (Load VAE, Load VAE (strict), a checkpoint's VAE); it is not changed."),
                io.Float.Input("headroom", default=DEFAULT_HEADROOM, min=1.0, max=1024.0, step=1.0,
                               tooltip="Activations are kept under 65504 / headroom, for images the probes did not cover."),
                io.Combo.Input("dtype", options=list(host.DTYPES), default="fp16",
                               tooltip="Precision the fixed VAE runs in (fp16: what the fix is for)."),
                io.String.Input("probe_sizes", default="128, 256", optional=True,
                                tooltip="Sizes (px) of the built-in probes the scales are measured on and the proof runs on. "
                                        "On a CPU without native fp16 the proof is slow: smaller sizes are much quicker."),
                io.Int.Input("check_size", default=512, min=64, max=4096, step=64, optional=True,
                             tooltip="Side (px) of the held-out picture the proof also runs on (one the scales never saw)."),
                io.Int.Input("finetune_steps", default=0, min=0, max=100000, optional=True,
                             tooltip="KL VAEs: where a layer stays over the bound (a norm whose own output is too large; "
                                     "no exact rescaling reaches it), fine-tune that layer and the ones reading it for this "
                                     "many steps, the outputs held to the original's fp32, then prove it the same way (not "
                                     "exact: the report gives the fp32 differences). 0: refuse such a VAE instead."),
                io.String.Input("save_as", default="", optional=True,
                                tooltip="Also write the fixed VAE to models/vae under this new name (a .safetensors file: CompVis layout for KL VAEs, the host's own names for video VAEs); empty: do not save."),
            ],
            outputs=[
                io.Vae.Output("fixed_vae", display_name="VAE", tooltip="The fixed VAE, a normal ComfyUI VAE."),
                io.String.Output("report", display_name="report", tooltip="JSON: factors, peaks before/after, the proof."),
                io.Image.Output("plot", display_name="plot",
                                tooltip="Largest activation per layer before (grey) and after (orange), against fp16's limit."),
            ],
        )

    @classmethod
    def execute(cls, vae, headroom, dtype, probe_sizes="128, 256", check_size=512, finetune_steps=0,
                save_as="") -> io.NodeOutput:
        target = host.new_vae_path(save_as) if save_as.strip() else None
        result, fixed_vae, save = host_fp16.fix_vae(vae, check_sizes(probe_sizes, "probe_sizes"),
                                                    check_sizes([check_size], "check_size"), headroom, dtype,
                                                    TuneSettings(steps=finetune_steps) if finetune_steps else None)
        if target:
            write_file_atomically(target, save)
        plot = wire.images_to_batch([result.pictures()["activations"]])
        return io.NodeOutput(fixed_vae, result.json_text(), plot, ui=ui.PreviewImage(plot, cls=cls))


NODES = [VAEFp16Fix]
