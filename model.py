"""A decoder-only Llama in plain PyTorch, loaded straight from Hugging Face safetensors.

RMSNorm, rotate-half RoPE (with the llama3 frequency rule), grouped-query attention (written
out: faster than SDPA on CPU, see `attend`), SwiGLU MLP. Enough to run SmolLM2, TinyLlama and Llama-2/3
checkpoints (model_type "llama") for scoring; no generation tricks, no training of the LLM.

Two ways in:
  model(ids)                         -> float32 logits (B, T, vocab): the plain API for readers and tests.
  model.hidden(x, positions, ...)    -> final-normed hidden states of embeddings x, optionally attending
                                        to cached keys/values of an earlier prefix (the fast scoring path
                                        of qpeft.py reuses a passage's keys/values for many queries);
                                        with a mask, padding costs no matmul FLOPs (see Packing).

Credits: the layout follows Meta's Llama reference and HF transformers' LlamaForCausalLM (rotate-half
RoPE so q_proj/k_proj load without permutation); the structure borrows from nanoGPT and gpt-fast.
The tokenizer part (bottom of the file) implements GPT-2's byte-level BPE and wraps sentencepiece.
"""
import argparse
import ctypes
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import regex  # stdlib `re` has no \p{L} / \p{N} classes, which the GPT-2 pattern needs
import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F


def find_asset(name_or_path, kind):
    """A model or dataset given as a path, or as a name under $QPEFT_HOME/{kind}/."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    home = Path(os.environ.get("QPEFT_HOME", "~/.cache/qpeft")).expanduser()
    path = home / kind / str(name_or_path)
    if not path.exists():
        what = {"models": "model", "data": "dataset"}.get(kind, kind)
        raise FileNotFoundError(f"{what} '{name_or_path}' not found: no such path, and no {path} "
                                f"(set QPEFT_HOME or see README 'Set-up')")
    return path


@dataclass
class LlamaConfig:
    dim: int = 576                 # hidden_size
    n_layers: int = 30             # num_hidden_layers
    n_heads: int = 9               # num_attention_heads
    n_kv_heads: int = 3            # num_key_value_heads (GQA: each KV head serves n_heads // n_kv_heads heads)
    head_dim: int = 64             # dim // n_heads unless the config says otherwise
    hidden_dim: int = 1536         # intermediate_size of the SwiGLU MLP
    vocab_size: int = 49152
    norm_eps: float = 1e-5         # rms_norm_eps
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # None or {"rope_type": "llama3", ...}
    tie_embeddings: bool = False   # tie_word_embeddings: lm_head shares the input embedding table
    bos_id: int | None = None
    eos_id: int | None = None
    max_positions: int | None = None   # max_position_embeddings: longer sequences are an error

    @classmethod
    def from_json(cls, path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: config.json not found")
        try:
            c = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if c.get("model_type") != "llama":
            raise ValueError(f"{path}: model_type {c.get('model_type')!r} is not supported (only 'llama')")
        # transformers 5 writes RoPE settings as "rope_parameters" {"rope_theta", "rope_type", ...};
        # older configs (and the Hub's) as top-level "rope_theta" + "rope_scaling". Read both.
        rope = c.get("rope_parameters") or {}
        theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"{path}: rope_scaling type {scaling.get('rope_type', scaling.get('type'))!r} "
                             f"is not supported (only null or 'llama3')")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {c['hidden_act']!r} is not supported (only 'silu', SwiGLU)")
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise ValueError(f"{path}: {flag}=true is not supported")
        eos = c.get("eos_token_id")
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if missing := [key for key in required if key not in c]:
            raise ValueError(f"{path}: required key '{missing[0]}' is missing")
        return cls(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                   n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                   head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                   hidden_dim=c["intermediate_size"], vocab_size=c["vocab_size"],
                   norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=theta,
                   rope_scaling=scaling, tie_embeddings=c.get("tie_word_embeddings", False),
                   bos_id=c.get("bos_token_id"), eos_id=eos[0] if isinstance(eos, list) else eos,
                   max_positions=c.get("max_position_embeddings"))


def rope_frequencies(cfg):
    """Inverse frequencies (head_dim/2,) of the rotary embedding, with Llama 3's long-context rule."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    if cfg.rope_scaling is None:
        return inv_freq.float()
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    context = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # Llama 3: wavelengths shorter than context/high are kept, longer than context/low are divided by
    # `factor`, and the band in between is blended linearly in context/wavelength.
    blend = ((context / wavelength - low) / (high - low)).clamp(0, 1)
    return ((1 - blend) * inv_freq / factor + blend * inv_freq).float()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (HF layout: pairs are (i, i + head_dim/2)).  x (N, heads, hd), cos/sin (N, 1, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 squares lose precision), then scale in the input dtype, like HF.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, past_kv, packing):
        N, hd = x.shape[0], self.head_dim
        q = apply_rope(self.wq(x).view(N, self.n_heads, hd), cos, sin)             # (N, H, hd) real tokens only
        k = apply_rope(self.wk(x).view(N, self.n_kv_heads, hd), cos, sin)          # (N, Hkv, hd)
        v = self.wv(x).view(N, self.n_kv_heads, hd)
        q = packing.pad(q)                                                           # (B, T, H, hd)
        k, v = packing.pad(k).transpose(1, 2), packing.pad(v).transpose(1, 2)        # (B, Hkv, T, hd) each
        if past_kv is not None:  # attend to an earlier prefix's keys/values first (batch 1: shared by all rows)
            k = torch.cat([past_kv[0].expand(packing.B, -1, -1, -1), k], dim=2)     # (B, Hkv, S, hd), S = S_past + T
            v = torch.cat([past_kv[1].expand(packing.B, -1, -1, -1), v], dim=2)
        y = attend(q, k, v, mask)                                                   # (B, T, H * hd)
        return self.wo(packing.pack(y)), (k, v)                                     # (N, D), keys/values of all S


ATTENTION_BLOCK = 32  # query positions per block in `attend`


def use_sdpa(device):
    """The attention kernel per device: F.scaled_dot_product_attention (fused flash / memory-
    efficient kernels) on GPUs, the written-out blocks of `attend` on the CPU, where SDPA ran 2.3x
    slower at our shapes."""
    return device.type != "cpu"


def attention_mask(allowed, n_heads, n_kv_heads, dtype):
    """`attend`'s mask for (B or 1, T, S) booleans (True: may attend), built once per forward pass:
    for SDPA the booleans as (B or 1, 1, T, S), for the CPU blocks `stacked_bias`."""
    if use_sdpa(allowed.device):
        return allowed[:, None]
    return stacked_bias(allowed, n_heads, n_kv_heads, dtype)


def attend(q, k, v, mask):
    """Causal softmax attention of q (B, T, H, hd), the last T of S positions, over k, v
    (B, Hkv, S, hd), with `mask` from attention_mask. Returns (B, T, H*hd).

    On GPUs: SDPA, query head h reading KV head h // G (G = H // Hkv) without copying keys.
    On the CPU the mask is an additive bias (B*Hkv or 1, T*G, S) of 0 (may attend) and -inf (may
    not), and grouped-query attention is written out without copying keys: query head h reads KV head h // G, so the G
    query heads of a group are stacked along the row axis (row t*G + g) and one batched matmul
    serves them all; baddbmm adds the bias and the 1/sqrt(hd) scale inside that matmul.
    Causal: query position t never sees keys after S - T + t, so the rows go in blocks of
    ATTENTION_BLOCK positions and each block computes only the keys it can see. For a 133-token
    passage batch that skips 38 % of the scores, and each block's scores stay in cache. Written
    out rather than F.scaled_dot_product_attention, which ran 2.3x slower than one block on this
    2-core CPU in bf16. torch.softmax computes in fp32 and rounds its output to q's dtype.
    """
    B, T, H, hd = q.shape
    if use_sdpa(q.device):
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, H * hd)                            # (B, T, H*hd)
    bias = mask
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = q.view(B, T, Hkv, G, hd).transpose(1, 2).reshape(B * Hkv, T * G, hd)  # (B*Hkv, T*G, hd)
    keys, values = k.reshape(B * Hkv, S, hd), v.reshape(B * Hkv, S, hd)         # (B*Hkv, S, hd)
    # Under torch.compile one block: a loop over T would specialise the graph to every length.
    edges = [0, T] if torch.compiler.is_compiling() else [*range(0, T, ATTENTION_BLOCK), T]
    out = []
    for start, end in zip(edges, edges[1:]):
        seen = S - T + end                                                       # keys visible to rows < end
        block = slice(start * G, end * G)
        scores = torch.baddbmm(bias[:, block, :seen], rows[:, block],            # (B*Hkv, rows, seen)
                               keys[:, :seen].transpose(1, 2), alpha=hd ** -0.5)
        out.append(torch.softmax(scores, dim=-1) @ values[:, :seen])             # (B*Hkv, rows, hd)
    y = torch.cat(out, dim=1).view(B, Hkv, T, G * hd)                             # (B, Hkv, T, G*hd)
    return y.transpose(1, 2).reshape(B, T, H * hd)                               # (B, T, H*hd)


def stacked_bias(allowed, n_heads, n_kv_heads, dtype):
    """The additive mask `attend` takes: (B or 1, T, S) booleans -> (B*Hkv or 1, T*G, S) of 0 / -inf,
    the same mask for every KV head, repeated for its G stacked query heads (row t*G + g). Built
    once per forward pass and shared by all layers."""
    Bm, T, S = allowed.shape
    G = n_heads // n_kv_heads
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
    return bias[:, None, :, None].expand(-1, n_kv_heads if Bm > 1 else 1, -1, G, -1).reshape(-1, T * G, S)


class Packing:
    """The real tokens of a right-padded (B, T) batch. On the CPU the linear layers, norms and RoPE
    see only these N tokens, packed as (N, ...), so that padding costs no FLOPs (10 % of a
    length-bucketed bench batch); attention needs the padded (B, T, heads, hd) layout. Pads hold
    zeros there, not uninitialised memory: a masked key still meets its value in `weights @ v`,
    and 0 * NaN is NaN. On GPUs every position is computed (N = B*T): finding the real tokens
    (nonzero) would wait for the device at every batch; pads then hold finite values that every
    mask hides."""

    def __init__(self, mask):
        self.B, self.T = mask.shape
        # (N,) flat indices into B*T, or None: all positions
        self.real = mask.flatten().nonzero()[:, 0] if mask.device.type == "cpu" else None

    def pack(self, t):
        """(B, T, ...) -> (N, ...)."""
        flat = t.reshape(self.B * self.T, *t.shape[2:])
        return flat if self.real is None else flat[self.real]

    def pad(self, t):
        """(N, ...) -> (B, T, ...), zeros at the pads (on the CPU)."""
        if self.real is None:
            return t.view(self.B, self.T, *t.shape[1:])
        padded = t.new_zeros(self.B * self.T, *t.shape[1:]).index_copy(0, self.real, t)
        return padded.view(self.B, self.T, *t.shape[1:])


class MLP(nn.Module):  # SwiGLU
    def __init__(self, cfg):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w_down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past_kv, packing):
        """x (N, D): the batch's real tokens, packed; see Packing."""
        a, kv = self.attention(self.attention_norm(x), cos, sin, mask, past_kv, packing)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


# HF tensor names -> ours; "{}" is the layer number.
HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w_down.weight",
}


def read_safetensors(folder):
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index, required=True).get("weight_map")
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
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"{folder / name}: unreadable safetensors file ({e})") from None
    return tensors


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    def hidden(self, x, positions, mask=None, past=None, past_mask=None):
        """Final-normed hidden states (B, T, D) of input embeddings x (B, T, D) at `positions` (B, T).

        `mask` (B, T) is True on real tokens (default: all); x must be right-padded. Pads cost
        nothing on the CPU (see Packing) and come out as zeros there. Without `past`, attention is causal over x
        alone. With `past` (one (k, v) per layer, each (B or 1, Hkv, S, hd), as returned by an
        earlier call; batch 1 is shared by all B rows) the rows also attend to the S cached
        positions where `past_mask` (B, S) is True (default: all of them). Returns (hidden, kv)
        with kv the keys/values of the S past and these T positions, (B, Hkv, S + T, hd) per
        layer (zeros at pads on the CPU; finite values that every mask hides elsewhere).
        """
        B, T = x.shape[:2]
        packing = Packing(torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask)
        x = packing.pack(x)                                                           # (N, D)
        freqs = packing.pack(positions[..., None]).float() * self.inv_freq            # (N, hd/2)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]                          # (N, 1, hd)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]   # (1, T, T) causal
        if past is not None:
            seen = torch.ones(1, T, past[0][0].shape[2], dtype=torch.bool, device=x.device) \
                if past_mask is None else past_mask[:, None, :].expand(-1, T, -1)      # (B or 1, T, S_past)
            allowed = torch.cat([seen, allowed.expand(len(seen), -1, -1)], dim=-1)  # (B or 1, T, S_past + T)
        attn_mask = attention_mask(allowed, self.cfg.n_heads, self.cfg.n_kv_heads, x.dtype)
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, attn_mask, None if past is None else past[i], packing)
            kvs.append(kv)
        return packing.pad(self.norm(x)), kvs

    def compile_blocks(self):
        """torch.compile every block for inference, with dynamic shapes so that one graph serves all
        batch sizes and lengths (and all 30 blocks: same code, weights passed as inputs). Inductor
        fuses the elementwise work around the matmuls (RMSNorm, RoPE, mask + softmax, SwiGLU,
        residuals) into a few C++ loops: zero-shot scoring ran at 0.85-1.30x eager's pairs/s on the
        2-core CPU in bf16 in the bench runs of three stops, after 15-30 s of compiling. Needs a
        C++ compiler at run time; off unless asked for."""
        for layer in self.layers:
            layer.compile(dynamic=True)
        return self

    def logits(self, h):
        """float32 logits of hidden states h (..., D): call it only where logits are needed."""
        return self.output(h).float()

    def forward(self, ids):
        """float32 logits (B, T, vocab) for token ids (B, T), positions 0..T-1 (right padding is safe)."""
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        h, _ = self.hidden(self.tok_embeddings(ids), positions)
        return self.logits(h)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        path = Path(path)
        cfg = LlamaConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        expected = {name: p.shape for name, p in model.state_dict().items()}
        state = {}
        for hf_name, tensor in read_safetensors(path).items():
            layer = re.search(r"\.(\d+)\.", hf_name)
            template = hf_name.replace(layer.group(0), ".{}.", 1) if layer else hf_name
            if template not in HF_TO_OURS:
                raise ValueError(f"{path}: unexpected tensor '{hf_name}'")
            if hf_name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # some tied checkpoints store a copy; the embedding table is the one used
            name = HF_TO_OURS[template].format(layer.group(1)) if layer else HF_TO_OURS[template]
            if name not in expected:
                raise ValueError(f"{path}: unexpected tensor '{hf_name}' (the config has {cfg.n_layers} layers)")
            if tensor.shape != expected[name]:
                raise ValueError(f"{path}: tensor '{hf_name}' has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(expected[name])}")
            state[name] = tensor.to(device=device, dtype=dtype)
        if cfg.tie_embeddings and "tok_embeddings.weight" in state:
            state["output.weight"] = state["tok_embeddings.weight"]  # tied: one table, both names
        missing = sorted(set(expected) - set(state) - ({"output.weight"} if cfg.tie_embeddings else set()))
        if missing:
            ours_to_hf = {v: k for k, v in HF_TO_OURS.items()}
            first = re.sub(r"\.(\d+)\.", ".{}.", missing[0], count=1)
            num = re.search(r"\.(\d+)\.", missing[0])
            hf = ours_to_hf[first].format(num.group(1)) if num else ours_to_hf[first]
            raise ValueError(f"{path}: missing tensor '{hf}'" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight  # assign=True replaced the shared Parameter
        model.inv_freq = rope_frequencies(cfg).to(device)  # buffers built on meta need real values
        return model.eval().requires_grad_(False)


def reuse_freed_memory():
    """Make glibc keep freed blocks of up to 32 MB for reuse instead of handing them back to the OS.

    By default glibc maps every large tensor afresh and unmaps it when freed, so the first write to
    each 4 KB page of every new activation traps into the kernel. On the 2-core CPU that made the
    elementwise ops after a matmul 3-5x slower (SwiGLU's silu(gate) * up on (50, 81, 1536) bf16:
    9.7 ms -> 2.2 ms) and a whole bf16 block forward 86 ms -> 55 ms. Process-wide, and a no-op on
    a libc without mallopt (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3           # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)               # blocks below 32 MB (glibc's maximum) from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)                # and keep up to 1 GB of freed heap mapped


def default_dtype(device=torch.device("cpu")):
    """bfloat16 on CUDA GPUs that support it and on CPUs that multiply it natively (AVX-512 BF16
    or AMX: 4x fp32 there), else float32: without them PyTorch emulates bf16 matmuls on the CPU,
    measured 0.9 GFLOP/s against fp32's 123 on a 2-core AVX2 EPYC. MPS: float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load(name_or_path, dtype=torch.float32, device="cpu"):
    """The frozen LLM and its tokenizer; checks that every token id has an embedding row.
    Also calls reuse_freed_memory(), since everything that loads the LLM then runs it."""
    reuse_freed_memory()
    path = find_asset(name_or_path, "models")
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_pretrained(path)
    if tokenizer.eos_id is None or not 0 <= tokenizer.eos_id < model.cfg.vocab_size:
        raise ValueError(f"{path}: the eos token id {tokenizer.eos_id} is missing or outside the "
                         f"{model.cfg.vocab_size}-row embedding table (query likelihood ends with eos)")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the embedding table "
                         f"'model.embed_tokens.weight' has only {model.cfg.vocab_size} rows")
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE read from a Hugging Face tokenizer.json (SmolLM2, Llama-3, GPT-2
# families), or a sentencepiece tokenizer.model (Llama-1/2, TinyLlama, Mistral).
#
# The byte-level scheme is GPT-2's (Radford et al. 2019, openai/gpt-2 encoder.py): text -> UTF-8
# bytes -> one printable unicode char per byte, split into "words" by a regex, and each word
# merged by BPE. Every byte has a token, so there is no <unk> and decoding is lossless.
# The pre-tokenizer and decoder rules follow HF `tokenizers` so that ids match it exactly.
# ---------------------------------------------------------------------------------------------

# GPT-2's split: contractions, letter runs, number runs, punctuation runs, each taking at most
# one leading space. `\s+(?!\S)` leaves the last space of a run to the next word, so " world"
# is tokenized the same way after one space or after five.
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> char table: printable Latin-1 bytes stand for themselves, the other 68
    (control chars, space, ...) are shifted to chr(256), chr(257), ... so that every token in
    the vocab is a readable string without whitespace (space is 'Ġ', newline 'Ċ')."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b], shifted = chr(256 + shifted), shifted + 1
    return table


def _split_isolated(pattern):
    """HF 'Isolated' split: every match is a piece, and so is the text between matches."""
    def split(piece):
        out, start = [], 0
        for m in pattern.finditer(piece):
            out += [piece[start:m.start()], m.group()]
            start = m.end()
        out.append(piece[start:])
        return [p for p in out if p]
    return split


def _pre_tokenizer_steps(spec, unsupported):
    """tokenizer.json "pre_tokenizer" -> list of functions piece -> pieces, applied in order."""
    kind = spec["type"]
    if kind == "Sequence":
        return [step for sub in spec["pretokenizers"] for step in _pre_tokenizer_steps(sub, unsupported)]
    if kind == "Digits":  # HF uses char::is_numeric, i.e. any \p{N}, not just 0-9
        return [_split_isolated(regex.compile(r"\p{N}" if spec["individual_digits"] else r"\p{N}+"))]
    if kind == "ByteLevel":
        steps = [lambda p: [p if p.startswith(" ") else " " + p]] if spec.get("add_prefix_space") else []
        return steps + ([_split_isolated(GPT2_SPLIT)] if spec.get("use_regex", True) else [])
    if kind == "Split" and spec["behavior"] == "Isolated" and not spec.get("invert"):
        pattern = spec["pattern"]  # Llama-3 stores {"Regex": ...}; {"String": ...} is a literal
        pattern = pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])
        return [_split_isolated(regex.compile(pattern))]
    raise unsupported(f"pre_tokenizer {kind!r} {({k: v for k, v in spec.items() if k != 'type'})}")


def _read_json(path: Path, required=False) -> dict:
    """A JSON file's object ({} when it is absent and not required); bad JSON names the file."""
    if not path.exists() and not required:
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _template_adds_bos(post) -> bool:
    """Llama-3 adds <|begin_of_text|> through a TemplateProcessing post-processor."""
    if not post:
        return False
    if post["type"] == "Sequence":
        return any(_template_adds_bos(p) for p in post["processors"])
    return post["type"] == "TemplateProcessing" and "SpecialToken" in post["single"][0]


class Tokenizer:
    """text <-> ids. encode() never adds BOS/EOS; callers prepend bos_id when add_bos is True."""

    def __init__(self, bos_id, eos_id, add_bos, vocab_size, sp=None):
        self.bos_id, self.eos_id, self.add_bos, self.vocab_size, self.sp = bos_id, eos_id, add_bos, vocab_size, sp

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        folder = Path(path)
        json_file, sp_file = folder / "tokenizer.json", folder / "tokenizer.model"
        if json_file.exists():
            try:
                return cls._from_tokenizer_json(json_file)
            except ValueError:
                if not sp_file.exists():  # Llama-2 ships both; its tokenizer.json is not byte-level
                    raise
        if sp_file.exists():
            sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
            add_bos = _read_json(folder / "tokenizer_config.json").get("add_bos_token", True)
            ids = [i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id())]  # -1 = not defined
            return cls(ids[0], ids[1], add_bos, sp.get_piece_size(), sp=sp)
        raise FileNotFoundError(f"no tokenizer in {folder}: looked for tokenizer.json and tokenizer.model")

    @classmethod
    def _from_tokenizer_json(cls, file: Path) -> "Tokenizer":
        def unsupported(what):
            return ValueError(f"{file}: unsupported {what}; only byte-level BPE tokenizer.json is implemented")
        spec = _read_json(file, required=True)
        model = spec.get("model", {})
        if model.get("type") != "BPE":
            raise unsupported(f"model type {model.get('type')!r}")
        if spec.get("normalizer") is not None:  # byte-level models leave the text untouched
            raise unsupported(f"normalizer {spec['normalizer']}")
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise unsupported(f"decoder {spec.get('decoder')}")
        no_split = {"type": "Sequence", "pretokenizers": []}
        steps = _pre_tokenizer_steps(spec.get("pre_tokenizer") or no_split, unsupported)
        vocab = model["vocab"]
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        token_ids = {**vocab, **added}
        folder = file.parent
        config, tok_config = _read_json(folder / "config.json"), _read_json(folder / "tokenizer_config.json")

        def special_id(name):  # config.json's id, else the id of tokenizer_config's token string
            value = config.get(f"{name}_token_id")
            if value is None:
                token = tok_config.get(f"{name}_token")
                value = token_ids.get(token["content"] if isinstance(token, dict) else token)
            return value[0] if isinstance(value, list) else value  # Llama-3.1 lists several eos ids

        add_bos = tok_config.get("add_bos_token", _template_adds_bos(spec.get("post_processor")))
        tok = cls(special_id("bos"), special_id("eos"), bool(add_bos), max(token_ids.values()) + 1)
        tok.steps, tok.vocab, tok.ignore_merges = steps, vocab, model.get("ignore_merges", False)
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tok.ranks = {pair: rank for rank, pair in enumerate(merges)}  # lower rank = learned earlier = merged first
        byte_char = bytes_to_unicode()
        tok.byte_chars = str.maketrans({chr(b): c for b, c in byte_char.items()})  # latin-1 char -> GPT-2 char
        char_byte = {c: b for b, c in byte_char.items()}
        # Decoding follows HF's ByteLevel decoder: a token made of table chars is mapped back to its
        # bytes; any other token (e.g. an added token with non-table chars) is taken as its UTF-8.
        tok.id_bytes = {i: bytes(char_byte[c] for c in t) if all(c in char_byte for c in t) else t.encode()
                        for t, i in token_ids.items()}
        tok.cache = {}  # pre-token -> ids; passages repeat the same words over and over
        return tok

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS/EOS. Special-token strings in `text` (e.g. "<|im_end|>") are NOT
        mapped to their special ids (HF does that): text from a web passage must not be able to
        close the prompt's turn or inject control tokens. Here they are just characters."""
        if self.sp is not None:
            return self.sp.encode(text)  # sentencepiece only matches user-defined symbols, not <s>/</s>
        pieces = [text]
        for step in self.steps:
            pieces = [p for piece in pieces for p in step(piece)]
        ids = []
        for piece in pieces:
            if piece not in self.cache:
                self.cache[piece] = self._bpe(piece)
            ids.extend(self.cache[piece])
        return ids

    def _bpe(self, piece: str) -> list[int]:
        word = piece.encode("utf-8").decode("latin-1").translate(self.byte_chars)  # bytes as GPT-2 chars
        if self.ignore_merges and word in self.vocab:  # Llama-3: a word that is a token stays whole
            return [self.vocab[word]]
        parts = list(word)
        while len(parts) > 1:
            # merge the adjacent pair with the lowest rank (leftmost on ties), until none is mergeable
            rank, i = min((self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.vocab[p] for p in parts]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        # join bytes first: one character's UTF-8 bytes may be spread over several tokens
        return b"".join(self.id_bytes[i] for i in ids).decode("utf-8", errors="replace")


def main():
    parser = argparse.ArgumentParser(description="Load a Llama checkpoint and greedily continue a prompt.")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="a name under $QPEFT_HOME/models, or a folder")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=20, help="how many tokens to generate")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load(args.model, dtype=getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())  # a tied table is counted once
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, {args.dtype}, loaded in {time.perf_counter() - start:.2f} s")
    ids = ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(args.prompt)
    with torch.no_grad():
        for _ in range(args.tokens):  # no KV cache: the demo recomputes the whole sequence each step
            next_id = model(torch.tensor([ids]))[0, -1].argmax().item()
            if next_id == tokenizer.eos_id:
                break
            ids.append(next_id)
    print(tokenizer.decode(ids))


if __name__ == "__main__":
    main()
