"""Fixtures shared by the ComfyUI integration tests (each test module imports ComfyUI first, and
skips without it)."""
import pytest


@pytest.fixture(scope="module")
def flux():
    """Tiny FLUX (real widths, one double and one single block, random weights) through ComfyUI's loader."""
    import comfy.model_management
    from comfyui_models import load_flux
    patcher = load_flux()
    yield patcher
    comfy.model_management.unload_all_models()
