"""Shared paths for the tests: the checkout and ../shared sit side by side (here and in CI)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
# tiny random Mistral, Qwen2 and Qwen3 configs (and a Qwen-style tokenizer) and transformers'
# logits of each: tests/fixtures/make_families.py. The weights are drawn from a seed, never stored.
FAMILIES = ROOT / "tests" / "fixtures" / "families"
FAMILY_SEEDS = {"mistral": 0, "qwen2": 1, "qwen3": 2}
sys.path.insert(0, str(ROOT))


def smollm2_dir():
    """The materialised SmolLM2 folder (see README 'Set-up'); its tests are skipped without it."""
    home = Path(os.environ.get("QPEFT_HOME", "~/.cache/qpeft")).expanduser()
    folder = home / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"{folder} not materialised: run python ../shared/tools/make_model.py {folder}")
    return folder


def seeded_weights(config_json, seed):
    """{HF tensor name: tensor} for a config, drawn in name order from one seeded generator:
    weights N(0, 1.5 / sqrt(fan_in)) so attention is peaky, embeddings N(0, 1), norms
    1 + 0.2 N(0, 1) so a missing multiply shows, biases 0.5 N(0, 1) so a missing bias shows."""
    import torch

    from model import LlamaConfig, Transformer, hf_name

    cfg = LlamaConfig.from_json(config_json)
    with torch.device("meta"):
        state = Transformer(cfg).state_dict()
    tied = {"output.weight"} if cfg.tie_embeddings else set()
    shapes = {hf_name(name): t.shape for name, t in state.items() if name not in tied}
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for name, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.2 * noise
        elif name.endswith("bias"):
            tensors[name] = 0.5 * noise
        elif "embed_tokens" in name:
            tensors[name] = noise
        else:
            tensors[name] = 1.5 / shape[1] ** 0.5 * noise
    return tensors


def family_folder(family, folder):
    """A copy of tests/fixtures/families/{family} in `folder`, with its seeded weights written as
    model.safetensors: an HF model folder that model.py (and transformers) load."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(FAMILIES / family, folder)
    weights = seeded_weights(folder / "config.json", FAMILY_SEEDS[family])
    save_file(weights, folder / "model.safetensors")
    return folder
