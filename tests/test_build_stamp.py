"""bench/build_stamp.sh: a carried build folder is kept by ninja when the work tree's kernel sources
have the same bytes but newer times (a copy, a git checkout), and rebuilt when their bytes differ."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The environment's ninja first (pip's, as torch's extension build finds it), else the system's.
NINJA = shutil.which("ninja", path=os.path.dirname(sys.executable)) or shutil.which("ninja")

pytestmark = pytest.mark.skipif(NINJA is None or shutil.which("bash") is None or shutil.which("sha256sum") is None,
                                reason="needs bash, sha256sum and ninja (pip install ninja)")


def run(tree, script):
    """`script` in bash at `tree`, with build_stamp.sh's functions; its stdout."""
    done = subprocess.run(["bash", "-c", f"set -uo pipefail; source {ROOT / 'bench' / 'build_stamp.sh'}; {script}"],
                          cwd=tree, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ninja_has_work(tree):
    done = subprocess.run([NINJA, "-C", "build", "-n"], cwd=tree, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return "no work to do" not in done.stdout


@pytest.fixture
def tree(tmp_path):
    """A work tree with kernel sources and a build folder built from them by ninja."""
    csrc = tmp_path / "kernels" / "csrc"
    csrc.mkdir(parents=True)
    (csrc / "kernel.cu").write_text("kernel v1\n")
    (csrc / "kernel.h").write_text("header\n")
    (tmp_path / "kernels" / "build.py").write_text("flags\n")
    build = tmp_path / "build"
    (build / "cusparselt_include").mkdir(parents=True)
    staged = build / "cusparselt_include" / "cusparseLt.h"   # kernels/build.py stages torch's copy here
    staged.write_text("staged header\n")
    # The output is written two seconds after its command starts, as a compile does: ninja 1.13
    # (pip's) records the command's start in .ninja_log (1.11 recorded the output's time).
    (build / "build.ninja").write_text(f"rule cat\n  command = sleep 2 && cat $in > $out\n"
                                       f"build kernel.o: cat {csrc / 'kernel.cu'} {csrc / 'kernel.h'} {staged}\n")
    for path in (csrc / "kernel.cu", csrc / "kernel.h", staged):
        os.utime(path, (1_700_000_000, 1_700_000_000))   # sources older than the build, as when it was made
    subprocess.run([NINJA, "-C", "build"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert not ninja_has_work(tmp_path)
    return tmp_path


def test_byte_equal_sources_with_new_times_keep_the_carried_build(tree):
    run(tree, "stamp_build build")
    (tree / "kernels" / "csrc" / "kernel.cu").touch()   # what a copy or a checkout does
    (tree / "build" / "cusparselt_include" / "cusparseLt.h").touch()   # and carrying the folder
    assert ninja_has_work(tree)
    run(tree, "reuse_carried_build build")
    assert not ninja_has_work(tree)
    assert not (tree / "build" / "sources.stamp").exists(), "written again only after a build that succeeds"


def test_changed_sources_are_rebuilt(tree):
    run(tree, "stamp_build build")
    (tree / "kernels" / "csrc" / "kernel.h").write_text("header v2\n")
    run(tree, "reuse_carried_build build")
    assert ninja_has_work(tree)


def test_no_objects_no_stamp(tmp_path):
    (tmp_path / "kernels" / "csrc").mkdir(parents=True)
    (tmp_path / "kernels" / "csrc" / "kernel.cu").write_text("kernel\n")
    (tmp_path / "kernels" / "build.py").write_text("flags\n")
    (tmp_path / "build").mkdir()
    run(tmp_path, "stamp_build build")
    assert not (tmp_path / "build" / "sources.stamp").exists()
