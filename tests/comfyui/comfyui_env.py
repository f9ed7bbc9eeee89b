"""ComfyUI for the integration tests: imported from COMFYUI_PATH on the CPU, never vendored.

`comfyui_models` builds random-weight checkpoints in each architecture's real ComfyUI key layout
through ComfyUI's own model classes and loads them through ComfyUI's own loader.
"""
import os
import sys

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")


def import_comfyui():
    """Import ComfyUI (CPU mode) or skip the calling test module with the reason."""
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set: the ComfyUI integration tests need a ComfyUI checkout",
                    allow_module_level=True)
    if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_patcher.py")):
        pytest.skip(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout", allow_module_level=True)
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    try:
        from comfy.cli_args import args
        args.cpu = True  # before comfy.model_management is imported
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy.utils
        import folder_paths  # noqa: F401
        import nodes  # noqa: F401
    except ImportError as error:
        pytest.skip(f"ComfyUI at {COMFYUI_PATH} does not import here ({error}); install its requirements",
                    allow_module_level=True)
    comfy.utils.PROGRESS_BAR_ENABLED = False
