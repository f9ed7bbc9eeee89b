"""kernels/build.py: a built extension is imported as it is while the digest of its inputs beside it
matches (a copied build folder, sources checked out anew: same bytes, new times), and built again
when any input differs or it does not load."""
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
    first = build.extension_digest(staged, ["-O3"])
    (csrc / "kernel.cu").touch()   # new time, same bytes
    assert build.extension_digest(staged, ["-O3"]) == first
    assert build.extension_digest(staged, ["-O3", "-g"]) != first
    for path in (csrc / "kernel.cuh", staged / "cusparseLt.h"):
        original = path.read_text()
        path.write_text(original + "changed\n")
        assert build.extension_digest(staged, ["-O3"]) != first, path.name
        path.write_text(original)
    (csrc / "programmatic_launch.cuh").write_text("a header no list names\n")
    assert build.extension_digest(staged, ["-O3"]) != first


def test_a_library_with_its_digest_is_imported_without_a_build(tmp_path, monkeypatch):
    imported = []
    monkeypatch.setattr(build, "_import_built", lambda path: imported.append(path) or "module")
    (tmp_path / f"{build.EXTENSION_NAME}.so").write_bytes(b"\x7fELF")
    stamp = tmp_path / build.DIGEST_FILE
    stamp.write_text("abc\n")
    assert build._built_from(tmp_path, "abc") == "module" and len(imported) == 1
    # Another digest: built again, and the old digest does not outlive the library it described.
    assert build._built_from(tmp_path, "def") is None and len(imported) == 1
    assert not stamp.exists()


def test_a_library_that_does_not_load_is_built_again(tmp_path, caplog):
    (tmp_path / f"{build.EXTENSION_NAME}.so").write_bytes(b"not a library")
    (tmp_path / build.DIGEST_FILE).write_text("abc\n")
    assert build._built_from(tmp_path, "abc") is None
    assert "did not load" in caplog.text and not (tmp_path / build.DIGEST_FILE).exists()


def test_no_library_no_import(tmp_path):
    (tmp_path / build.DIGEST_FILE).write_text("abc\n")
    assert build._built_from(tmp_path, "abc") is None
