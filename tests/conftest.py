"""Shared paths for the tests: the checkout and ../shared sit side by side (here and in CI)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
# tiny random Mistral, Qwen2 and Qwen3 models (and a Qwen-style tokenizer) that transformers
# wrote: tests/fixtures/make_families.py
FAMILIES = ROOT / "tests" / "fixtures" / "families"
sys.path.insert(0, str(ROOT))


def smollm2_dir():
    """The materialised SmolLM2 folder (see README 'Set-up'); its tests are skipped without it."""
    home = Path(os.environ.get("QPEFT_HOME", "~/.cache/qpeft")).expanduser()
    folder = home / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"{folder} not materialised: run python ../shared/tools/make_model.py {folder}")
    return folder
