"""The installed package: console scripts, `python -m`, and torchvision's pure-Python parts on a CPU torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("pkg", ["engine", "captioner", "dualenc"])
def test_each_package_runs_as_a_module_with_help(pkg):
    out = _run("-m", pkg, "--help")
    assert out.returncode == 0 and f"usage: {pkg}" in out.stdout


def test_open_clip_timm_and_the_qwen2vl_video_processor_import():
    code = (
        "import engine, open_clip, timm, torchvision\n"
        "from torchvision import transforms\n"
        "from transformers import Qwen2VLVideoProcessor, AutoModelForImageTextToText\n"
        "from data_specs.torch_compat import torchvision_ops_available\n"
        "m = open_clip.create_model('ViT-S-32', pretrained=None)\n"
        "print('ok', torchvision_ops_available())\n"
    )
    out = _run("-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
