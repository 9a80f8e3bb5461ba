"""A Llama-style decoder in plain PyTorch, loaded straight from Hugging Face safetensors:
RMSNorm, rotate-half RoPE (with the llama3 frequency rule), grouped-query attention, SwiGLU MLP.
Four families ("model_type") share it and differ only inside the attention block: "llama"
(SmolLM2, TinyLlama, Llama 2/3), "mistral" (the same block), "qwen2" (biases on the q/k/v
projections) and "qwen3" (an RMSNorm on each head's queries and keys). No generation.

  Transformer.from_pretrained(folder) -> the frozen model (runtime.load_model adds a tokenizer)
  model(ids)                      -> float32 logits (B, T, vocab): the plain API
  model.hidden(x, positions, ...) -> final-normed hidden states of embeddings x, optionally also
                                     attending to the cached keys/values of a prefix (qpeft.py
                                     reuses a passage's keys/values for many queries)

Credits: the layout follows Meta's Llama reference and HF transformers' LlamaForCausalLM
(rotate-half RoPE so q_proj/k_proj load without permutation) and its Mistral, Qwen2 and Qwen3
variants; the structure borrows from nanoGPT and gpt-fast.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from eval import read_json

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # config.json "model_type"


@dataclass
class LlamaConfig:
    dim: int = 576  # hidden_size
    n_layers: int = 30  # num_hidden_layers
    n_heads: int = 9  # num_attention_heads
    n_kv_heads: int = 3  # num_key_value_heads (GQA: each serves n_heads // n_kv_heads heads)
    head_dim: int = 64  # dim // n_heads unless the config says otherwise
    hidden_dim: int = 1536  # intermediate_size of the SwiGLU MLP
    vocab_size: int = 49152
    norm_eps: float = 1e-5  # rms_norm_eps
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", ...}
    tie_embeddings: bool = False  # tie_word_embeddings: lm_head shares the input embedding table
    max_positions: int | None = None  # max_position_embeddings: longer sequences are an error
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3
    # mistral (and qwen2/3 with use_sliding_window): a query sees only this many positions back;
    # sequences longer than that are an error, so attention here is always full
    sliding_window: int | None = None

    @classmethod
    def from_json(cls, path):
        c = read_json(path, required=True)
        family = c.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"{path}: model_type {family!r} is not supported ({FAMILIES})")
        # transformers 5 writes RoPE settings as "rope_parameters" {"rope_theta", "rope_type", ...};
        # older configs (and the Hub's) as top-level "rope_theta" + "rope_scaling". Read both.
        rope = c.get("rope_parameters") or {}
        theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        default = rope.get("rope_type", "default") == "default"
        scaling = c.get("rope_scaling") or (None if default else rope)
        kind = scaling and scaling.get("rope_type", scaling.get("type"))
        if scaling is not None and kind != "llama3":
            raise ValueError(f"{path}: rope_scaling type {kind!r} is not supported (only llama3)")
        llama3 = "factor low_freq_factor high_freq_factor original_max_position_embeddings"
        if scaling is not None and (missing := [k for k in llama3.split() if k not in scaling]):
            raise ValueError(f"{path}: the llama3 rope scaling lacks '{missing[0]}'")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {c['hidden_act']!r} is not supported (only silu)")
        for flag in ("attention_bias", "mlp_bias"):  # qwen2's q/k/v biases come without a flag
            if c.get(flag):
                raise ValueError(f"{path}: {flag}=true is not supported")
        required = "hidden_size num_hidden_layers num_attention_heads intermediate_size vocab_size"
        if missing := [key for key in required.split() if key not in c]:
            raise ValueError(f"{path}: required key '{missing[0]}' is missing")
        window = c.get("sliding_window", 4096) if family == "mistral" else None  # HF's default
        if c.get("use_sliding_window"):  # qwen: as transformers, layers from max_window_layers on
            late = c["num_hidden_layers"] > c.get("max_window_layers", 28)
            types = c.get("layer_types") or ["sliding_attention"] * late
            window = c.get("sliding_window") if "sliding_attention" in types else None
        heads = c["num_attention_heads"]
        return cls(
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            hidden_dim=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=c.get("tie_word_embeddings", False),
            max_positions=c.get("max_position_embeddings"),
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            sliding_window=window,
        )


def rope_frequencies(cfg):
    """Inverse frequencies (hd/2,) of the rotary embedding, with Llama 3's long-context rule."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim  # (hd/2,)
    inv_freq = 1.0 / cfg.rope_theta**exponents
    if cfg.rope_scaling is None:
        return inv_freq.float()
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    context = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # Llama 3: wavelengths shorter than context/high are kept, longer than context/low are divided
    # by `factor`, and the band in between is blended linearly in context/wavelength.
    blend = ((context / wavelength - low) / (high - low)).clamp(0, 1)
    return ((1 - blend) * inv_freq / factor + blend * inv_freq).float()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (HF layout: pairs (i, i + hd/2)); x (N, heads, hd), cos/sin (N, 1, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (N, heads, hd)
    return x * cos + rotated * sin  # (N, heads, hd)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 squares lose precision), then scale in the input dtype, like HF.
        x32 = x.float()  # (..., D)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return self.weight * x32.to(x.dtype)  # (..., D)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias  # qwen2: biases on the q/k/v projections
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:  # qwen3: each head's queries and keys are RMS-normalised before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def project(self, x, cos, sin):
        """Queries (..., H, hd), keys and values (..., Hkv, hd) of x (..., D), RoPE applied."""
        lead, H, Hkv, hd = x.shape[:-1], self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(*lead, H, hd)  # (..., H, hd)
        k = self.wk(x).view(*lead, Hkv, hd)  # (..., Hkv, hd)
        if hasattr(self, "q_norm"):  # qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), self.wv(x).view(*lead, Hkv, hd)

    def forward(self, x, cos, sin, mask, past_kv):
        """x (B, T, D); mask (B or 1, 1, T, S) booleans, True where a query may see a key."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, hd)
        if past_kv is not None:  # an earlier prefix's keys/values come first; batch 1 serves all
            k = torch.cat([past_kv[0].expand(B, -1, -1, -1), k], dim=2)  # (B, Hkv, S, hd)
            v = torch.cat([past_kv[1].expand(B, -1, -1, -1), v], dim=2)  # (B, Hkv, S, hd)
        # enable_gqa: query head h reads KV head h // (H / Hkv) without copying keys
        y = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), (k, v)  # (B, T, D), all S keys/values


class MLP(nn.Module):  # SwiGLU
    def __init__(self, cfg):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w_down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # (N, D) via (N, hidden_dim)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past_kv):
        a, kv = self.attention(self.attention_norm(x), cos, sin, mask, past_kv)  # (B, T, D)
        x = x + a  # (B, T, D)
        return x + self.mlp(self.mlp_norm(x)), kv  # (B, T, D)


# Our module names -> HF's, part by part; parts not listed (mlp, q_norm, weight, bias) are HF's.
OURS_TO_HF = dict(tok_embeddings="model.embed_tokens", layers="model.layers", norm="model.norm")
OURS_TO_HF.update(output="lm_head", attention="self_attn", attention_norm="input_layernorm")
OURS_TO_HF.update(mlp_norm="post_attention_layernorm", wq="q_proj", wk="k_proj", wv="v_proj")
OURS_TO_HF.update(wo="o_proj", w_gate="gate_proj", w_up="up_proj", w_down="down_proj")


def hf_name(ours):  # "layers.0.attention.wq.weight" -> "model.layers.0.self_attn.q_proj.weight"
    return ".".join(OURS_TO_HF.get(part, part) for part in ours.split("."))


def read_safetensors(folder):
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, required=True).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(folder / name))
        except Exception as e:  # safetensors has its own error types for truncated or corrupt files
            raise ValueError(f"{folder / name}: unreadable safetensors file ({e})") from None
    return tensors


class Transformer(nn.Module):
    Block = Block  # cpu.PackedTransformer swaps in its own

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(self.Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    def hidden(self, x, positions, mask=None, past=None, past_mask=None):
        """(hidden, kv): final-normed hidden states (B, T, D) of embeddings x (B, T, D) at
        `positions` (B, T), and per layer the keys/values (B, Hkv, S + T, hd) of the past and x.

        x must be right-padded; `mask` (B, T), True on real tokens, is not needed here (no real
        token sees a later pad) but lets cpu.PackedTransformer skip the pads. `past`, one (k, v)
        per layer of shape (B or 1, Hkv, S, hd) from an earlier call (batch 1: shared by all
        rows), is attended to where `past_mask` (B, S) is True (default: everywhere); attention
        over x itself is causal."""
        cos, sin = self.rotation(positions, x.dtype)  # (B, T, 1, hd) each
        allowed = self.allowed(x.shape[1], past, past_mask)[:, None]  # (B or 1, 1, T, S)
        kvs = []
        for layer, past_kv in zip(self.layers, past or [None] * len(self.layers)):
            x, kv = layer(x, cos, sin, allowed, past_kv)  # (B, T, D)
            kvs.append(kv)
        return self.norm(x), kvs  # (B, T, D)

    def rotation(self, positions, dtype):
        """RoPE's cos and sin (..., 1, hd) at positions (...)."""
        freqs = positions[..., None].float() * self.inv_freq  # (..., hd/2)
        angles = torch.cat([freqs, freqs], dim=-1)[..., None, :]  # (..., 1, hd)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def allowed(self, T, past, past_mask):
        """(B or 1, T, S) booleans: True where one of the T new positions may see a key. Always
        all earlier positions: a sequence longer than a sliding window is an error."""
        S, window = T + (past[0][0].shape[2] if past else 0), self.cfg.sliding_window
        if window is not None and S > window:
            raise ValueError(f"a sequence of {S} positions is longer than sliding_window {window}")
        dev = self.inv_freq.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None]  # (1, T, T)
        if past is None:
            return causal
        if past_mask is None:
            seen = torch.ones(1, T, past[0][0].shape[2], dtype=torch.bool, device=dev)
        else:
            seen = past_mask[:, None, :].expand(-1, T, -1)  # (B, T, S_past)
        return torch.cat([seen, causal.expand(len(seen), -1, -1)], dim=-1)  # (B or 1, T, S)

    def logits(self, h):
        """float32 logits of hidden states h (..., D): call it only where logits are needed."""
        return self.output(h).float()  # (..., vocab)

    def forward(self, ids):
        """float32 logits (B, T, vocab) of ids (B, T) at positions 0..T-1 (right padding is safe)"""
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)  # (B, T)
        h, _ = self.hidden(self.tok_embeddings(ids), positions)  # (B, T, D)
        return self.logits(h)  # (B, T, vocab)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        path = Path(path)
        cfg = LlamaConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        expected = {name: p.shape for name, p in model.state_dict().items()}
        names = {hf_name(ours): ours for ours in expected}  # every tensor this config has
        state = {}
        for stored, tensor in read_safetensors(path).items():
            if stored not in names:
                layer = re.search(r"\.(\d+)\.", stored)  # a known tensor, layer too high?
                deep = layer and int(layer[1]) >= cfg.n_layers
                why = f" (the config has {cfg.n_layers} layers)" if deep else ""
                raise ValueError(f"{path}: unexpected tensor '{stored}'{why}")
            name = names[stored]
            if tensor.shape != expected[name]:
                raise ValueError(
                    f"{path}: tensor '{stored}' has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(expected[name])}"
                )
            if stored == "lm_head.weight" and cfg.tie_embeddings:
                continue  # some tied checkpoints store a copy; the embedding table is the one used
            state[name] = tensor.to(device=device, dtype=dtype)
        if cfg.tie_embeddings and "tok_embeddings.weight" in state:
            state["output.weight"] = state["tok_embeddings.weight"]  # tied: one table, both names
        tied = {"output.weight"} if cfg.tie_embeddings else set()
        if missing := sorted(set(expected) - set(state) - tied):
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ValueError(f"{path}: missing tensor '{hf_name(missing[0])}'{more}")
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_embeddings:  # assign=True replaced the shared Parameter
            model.output.weight = model.tok_embeddings.weight
        model.inv_freq = rope_frequencies(cfg).to(device)  # buffers built on meta need real values
        return model.eval().requires_grad_(False)
