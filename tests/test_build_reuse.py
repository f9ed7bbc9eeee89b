"""kernels/build.py: a built extension is imported as it is while the digest of its inputs beside it
matches (a copied build folder, sources checked out anew: same bytes, new times), and built again
when any input differs or it does not load."""
import os

import pytest

from rt_lynx_pack.kernels import build


@pytest.fixture
def sources(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "kernel.cu").write_text("kernel v1\n")
    (csrc / "kernel.cuh").write_text("header v1\n")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "cusparseLt.h").write_text("staged header\n")
    monkeypatch.setattr(build, "CSRC", csrc)
    monkeypatch.setattr(build, "_nvcc", lambda: "true")   # `true --version` prints nothing
    return csrc, staged


def test_the_digest_follows_every_source_header_staged_header_and_flag(sources):
    csrc, staged = sources
    first = build.extension_digest(build.extension_inputs(staged), ["-O3"])
    (csrc / "kernel.cu").touch()   # new time, same bytes
    assert build.extension_digest(build.extension_inputs(staged), ["-O3"]) == first
    assert build.extension_digest(build.extension_inputs(staged), ["-O3", "-g"]) != first
    for path in (csrc / "kernel.cuh", staged / "cusparseLt.h"):
        original = path.read_text()
        path.write_text(original + "changed\n")
        assert build.extension_digest(build.extension_inputs(staged), ["-O3"]) != first, path.name
        path.write_text(original)
    (csrc / "programmatic_launch.cuh").write_text("a header no list names\n")
    assert build.extension_digest(build.extension_inputs(staged), ["-O3"]) != first


def _built(target, source, library_time, source_time):
    """A build folder with a library, an object and a digest, and a source file, with these times."""
    library, obj = target / f"{build.EXTENSION_NAME}.so", target / "kernel.cuda.o"
    library.write_bytes(b"\x7fELF")
    obj.write_bytes(b"object")
    (target / build.DIGEST_FILE).write_text("abc\n")
    source.write_text("kernel\n")
    os.utime(library, (library_time, library_time))
    os.utime(source, (source_time, source_time))
    return library, obj


def test_a_library_with_its_digest_is_imported_without_a_build(tmp_path, monkeypatch):
    imported = []
    monkeypatch.setattr(build, "_import_built", lambda path: imported.append(path) or "module")
    target, source = tmp_path / "build", tmp_path / "kernel.cu"
    target.mkdir()
    library, obj = _built(target, source, library_time=2_000, source_time=1_000)
    assert build._built_from(target, "abc", [source]) == "module" and len(imported) == 1
    # Another digest, sources newer than the library: ninja rebuilds what changed (objects kept), and
    # the old digest does not outlive the library it described.
    os.utime(source, (3_000, 3_000))
    assert build._built_from(target, "def", [source]) is None and len(imported) == 1
    assert not (target / build.DIGEST_FILE).exists() and library.exists() and obj.exists()


def test_changed_inputs_with_old_times_are_built_from_scratch(tmp_path):
    target, source = tmp_path / "build", tmp_path / "kernel.cu"
    target.mkdir()
    library, obj = _built(target, source, library_time=2_000, source_time=1_000)
    # ninja would find the library newer than its sources and keep it: it goes, objects and all.
    assert build._built_from(target, "def", [source]) is None
    assert not library.exists() and not obj.exists() and not (target / build.DIGEST_FILE).exists()


def test_a_library_that_does_not_load_is_built_again(tmp_path, caplog):
    target, source = tmp_path / "build", tmp_path / "kernel.cu"
    target.mkdir()
    library, obj = _built(target, source, library_time=2_000, source_time=1_000)
    library.write_bytes(b"not a library")
    assert build._built_from(target, "abc", [source]) is None
    assert "did not load" in caplog.text
    assert not library.exists() and not obj.exists() and not (target / build.DIGEST_FILE).exists()


def test_no_library_no_import(tmp_path):
    (tmp_path / build.DIGEST_FILE).write_text("abc\n")
    source = tmp_path / "kernel.cu"
    source.write_text("kernel\n")
    assert build._built_from(tmp_path, "abc", [source]) is None
