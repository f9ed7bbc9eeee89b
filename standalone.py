"""Load this folder as a package outside ComfyUI (tests, demo, benchmarks, install step).

ComfyUI imports a custom node folder as a package named after the folder; the code inside uses
relative imports, so outside ComfyUI we register the folder the same way under a fixed name.
"""
import importlib.util
import pathlib
import sys

PACKAGE_NAME = "rt_lynx_pack"
ROOT = pathlib.Path(__file__).resolve().parent


def load_pack():
    """Import the pack (and so `rt_lynx_pack.lynx`, `.kernels`, `.nodes`) without ComfyUI."""
    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE_NAME]
        raise
    return module
