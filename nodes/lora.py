"""The "Load Lynx LoRA" node."""
import logging
import os

from ..lynx import attach_lora, load_lynx_lora
from .comfy_glue import install_plan, installed_plan, lynx_lora_folder, lynx_lora_names

log = logging.getLogger("rt_lynx")


class RTLynxLoadLoRA:
    CATEGORY = "RT-Lynx"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = ("Adds a Lynx compensation LoRA to a model patched by RT-Lynx Sparsify Model: a low-rank branch on "
                   "the dense input of each sparsified layer, and / or a folded part, a low-rank change of those "
                   "layers' weights (a ComfyUI weight patch, no run-time cost). Files live in models/loras/lynx.")

    @classmethod
    def INPUT_TYPES(cls):
        lynx_lora_folder()
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (lynx_lora_names(), {"tooltip": "A Lynx LoRA file (made by RT-Lynx calibration)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05}),
        }}

    _cache: dict = {}

    @classmethod
    def _load(cls, path):
        key = (path, os.path.getmtime(path))
        if key not in cls._cache:
            cls._cache.clear()  # one file at a time: they can be large
            cls._cache[key] = load_lynx_lora(path)
        return cls._cache[key]

    def load(self, model, lora_name, strength):
        import folder_paths

        plan = installed_plan(model)
        if plan is None:
            raise ValueError("Load Lynx LoRA needs a model from RT-Lynx Sparsify Model: connect that node first")
        if strength == 0:
            return (model,)
        lora = self._load(folder_paths.get_full_path_or_raise("loras", lora_name))
        new_plan = attach_lora(plan, lora, strength)
        log.info(new_plan.summary())
        return (install_plan(model, new_plan),)
