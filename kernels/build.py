"""Build and load the RT-Lynx CUDA code: the sm90 sparse GEMM library and the torch extension.

Two artefacts, both built with ninja for sm_90a and cached:
- the sm90 sparse GEMM library (CUTLASS kernels behind a C interface, csrc/sm90_sparse_gemm*.cu):
  minutes to compile and torch-independent, so it is keyed by its sources, the CUTLASS headers
  (PyPI `nvidia-cutlass`) and the nvcc version, in <cache>/sm90-<hash>/ (a torch upgrade keeps it);
- the torch extension (ops, sparsify kernels, cuSPARSELt binding) in <build dir>, which loads
  the library with dlopen; imported as built while the digest of its inputs beside it matches
  (a copied build folder, sources checked out anew with the same bytes), else built by ninja.
  Without the library (no CUTLASS headers, a failed build) the extension still serves the
  cuSPARSELt path and the log says why.
<cache> is $RT_LYNX_BUILD_DIR or ~/.cache/rt_lynx; <build dir> is $RT_LYNX_BUILD_DIR or
<cache>/<torch>-<cuda>. cuSPARSELt's header and library come from the nvidia-cusparselt wheel that
CUDA builds of torch depend on.
"""
import glob
import hashlib
import importlib.util
import logging
import os
import pathlib
import shutil
import subprocess
import threading
import time

log = logging.getLogger("rt_lynx")

EXTENSION_NAME = "rt_lynx_ext"
CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "cusparselt_ext.cpp", CSRC / "sm90_ops.cpp", CSRC / "lynx_kernels.cu", CSRC / "block_ops.cpp",
           CSRC / "block_elementwise.cu", CSRC / "e4m3_weight_gemv.cu", CSRC / "e4m3_gemm_residual.cpp"]
HEADERS = [CSRC / "lynx_kernels.h", CSRC / "half_words.cuh", CSRC / "op_checks.h", CSRC / "block_elementwise.h",
           CSRC / "sm90_metadata_layout.h",
           CSRC / "sm90_sparse_gemm.h"]
EXPECTED_BUILD_SECONDS = 60
DIGEST_FILE = f"{EXTENSION_NAME}.digest"   # beside the built library: extension_digest of its inputs
# One translation unit per pair of elements and epilogue, so ninja compiles the CUTLASS instances in parallel.
SM90_SOURCES = [CSRC / f"sm90_sparse_gemm_{part}.cu" for part in (
    "api", "bf16_bf16", "fp16_fp16", "e4m3_bf16", "e4m3_fp16",
    "bf16_bf16_residual", "fp16_fp16_residual", "e4m3_bf16_residual", "e4m3_fp16_residual")]
SM90_HEADERS = [CSRC / "sm90_sparse_gemm.h", CSRC / "sm90_sparse_gemm_impl.cuh", CSRC / "sm90_k_extended_mainloop.cuh",
                CSRC / "sm90_overlapped_sparse_mma.cuh",
                CSRC / "sm90_metadata_layout.h"]
SM90_NVCC_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a",
                   "--expt-relaxed-constexpr", "-Xcompiler=-fPIC", "-lineinfo",
                   # griddepcontrol in CUTLASS's kernels: a programmatic launch waits before its loads
                   "-DCUTLASS_ENABLE_GDC_FOR_SM90"]
SM90_EXPECTED_BUILD_MINUTES = 4

_lock = threading.Lock()
_module = None
_error = None
_sm90_status = "not loaded"   # "" once the sm90 GEMM library is loaded, else why not


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message is one line for the user."""


def cache_root() -> pathlib.Path:
    """$RT_LYNX_BUILD_DIR, else ~/.cache/rt_lynx: the sm90 GEMM library lives here directly."""
    configured = os.environ.get("RT_LYNX_BUILD_DIR")
    return pathlib.Path(configured).expanduser() if configured else pathlib.Path.home() / ".cache" / "rt_lynx"


def build_dir() -> pathlib.Path:
    """The torch extension's folder: $RT_LYNX_BUILD_DIR, else one per torch and CUDA version."""
    if os.environ.get("RT_LYNX_BUILD_DIR"):
        return cache_root()
    import torch
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return cache_root() / tag


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


def find_cublaslt() -> tuple[pathlib.Path, str]:
    """(folder, file name) of the cuBLASLt library torch's CUDA wheels bring (nvidia/cu13/lib, or
    nvidia/cublas/lib in older layouts): the dense e4m3 GEMM with a residual calls it directly."""
    import nvidia
    for root in list(getattr(nvidia, "__path__", [])):
        for library in sorted(glob.glob(os.path.join(root, "*", "lib", "libcublasLt.so.*"))):
            return pathlib.Path(library).parent, pathlib.Path(library).name
    raise BuildError("cuBLASLt not found: no nvidia/*/lib/libcublasLt.so.* (the CUDA wheels torch depends on)")


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


def extension_inputs(staged_headers: pathlib.Path) -> list[pathlib.Path]:
    """The files the extension is built from: every file in csrc/, this file, cuSPARSELt's staged headers."""
    paths = sorted(CSRC.iterdir()) + [pathlib.Path(__file__).resolve()] + sorted(staged_headers.glob("*.h"))
    return [path for path in paths if path.is_file()]


def extension_digest(inputs: list[pathlib.Path], flags: list[str]) -> str:
    """What the built extension is made of: the bytes of its `inputs` (extension_inputs), torch's,
    CUDA's and Python's versions, nvcc's and the build flags."""
    import sys

    import torch
    digest = hashlib.sha256()
    for path in inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(repr((torch.__version__, torch.version.cuda, tuple(sys.version_info[:2]), flags)).encode())
    digest.update(subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout.encode())
    return digest.hexdigest()


def _built_from(target: pathlib.Path, digest: str, inputs: list[pathlib.Path]):
    """The extension in `target`, imported, where it was built from inputs of this digest; else None,
    no digest left there until a build writes it, and no library or objects where ninja, which
    compares times, would keep them: one that did not load, or inputs whose bytes changed but not
    their times (files copied with their times)."""
    built, stamp = target / f"{EXTENSION_NAME}.so", target / DIGEST_FILE
    if built.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        try:
            return _import_built(built)
        except Exception as exc:   # built again
            log.warning("RT-Lynx: the built kernels in %s did not load (%s); building them again", target,
                        _first_error_line(str(exc)))
            _remove_outputs(target)
    elif built.exists() and built.stat().st_mtime >= max(path.stat().st_mtime for path in inputs):
        _remove_outputs(target)
    stamp.unlink(missing_ok=True)
    return None


def _remove_outputs(target: pathlib.Path) -> None:
    # The extension's objects and library (the sm90 library lives in a folder of its own).
    for path in list(target.glob("*.o")) + [target / f"{EXTENSION_NAME}.so"]:
        path.unlink(missing_ok=True)


def _import_built(path: pathlib.Path):
    # What torch.utils.cpp_extension does with the library it built.
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _first_error_line(text: str) -> str:
    lines = text.splitlines()
    for line in lines:  # a compiler's own error first, then anything naming one
        if "error:" in line.lower() or "killed" in line.lower():
            return line.strip()[:300]
    for line in lines:
        if "error" in line.lower() and not line.startswith("ninja: build stopped"):
            return line.strip()[:300]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "unknown error"


def find_cutlass() -> list[pathlib.Path]:
    """Include folders of the CUTLASS headers from the PyPI package nvidia-cutlass."""
    spec = importlib.util.find_spec("cutlass_library")  # located, not imported (it is heavy)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("CUTLASS headers not found (pip install nvidia-cutlass)")
    source = pathlib.Path(list(spec.submodule_search_locations)[0]) / "source"
    folders = [source / "include", source / "tools" / "util" / "include"]
    if not (folders[0] / "cutlass" / "cutlass.h").exists() or not (folders[1] / "cutlass" / "util").exists():
        raise BuildError(f"CUTLASS headers not found under {source} (pip install nvidia-cutlass)")
    return folders


def _nvcc() -> str:
    from torch.utils import cpp_extension
    candidates = [os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc"), shutil.which("nvcc") or ""]
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            return candidate
    raise BuildError("no CUDA compiler (nvcc) found")


def sm90_library_path() -> pathlib.Path:
    """Where the sm90 GEMM library for these sources, CUTLASS headers and nvcc lives."""
    include_dirs = find_cutlass()
    nvcc = _nvcc()
    digest = hashlib.sha256()
    for path in SM90_SOURCES + SM90_HEADERS:
        digest.update(path.name.encode() + path.read_bytes())
    version_file = include_dirs[0] / "cutlass" / "version.h"
    digest.update(version_file.read_bytes() if version_file.exists() else b"")
    digest.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    digest.update(" ".join(SM90_NVCC_FLAGS).encode())
    return cache_root() / f"sm90-{digest.hexdigest()[:16]}" / "librt_lynx_sm90.so"


def _write_sm90_ninja(folder: pathlib.Path, nvcc: str, include_dirs: list[pathlib.Path], output: pathlib.Path) -> None:
    includes = " ".join(f"-I{d}" for d in [CSRC, *include_dirs])
    lines = [
        f"nvcc = {nvcc}",
        f"flags = {' '.join(SM90_NVCC_FLAGS)} {includes}",
        "rule compile",
        "  command = $nvcc $flags -c $in -o $out",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc -shared -cudart shared $in -o $out",
        "  description = link $out",
    ]
    objects = []
    for source in SM90_SOURCES:
        obj = folder / (source.stem + ".o")
        objects.append(str(obj))
        lines.append(f"build {obj}: compile {source}")
    lines.append(f"build {output}: link {' '.join(objects)}")
    (folder / "build.ninja").write_text("\n".join(lines) + "\n")


def _sm90_jobs() -> int:
    """Parallel compiles: one CUTLASS translation unit takes up to ~10 GB of host memory, so a
    job per 10 GB available (at most one per core); MAX_JOBS overrides, as for torch's builds."""
    if os.environ.get("MAX_JOBS", "").isdigit():
        return max(1, int(os.environ["MAX_JOBS"]))
    available_gb = 8
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available_gb = int(line.split()[1]) // (1024 * 1024)
    except OSError:
        pass
    return max(1, min(os.cpu_count() or 1, available_gb // 10, len(SM90_SOURCES)))


def build_sm90_library() -> pathlib.Path:
    """Build (first time) the sm90 GEMM library; returns its path or raises BuildError."""
    if shutil.which("ninja") is None:
        raise BuildError("ninja not found (pip install ninja)")
    output = sm90_library_path()
    if output.exists():
        return output
    folder = output.parent
    folder.mkdir(parents=True, exist_ok=True)
    _write_sm90_ninja(folder, _nvcc(), find_cutlass(), output)
    log.warning("building RT-Lynx sm90 sparse GEMM kernels (one time, ~%d min) in %s ...",
                SM90_EXPECTED_BUILD_MINUTES, folder)
    started = time.monotonic()
    done = subprocess.run(["ninja", "-C", str(folder), "-j", str(_sm90_jobs())], capture_output=True, text=True)
    if done.returncode != 0 or not output.exists():
        raise BuildError(f"sm90 GEMM build failed: {_first_error_line(done.stdout + done.stderr)}")
    log.warning("RT-Lynx sm90 sparse GEMM kernels built in %.0f s", time.monotonic() - started)
    return output


def sm90_status() -> str:
    """'' when the sm90 GEMM library is loaded into the extension, else the one-line reason."""
    return _sm90_status


def _load_sm90(module) -> None:
    global _sm90_status
    try:
        _sm90_status = module.load_sm90_library(str(build_sm90_library()))
    except BuildError as exc:
        _sm90_status = str(exc)
    except Exception as exc:  # the cuSPARSELt path must stay usable whatever happens here
        _sm90_status = f"sm90 GEMM library not loaded: {_first_error_line(str(exc))}"
    if _sm90_status:
        log.warning("RT-Lynx: sm90 sparse GEMM unavailable (%s); using the cuSPARSELt path", _sm90_status)


def load_extension(verbose: bool = False):
    """Build (first time) and import the extension; raises BuildError with a one-line reason."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise BuildError(_error)
        try:
            module = _build_and_load(verbose)
            _load_sm90(module)
            _module = module
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
    cublaslt_dir, cublaslt_name = find_cublaslt()
    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    staged = _stage_headers(include_dir, target)
    # RT_LYNX_DEBUG_BUILD=1 adds host debug info (readable backtraces in cuda-gdb).
    cflags = ["-O3"] + (["-g"] if os.environ.get("RT_LYNX_DEBUG_BUILD") else [])
    cuda_cflags = ["-O3", "-lineinfo"]
    ldflags = [f"-L{lib_dir}", "-l:libcusparseLt.so.0", f"-Wl,-rpath,{lib_dir}",
               f"-L{cublaslt_dir}", f"-l:{cublaslt_name}", f"-Wl,-rpath,{cublaslt_dir}", "-ldl"]
    # A library built from these very inputs is imported as it is: ninja, which compares times, would
    # rebuild it for sources copied anew with the same bytes (a fresh checkout, a copied build folder).
    inputs = extension_inputs(staged)
    digest = extension_digest(inputs, cflags + cuda_cflags + ldflags)
    module = _built_from(target, digest, inputs)
    if module is not None:
        return module
    log.warning("building RT-Lynx CUDA kernels (~%d s) in %s ...", EXPECTED_BUILD_SECONDS, target)
    started = time.monotonic()
    previous_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    # cpp_extension turns "9.0a" into -gencode=arch=compute_90a,code=sm_90a.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    try:
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(s) for s in SOURCES],
            extra_include_paths=[str(staged), str(CSRC)],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_ldflags=ldflags,
            build_directory=str(target),
            verbose=verbose,
            is_python_module=True,
        )
    finally:
        if previous_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous_arch
    (target / DIGEST_FILE).write_text(digest + "\n")
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
    if _sm90_status:
        return True, f"built in {build_dir()} (cuSPARSELt path only: {_sm90_status})"
    return True, f"built in {build_dir()}, sm90 sparse GEMM library loaded"
