"""The random-weight model builders live in bench/comfy_models.py (the end-to-end benchmark uses
the same ones); the tests import them from here."""
import pathlib
import sys

BENCH = str(pathlib.Path(__file__).resolve().parents[2] / "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from comfy_models import (ARCHS, build_model, conditioning, empty_latent, flux_conditioning,  # noqa: E402,F401
                          load_flux, load_model, randomize_, sample, state_dict)
