"""Build and load the RT-Lynx CUDA extension (cuSPARSELt binding + fused kernels).

Compiled once with torch.utils.cpp_extension (ninja) for sm_90a and cached in
$RT_LYNX_BUILD_DIR or ~/.cache/rt_lynx/<torch>-<cuda>. cuSPARSELt's header and library come from
the nvidia-cusparselt wheel that CUDA builds of torch depend on.
"""
import glob
import logging
import os
import pathlib
import shutil
import threading
import time

log = logging.getLogger("rt_lynx")

EXTENSION_NAME = "rt_lynx_ext"
CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "cusparselt_ext.cpp", CSRC / "lynx_kernels.cu"]
HEADERS = [CSRC / "lynx_kernels.h"]
EXPECTED_BUILD_SECONDS = 60

_lock = threading.Lock()
_module = None
_error = None


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message is one line for the user."""


def build_dir() -> pathlib.Path:
    configured = os.environ.get("RT_LYNX_BUILD_DIR")
    if configured:
        return pathlib.Path(configured).expanduser()
    import torch
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return pathlib.Path.home() / ".cache" / "rt_lynx" / tag


def find_cusparselt() -> tuple[pathlib.Path, pathlib.Path]:
    """(folder with cusparseLt.h, folder with libcusparseLt.so.0) from the installed wheel.

    The wheel layout moved between releases (nvidia/cusparselt/ in 0.8, nvidia/cu13/ later), so
    search every folder of the `nvidia` namespace package.
    """
    try:
        import nvidia
    except ImportError as exc:
        raise BuildError("cuSPARSELt not found: the 'nvidia' wheels of CUDA torch are not "
                         "installed (pip install nvidia-cusparselt-cu13)") from exc
    for root in list(getattr(nvidia, "__path__", [])):
        for header in sorted(glob.glob(os.path.join(root, "*", "include", "cusparseLt.h"))):
            include_dir = pathlib.Path(header).parent
            lib_dir = include_dir.parent / "lib"
            if (lib_dir / "libcusparseLt.so.0").exists():
                return include_dir, lib_dir
    raise BuildError("cuSPARSELt not found: no nvidia/*/include/cusparseLt.h with "
                     "lib/libcusparseLt.so.0 beside it (pip install nvidia-cusparselt-cu13)")


def _stage_headers(include_dir: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    # Only cuSPARSELt's headers go on the include path: the wheel folder (nvidia/cu13/include)
    # can also hold other CUDA headers that must not shadow the toolkit's.
    staged = target / "cusparselt_include"
    staged.mkdir(parents=True, exist_ok=True)
    for header in include_dir.glob("cusparseLt*.h"):
        destination = staged / header.name
        if not destination.exists() or destination.read_bytes() != header.read_bytes():
            shutil.copyfile(header, destination)
    return staged


def _needs_compile(target: pathlib.Path) -> bool:
    built = target / f"{EXTENSION_NAME}.so"
    if not built.exists():
        return True
    newest_source = max(p.stat().st_mtime for p in SOURCES + HEADERS)
    return built.stat().st_mtime < newest_source


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()[:300]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "unknown error"


def load_extension(verbose: bool = False):
    """Build (first time) and import the extension; raises BuildError with a one-line reason."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise BuildError(_error)
        try:
            _module = _build_and_load(verbose)
            return _module
        except BuildError as exc:
            _error = str(exc)
            raise
        except Exception as exc:  # compiler output, import errors: keep one line for the user
            _error = f"build failed: {_first_error_line(str(exc))}"
            raise BuildError(_error) from exc


def _build_and_load(verbose: bool):
    import torch
    from torch.utils import cpp_extension
    if not torch.cuda.is_available():
        raise BuildError("no CUDA device visible to torch")
    if torch.version.cuda is None:
        raise BuildError("this torch build has no CUDA")
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
            os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")):
        raise BuildError("no CUDA compiler (nvcc) found: install the CUDA toolkit matching "
                         f"torch's CUDA {torch.version.cuda}")
    if shutil.which("ninja") is None:
        raise BuildError("ninja not found (pip install ninja)")
    include_dir, lib_dir = find_cusparselt()
    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    staged = _stage_headers(include_dir, target)
    compiling = _needs_compile(target)
    if compiling:
        log.warning("building RT-Lynx CUDA kernels (one time, ~%d s) in %s ...",
                    EXPECTED_BUILD_SECONDS, target)
    started = time.monotonic()
    previous_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    # cpp_extension turns "9.0a" into -gencode=arch=compute_90a,code=sm_90a.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    try:
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(s) for s in SOURCES],
            extra_include_paths=[str(staged), str(CSRC)],
            # RT_LYNX_DEBUG_BUILD=1 adds host debug info (readable backtraces in cuda-gdb).
            extra_cflags=["-O3"] + (["-g"] if os.environ.get("RT_LYNX_DEBUG_BUILD") else []),
            extra_cuda_cflags=["-O3", "-lineinfo"],
            extra_ldflags=[f"-L{lib_dir}", "-l:libcusparseLt.so.0", f"-Wl,-rpath,{lib_dir}"],
            build_directory=str(target),
            verbose=verbose,
            is_python_module=True,
        )
    finally:
        if previous_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous_arch
    if compiling:
        log.warning("RT-Lynx CUDA kernels built in %.0f s", time.monotonic() - started)
    return module


def build(verbose: bool = False) -> tuple[bool, str]:
    """Build ahead of time (install step). Never raises: (ok, one-line reason)."""
    try:
        load_extension(verbose)
    except BuildError as exc:
        return False, str(exc)
    except Exception as exc:  # an install step must not fail on anything unexpected either
        return False, f"build failed: {_first_error_line(str(exc))}"
    return True, f"built in {build_dir()}"
