"""The random-weight model builders live in bench/comfy_models.py (the end-to-end benchmark uses
the same ones); the tests import them from here."""
import pathlib
import sys

BENCH = str(pathlib.Path(__file__).resolve().parents[2] / "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from comfy_models import (ARCHS, build_model, conditioning, empty_latent, flux_conditioning,  # noqa: E402,F401
                          load_flux, load_model, randomize_, sample, state_dict)


def watch_each_step(patcher, probe):
    """A list that gets probe()'s value at every denoising step of `patcher`'s sampling runs (an
    APPLY_MODEL wrapper on that clone), to see the per-run state while it exists."""
    from comfy.patcher_extension import WrappersMP
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append(probe())
        return executor(*args, **kwargs)
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "rt_lynx_test_watch", wrapper)
    return seen
