"""The "RT-Lynx Calibrate LoRA" node: fits a Lynx LoRA for a sparsified model in closed form."""
import logging
import os
import re
from contextlib import contextmanager

from ..lynx import attach_lora, load_lynx_lora, save_lynx_lora
from ..lynx.calibration import calibrate_lynx_lora, uncalibrated_layers
from .comfy_glue import install_plan, installed_plan, lynx_lora_folder

log = logging.getLogger("rt_lynx")

# Off by default: in bench/quality.py a folded part helps where the calibration data is like what
# the model later sees (digits DiT: +0.5-0.9 dB under the runtime branch; MiniLM on held-out
# sentences of the calibration's domain) but costs in another domain (DiT calibrated on one digit,
# MiniLM's everyday sentences), where the runtime branch alone helps most.
FOLDED_RANK_DEFAULT = 0


def safe_file_name(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._") or "lynx_lora"
    return stem if stem.endswith(".safetensors") else stem + ".safetensors"


# Options that tie a conditioning to its own region or part of the schedule, or to its own tokens:
# the other calibration prompts do not take them from the positive one.
PROMPT_OWN_OPTIONS = {"area", "mask", "mask_strength", "set_area_to_bounds", "strength", "start_percent",
                      "end_percent", "attention_mask"}


def prompt_lines(more_prompts: str) -> list[str]:
    return [line.strip() for line in more_prompts.splitlines() if line.strip()]


def calibration_prompts(positive, clip, lines: list[str]) -> list:
    """The positive conditioning, then one per line, encoded by `clip` and given the positive one's
    options that encoding does not set (FluxGuidance's guidance, a ControlNet, reference latents)."""
    if not lines:
        return [positive]
    if clip is None:
        raise ValueError("more_prompts needs the clip input to encode them: connect the model's CLIP")
    if len(positive) != 1:
        raise ValueError(f"more_prompts needs a positive conditioning of one prompt (this one combines "
                         f"{len(positive)}): the others would not know which one's options to take")
    import node_helpers
    import nodes

    prompts = [positive]
    for line in lines:
        encoded = nodes.CLIPTextEncode().encode(clip, line)[0]
        options = {key: value for key, value in positive[0][1].items()
                   if key not in encoded[0][1] and key not in PROMPT_OWN_OPTIONS}
        prompts.append(node_helpers.conditioning_set_values(encoded, options))
    return prompts


class RTLynxCalibrateLoRA:
    CATEGORY = "RT-Lynx"
    FUNCTION = "calibrate"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "lora_name")
    DESCRIPTION = ("Fits a Lynx LoRA that cancels the 2:4 sparsification error of each sparsified layer, from the "
                   "layer inputs the sparse model sees while sampling the given conditioning (closed-form least "
                   "squares, no training). Writes it to models/loras/lynx and returns the model with it attached. "
                   "Two parts: a branch of rank `rank` computed on the dense input at run time (the paper's; a few "
                   "percent slower), and one of rank `folded_rank` added to the weights, acting on the sparse input "
                   "(free at run time; cancels less at equal rank). Either may be 0. Calibrate on prompts like those "
                   "you will generate (more_prompts): a LoRA fitted on one kind of image cancels less on others.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A model from RT-Lynx Sparsify Model."}),
            "positive": ("CONDITIONING",),
            "latent_image": ("LATENT", {"tooltip": "Sets the image size the calibration samples at."}),
            "rank": ("INT", {"default": 32, "min": 0, "max": 512, "tooltip":
                     "Rank of the branch computed on the dense input at run time (0: none)."}),
            "samples": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip":
                        "Sampling runs (seeds seed, seed+1, ...) whose layer inputs are collected; they take the "
                        "prompts in turn, so at least one per prompt."}),
            "timesteps": ("INT", {"default": 8, "min": 1, "max": 100,
                          "tooltip": "Steps of each run: the sigmas of the model's schedule it visits."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip":
                     "Seed of the first run (run i: seed + i). Set the control after it to fixed: another seed "
                     "calibrates anew each time the graph is queued."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1}),
            "stats_memory_gb": ("FLOAT", {"default": 16.0, "min": 0.1, "max": 1024.0, "step": 0.5, "tooltip":
                                "Bound on the statistics held at once (2 K^2 per layer); more layers than fit "
                                "take more sampling passes."}),
            "filename": ("STRING", {"default": "lynx_lora"}),
            "folded_rank": ("INT", {"default": FOLDED_RANK_DEFAULT, "min": 0, "max": 512, "tooltip":
                            "Rank of the part added to the weights (acting on the sparse input, no run-time cost; "
                            "0: none). Fitted first, then the runtime branch on top: twice the sampling passes. "
                            "Helps when calibrating on prompts like those you will generate; can hurt on others."}),
        }, "optional": {
            "negative": ("CONDITIONING",),
            "clip": ("CLIP", {"tooltip": "Encodes more_prompts."}),
            "more_prompts": ("STRING", {"multiline": True, "default": "", "tooltip":
                             "More calibration prompts, one per line (needs clip), sampled after the positive one; "
                             "they take its options (e.g. FluxGuidance)."}),
        }}

    def calibrate(self, model, positive, latent_image, rank, samples, timesteps, seed, cfg, stats_memory_gb,
                  filename, folded_rank=FOLDED_RANK_DEFAULT, negative=None, clip=None, more_prompts=""):
        import comfy.utils
        import nodes

        plan = installed_plan(model)
        if plan is None:
            raise ValueError("RT-Lynx Calibrate LoRA needs a model from RT-Lynx Sparsify Model: connect that node first")
        if negative is None and cfg != 1.0:
            raise ValueError("cfg other than 1 needs the negative conditioning")
        negative = negative if negative is not None else []
        lines = prompt_lines(more_prompts)
        if samples < 1 + len(lines):
            raise ValueError(f"{1 + len(lines)} calibration prompts but samples is {samples}: set samples to at "
                             f"least {1 + len(lines)} so that each prompt is sampled")
        prompts = calibration_prompts(positive, clip, lines)

        @contextmanager
        def on_clone(capture_plan):
            # ComfyUI's object patches put the capturing forwards in place, as for any Lynx plan.
            yield install_plan(model, capture_plan)

        def sample_once(patched, run):
            run_seed, run_positive = run
            nodes.common_ksampler(patched, run_seed, timesteps, cfg, "euler", "simple", run_positive, negative,
                                  latent_image, denoise=1.0)

        bar = comfy.utils.ProgressBar(samples + len(plan.forwards))

        def progress(state):
            total = state.passes * samples + state.layers_total
            bar.update_absolute(state.pass_index * samples + state.samples_done + state.layers_fitted, total)

        lora = calibrate_lynx_lora(model.get_model_object("diffusion_model"), plan,
                                   [(seed + i, prompts[i % len(prompts)]) for i in range(samples)], rank=rank,
                                   run=sample_once, install=on_clone,
                                   memory_budget_bytes=int(stats_memory_gb * 1024 ** 3), progress=progress,
                                   folded_rank=folded_rank)
        name = safe_file_name(filename)
        folder = lynx_lora_folder()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        save_lynx_lora(lora, path)
        # Attach what the file holds (bf16), so this output and Load Lynx LoRA on the file agree exactly.
        lora = load_lynx_lora(path)
        new_plan = attach_lora(plan, lora, 1.0)
        log.info("RT-Lynx: calibrated %s on %d sampling runs x %d steps; %s", name, samples, timesteps,
                 new_plan.summary())
        skipped = uncalibrated_layers(plan, lora)
        if skipped:
            # Usually the text stream of a short prompt: fewer tokens than min_tokens run dense.
            log.warning("RT-Lynx: %d of %d sparsified layers never ran sparse during calibration (inputs below %d "
                        "tokens compute dense) and get no LoRA branch: %s%s", len(skipped), len(plan.forwards),
                        plan.config.min_tokens, ", ".join(skipped[:6]), " ..." if len(skipped) > 6 else "")
        return (install_plan(model, new_plan), f"lynx/{name}")
