"""model.py against transformers' outputs stored in ../shared/fixtures (tolerances: its README)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import cpu
from conftest import FAMILIES, FIXTURES, family_folder, smollm2_dir
from model import LlamaConfig, Transformer, rope_frequencies
from runtime import compile_blocks, load_model

TINY = FIXTURES / "llama" / "tiny_random"
TINY_LLAMA3 = FIXTURES / "llama" / "tiny_random_llama3"


@pytest.mark.parametrize(
    "folder", [TINY, TINY_LLAMA3], ids=["untied-default-rope", "tied-llama3-rope"]
)
def test_tiny_random_logits_match_transformers(folder):
    model = Transformer.from_pretrained(folder)
    ref = load_file(folder.parent / f"{folder.name}_ref.safetensors")
    real = ref["attention_mask"].bool()  # (B, T): right padding
    logits = model(ref["input_ids"])  # (B, T, vocab)
    assert logits.dtype == torch.float32
    assert (logits - ref["logits"])[real].abs().max() <= 1e-4
    positions = torch.arange(real.shape[1]).expand(real.shape[0], -1)
    hidden, _ = model.hidden(model.tok_embeddings(ref["input_ids"]), positions)
    assert (hidden - ref["hidden.final_norm"])[real].abs().max() <= 1e-4


@pytest.mark.parametrize("folder", [TINY, TINY_LLAMA3], ids=["untied", "tied-llama3-rope"])
def test_packed_cpu_model_matches_transformers_and_zeroes_the_pads(folder):
    """cpu.PackedTransformer leaves the pads out of the linear layers: the real rows stay the
    same, and the pads come out as zeros, in the hidden states and the keys/values."""
    model = cpu.PackedTransformer.from_pretrained(folder)
    ref = load_file(folder.parent / f"{folder.name}_ref.safetensors")
    real = ref["attention_mask"].bool()  # (B, T): right padding
    assert (model(ref["input_ids"]) - ref["logits"])[real].abs().max() <= 1e-4
    positions = torch.arange(real.shape[1]).expand(real.shape[0], -1)
    packed, kvs = model.hidden(model.tok_embeddings(ref["input_ids"]), positions, mask=real)
    assert (packed - ref["hidden.final_norm"])[real].abs().max() <= 1e-4
    assert packed[~real].abs().max() == 0
    assert all(k.transpose(1, 2)[~real].abs().max() == 0 for k, _ in kvs)


def test_llama3_rope_frequencies_match_transformers():
    ref = json.loads((FIXTURES / "llama" / "tiny_random_llama3_ref.json").read_text())
    expected = torch.tensor(ref["checks"]["inv_freq_transformers"])
    cfg = LlamaConfig.from_json(TINY_LLAMA3 / "config.json")
    assert torch.allclose(rope_frequencies(cfg), expected, rtol=1e-6, atol=0)


def test_tied_embeddings_share_one_table():
    model = Transformer.from_pretrained(TINY_LLAMA3)
    assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("model_class", [Transformer, cpu.PackedTransformer])
def test_cached_prefix_equals_one_pass(model_class):
    """The fast path: keys/values of a prefix reused for a suffix give the same hidden states."""
    model = model_class.from_pretrained(TINY)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, -1)
    x = model.tok_embeddings(ids)  # (2, 12, D)
    full, _ = model.hidden(x, positions)
    _, past = model.hidden(x[:, :7], positions[:, :7])
    suffix, _ = model.hidden(
        x[:, 7:], positions[:, 7:], past=past, past_mask=torch.ones(2, 7, dtype=torch.bool)
    )
    assert (suffix - full[:, 7:]).abs().max() <= 1e-5


@pytest.mark.parametrize("model_class", [Transformer, cpu.PackedTransformer])
def test_ragged_cached_prefixes_are_masked(model_class):
    """Prefixes of 5 and 3 tokens (the second right-padded to 5), then 4 tokens each, continuing at
    positions 5 and 3: each row as if computed alone in one pass. past_mask hides the pads."""
    model = model_class.from_pretrained(TINY)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    x = model.tok_embeddings(ids)  # (2, 9, D)
    prefix_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # (2, 5)
    _, past = model.hidden(x[:, :5], torch.arange(5).expand(2, -1), mask=prefix_mask)
    suffix_x = torch.stack([x[0, 5:9], x[1, 3:7]])  # (2, 4, D)
    positions = torch.stack([torch.arange(5, 9), torch.arange(3, 7)])  # (2, 4)
    suffix, _ = model.hidden(suffix_x, positions, past=past, past_mask=prefix_mask)
    for row, length in enumerate([9, 7]):
        alone, _ = model.hidden(x[row : row + 1, :length], torch.arange(length)[None])
        assert (suffix[row] - alone[0, length - 4 :]).abs().max() <= 1e-5


def test_attention_blocks_of_3_positions_match_the_fixture(monkeypatch):
    """cpu.attend computes causal attention in blocks of cpu.ATTENTION_BLOCK query positions, each
    over only the keys it can see. The fixture's 16 positions fit one block of 32; blocks of 3 make
    six, with padding, and the cached-prefix pass must still see exactly its past keys."""
    model = cpu.PackedTransformer.from_pretrained(TINY)
    ref = load_file(TINY.parent / "tiny_random_ref.safetensors")
    real = ref["attention_mask"].bool()  # (3, 16)
    x = model.tok_embeddings(ref["input_ids"])  # (3, 16, D)
    positions = torch.arange(16).expand(3, -1)
    one_block, _ = model.hidden(x, positions, mask=real)
    monkeypatch.setattr(cpu, "ATTENTION_BLOCK", 3)
    blocked, _ = model.hidden(x, positions, mask=real)
    assert (blocked - ref["hidden.final_norm"])[real].abs().max() <= 1e-4
    assert (blocked - one_block)[real].abs().max() <= 1e-5  # fp32: shorter softmax sums
    _, past = model.hidden(x[:, :4], positions[:, :4], mask=real[:, :4])
    suffix, _ = model.hidden(x[:, 4:], positions[:, 4:], real[:, 4:], past, real[:, :4])  # 4 blocks
    assert (suffix - ref["hidden.final_norm"][:, 4:])[real[:, 4:]].abs().max() <= 1e-4


@pytest.mark.parametrize("model_class", [Transformer, cpu.PackedTransformer])
def test_padded_batch_with_cached_prefix_matches_the_fixture(model_class):
    """A right-padded batch whose first 4 positions come from a cached prefix, past_mask hiding
    the prefix's pads: the fixture's hidden states at every real position, SDPA (what runs on GPUs)
    and packed (the CPU) alike."""
    model = model_class.from_pretrained(TINY)
    ref = load_file(TINY.parent / "tiny_random_ref.safetensors")
    real = ref["attention_mask"].bool()  # (3, 16)
    x = model.tok_embeddings(ref["input_ids"])  # (3, 16, D)
    positions = torch.arange(16).expand(3, -1)
    _, past = model.hidden(x[:, :4], positions[:, :4], mask=real[:, :4])
    suffix, _ = model.hidden(x[:, 4:], positions[:, 4:], real[:, 4:], past, real[:, :4])
    assert (suffix - ref["hidden.final_norm"][:, 4:])[real[:, 4:]].abs().max() <= 1e-4


def test_compiled_blocks_match_eager_on_the_fixture():
    """`--compile`: the same logits (fp32, inductor's fused loops) on both passes of the fast path.
    Slow-ish (inductor compiles C++), but it is what keeps the flag from rotting. The CPU's
    model, the one --compile gets here."""
    model = cpu.PackedTransformer.from_pretrained(TINY)
    ref = load_file(TINY.parent / f"{TINY.name}_ref.safetensors")
    real = ref["attention_mask"].bool()
    ids = ref["input_ids"]  # (B, T)
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    x = model.tok_embeddings(ids)
    _, past = model.hidden(x[:, :5], positions[:, :5])
    eager, _ = model.hidden(x[:, 5:], positions[:, 5:], past=past, past_mask=real[:, :5])
    compile_blocks(model)
    assert (model(ids) - ref["logits"])[real].abs().max() <= 1e-4  # the one-pass graph
    # the cached-prefix graph
    compiled, _ = model.hidden(x[:, 5:], positions[:, 5:], past=past, past_mask=real[:, :5])
    assert (compiled - eager)[real[:, 5:]].abs().max() <= 1e-5


def test_smollm2_fp32_matches_transformers_and_bf16_agrees_on_argmax():
    folder = smollm2_dir()
    ref = load_file(FIXTURES / "llama" / "smollm2_ref.safetensors")
    fp32 = Transformer.from_pretrained(folder)
    bf16 = Transformer.from_pretrained(folder, dtype=torch.bfloat16)
    for i in range(4):
        ids = ref[f"input_ids.{i}"][None]  # (1, n)
        for model, tolerance in [(fp32, 1e-3), (bf16, 1.0)]:
            logits = model(ids)[0]  # (n, vocab) float32
            logprobs = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
            assert (logprobs - ref[f"next_token_logprobs.{i}"]).abs().max() <= tolerance
            assert (logits[-1] - ref[f"last_logits.{i}"]).abs().max() <= tolerance
            assert logits[-1].argmax() == ref[f"last_logits.{i}"].argmax()


# ---- the other families: Mistral, Qwen2, Qwen3 ---------------------------------------------
FAMILY_NAMES = ["mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("model_class", [Transformer, cpu.PackedTransformer])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_logits_match_transformers(tmp_path, family, model_class):
    """Tiny random models (config.json as transformers writes it, seeded weights), on a
    right-padded batch: float32 logits within 1e-4 of transformers' eager ones."""
    model = model_class.from_pretrained(family_folder(family, tmp_path / family))
    ref = json.loads((FAMILIES / f"{family}_ref.json").read_text())
    logits = model(torch.tensor(ref["input_ids"]))  # (B, T, vocab)
    for row, (n, expected) in enumerate(zip(ref["lengths"], ref["logits"])):
        assert (logits[row, :n] - torch.tensor(expected)).abs().max() <= 1e-4  # real positions


def test_each_family_reads_its_own_pieces(tmp_path):
    """What the config implies, by hand: qwen2 has q/k/v biases, qwen3 a q/k norm of head_dim 32
    (not hidden / heads = 16), mistral a sliding window, qwen2 tied embeddings."""
    folders = (family_folder(f, tmp_path / f) for f in FAMILY_NAMES)
    mistral, qwen2, qwen3 = (Transformer.from_pretrained(folder) for folder in folders)
    assert mistral.cfg.sliding_window == 32 and qwen2.cfg.sliding_window is None
    assert qwen2.layers[0].attention.wk.bias.shape == (2 * 16,)
    assert mistral.layers[0].attention.wk.bias is None and qwen3.layers[0].attention.wq.bias is None
    assert qwen3.layers[0].attention.q_norm.weight.shape == (32,) and qwen3.cfg.head_dim == 32
    assert not hasattr(qwen2.layers[0].attention, "q_norm")
    assert qwen2.output.weight is qwen2.tok_embeddings.weight


@pytest.mark.parametrize("model_class", [Transformer, cpu.PackedTransformer])
def test_a_sequence_longer_than_the_sliding_window_is_refused(tmp_path, model_class):
    """Mistral's window (32 here) would change attention past it; model.py always attends to all
    earlier positions, so it refuses rather than differ: 32 positions run, 33 do not, counting a
    cached prefix too."""
    model = model_class.from_pretrained(family_folder("mistral", tmp_path / "mistral"))
    model(torch.ones(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="33 positions is longer than sliding_window 32"):
        model(torch.ones(1, 33, dtype=torch.long))
    x = model.tok_embeddings(torch.ones(1, 33, dtype=torch.long))  # (1, 33, D)
    positions = torch.arange(33)[None]
    _, past = model.hidden(x[:, :20], positions[:, :20])
    with pytest.raises(ValueError, match="sliding_window 32"):
        model.hidden(x[:, 20:], positions[:, 20:], past=past)


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("qwen3", {"attention_bias": True}, "attention_bias=true is not supported"),
        ("qwen2", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ("mistral", {"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling type 'yarn'"),
        ("qwen2", {"model_type": "qwen2_moe"}, "model_type 'qwen2_moe' is not supported"),
        # a Llama config over Qwen2 weights: the biases are named, not dropped
        (
            "qwen2",
            {"model_type": "llama"},
            "unexpected tensor 'model.layers.0.self_attn.k_proj.bias'",
        ),
        ("qwen3", {"model_type": "qwen2"}, "unexpected tensor 'model.layers.0.self_attn.k_norm"),
        ("mistral", {"model_type": "qwen3"}, "missing tensor 'model.layers.0.self_attn.k_norm"),
    ],
)
def test_family_settings_it_cannot_compute_are_refused_by_name(tmp_path, family, changes, message):
    folder = family_folder(family, tmp_path / family)
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        Transformer.from_pretrained(folder)


@pytest.mark.parametrize(
    "family, changes, window",
    [
        ("mistral", {}, 32),
        ("mistral", {"sliding_window": None}, None),  # v0.2 and later
        ("mistral", {"sliding_window": "absent"}, 4096),  # transformers' default
        ("qwen2", {"sliding_window": 64}, None),  # the key alone means nothing
        ("qwen2", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1}, 64),
        ("qwen3", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 2}, None),
        (
            "qwen2",
            {
                "sliding_window": 64,
                "use_sliding_window": True,
                "max_window_layers": 2,
                "layer_types": ["full_attention", "sliding_attention"],
            },
            64,
        ),
    ],
)
def test_sliding_window_where_transformers_applies_one(tmp_path, family, changes, window):
    """Mistral windows every layer (4,096 when the key is absent); Qwen2/3 window only with
    use_sliding_window, the layers from max_window_layers on (or as layer_types lists them): no
    windowed layer, no window."""
    config = json.loads((FAMILIES / family / "config.json").read_text())
    config.pop("layer_types", None)  # what transformers 5 derived from the fixture's settings
    config = {k: v for k, v in {**config, **changes}.items() if v != "absent"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert LlamaConfig.from_json(tmp_path / "config.json").sliding_window == window


def test_a_tied_checkpoints_stored_head_is_shape_checked(tmp_path):
    folder = family_folder("qwen2", tmp_path / "qwen2")  # tied
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "lm_head.weight": torch.ones(3, 7)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(3, 7\)"):
        Transformer.from_pretrained(folder)


# ---- bad inputs: one clear error naming the file or tensor -------------------------------------
@pytest.fixture
def tiny_copy(tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    return folder


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_config_or_weights(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(tiny_copy)
    (tiny_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tiny_copy)


def test_truncated_or_corrupted_safetensors(tiny_copy):
    data = (tiny_copy / "model.safetensors").read_bytes()
    (tiny_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: unreadable"):
        Transformer.from_pretrained(tiny_copy)
    (tiny_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors: unreadable"):
        Transformer.from_pretrained(tiny_copy)


def test_missing_or_misshaped_tensor(tiny_copy):
    tensors = load_file(tiny_copy / "model.safetensors")
    without = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(without, tiny_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        Transformer.from_pretrained(tiny_copy)
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, tiny_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(7,\)"):
        Transformer.from_pretrained(tiny_copy)
    tensors["model.norm.weight"] = torch.ones(64)
    tensors["model.extra.weight"] = torch.ones(3)
    save_file(tensors, tiny_copy / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        Transformer.from_pretrained(tiny_copy)


def test_sharded_checkpoint_loads(tiny_copy):
    tensors = load_file(tiny_copy / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:5],
        "model-00002-of-00002.safetensors": names[5:],
    }
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tiny_copy / file)
    (tiny_copy / "model.safetensors").unlink()
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(
        Transformer.from_pretrained(tiny_copy)(ids), Transformer.from_pretrained(TINY)(ids)
    )


def test_unsupported_model_type_or_rope(tiny_copy):
    edit_config(tiny_copy, model_type="gemma")
    with pytest.raises(ValueError, match="config.json: model_type 'gemma' is not supported"):
        Transformer.from_pretrained(tiny_copy)
    edit_config(tiny_copy, model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        Transformer.from_pretrained(tiny_copy)


def test_tokenizer_larger_than_embedding_table(tmp_path):
    folder = tmp_path / "small_vocab"
    shutil.copytree(TINY, folder)
    shutil.copy(smollm2_dir() / "tokenizer.json", folder)  # 49,152 ids vs 1,000 rows
    with pytest.raises(
        ValueError, match="embedding table 'model.embed_tokens.weight' has only 1000 rows"
    ):
        load_model(folder)


def test_transformers5_rope_parameters_read_like_rope_scaling(tmp_path):
    """transformers 5 saves RoPE settings as one "rope_parameters" dict: the same frequencies."""
    config = json.loads((TINY_LLAMA3 / "config.json").read_text())
    rope = {"rope_theta": config.pop("rope_theta"), **config.pop("rope_scaling")}
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    new = LlamaConfig.from_json(tmp_path / "config.json")
    old = LlamaConfig.from_json(TINY_LLAMA3 / "config.json")
    assert new.rope_theta == old.rope_theta == 500000.0
    assert torch.equal(rope_frequencies(new), rope_frequencies(old))


def test_non_silu_activation_is_refused(tiny_copy):
    edit_config(tiny_copy, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        Transformer.from_pretrained(tiny_copy)
