"""Run by ComfyUI-Manager after `pip install -r requirements.txt`: build the RT-Lynx CUDA kernels
ahead of time so the first generation does not wait for the compiler.

Never fails the install: without a GPU, a compiler or cuSPARSELt it prints one line saying so and
the pack runs on its reference path (kernels are then built on first use if that changes).
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent


def main() -> int:
    try:
        sys.path.insert(0, str(ROOT))
        from standalone import load_pack
        load_pack()
        from rt_lynx_pack.kernels import build, cusparselt  # noqa: F401  (defines the ops first)
        ok, reason = build.build(verbose=False)
        if ok:
            print(f"RT-Lynx: CUDA kernels ready ({reason})")
        else:
            print(f"RT-Lynx: fast kernels not built, the reference path will be used: {reason}")
    except Exception as exc:  # an install step must never fail the install
        print(f"RT-Lynx: fast kernels not built, the reference path will be used: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
