import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_prints_plan_error_and_timing():
    result = subprocess.run([sys.executable, "demo.py", "--image-tokens", "128", "--text-tokens", "16",
                             "--hidden", "128", "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"RT-Lynx: flux, \d+ linears sparsified 2:4", out)
    errors = re.search(r"sparsify only (\d\.\d+), with norm compensation (\d\.\d+)", out)
    assert errors and 0 < float(errors.group(1)) < 1 and 0 < float(errors.group(2)) < 1
    assert re.search(r"time per forward: dense [\d.]+ ms, RT-Lynx [\d.]+ ms", out)


def test_demo_runs_the_fp8_precision():
    result = subprocess.run([sys.executable, "demo.py", "--image-tokens", "64", "--text-tokens", "16",
                             "--hidden", "128", "--repeats", "1", "--precision", "fp8"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"sparsified 2:4 fp8 \+ norm compensation, \d+ kept dense \(.*\), \d+ of them in fp8",
                     result.stdout)
    errors = re.search(r"sparsify only (\d\.\d+), with norm compensation (\d\.\d+)", result.stdout)
    assert errors and 0 < float(errors.group(2)) < 1


def test_pyproject_version_matches_the_pack():
    from rt_lynx_pack.lynx import PACK_VERSION
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^version = "{re.escape(PACK_VERSION)}"', text, re.M)
    assert "[tool.comfy]" in text and "PublisherId" in text


def test_requirements_never_pin_torch():
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not any(re.match(r"(torch|torchvision|torchaudio)\b", l) for l in lines)


def test_importing_the_pack_imports_no_comfyui():
    code = ("import sys; sys.path.insert(0, '.'); from standalone import load_pack; p = load_pack(); "
            "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules; "
            "print(sorted(p.NODE_CLASS_MAPPINGS))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "RTLynxSparsifyModel" in result.stdout and "RTLynxLoadLoRA" in result.stdout
