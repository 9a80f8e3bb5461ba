"""A decoder-only Llama in plain PyTorch, loaded straight from Hugging Face safetensors:
RMSNorm, rotate-half RoPE (with the llama3 frequency rule), grouped-query attention, SwiGLU MLP.
Enough to score with SmolLM2, TinyLlama and Llama-2/3 (model_type "llama"); no generation.

  load(folder)                    -> the frozen model and its tokenizer (tokenizer.py)
  model(ids)                      -> float32 logits (B, T, vocab): the plain API
  model.hidden(x, positions, ...) -> final-normed hidden states of embeddings x, optionally also
                                     attending to the cached keys/values of a prefix (qpeft.py
                                     reuses a passage's keys/values for many queries)

Credits: the layout follows Meta's Llama reference and HF transformers' LlamaForCausalLM
(rotate-half RoPE so q_proj/k_proj load without permutation); the structure borrows from nanoGPT
and gpt-fast.
"""

import ctypes
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from tokenizer import Tokenizer, read_json


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
            what = f"model_type {c.get('model_type')!r}"
            raise ValueError(f"{path}: {what} is not supported (only 'llama')")
        # transformers 5 writes RoPE settings as "rope_parameters" {"rope_theta", "rope_type", ...};
        # older configs (and the Hub's) as top-level "rope_theta" + "rope_scaling". Read both.
        rope = c.get("rope_parameters") or {}
        theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        default = rope.get("rope_type", "default") == "default"
        scaling = c.get("rope_scaling") or (None if default else rope)
        kind = scaling and scaling.get("rope_type", scaling.get("type"))
        if scaling is not None and kind != "llama3":
            what = f"rope_scaling type {kind!r}"
            raise ValueError(f"{path}: {what} is not supported (only null or 'llama3')")
        if c.get("hidden_act", "silu") != "silu":
            what = f"hidden_act {c['hidden_act']!r}"
            raise ValueError(f"{path}: {what} is not supported (only 'silu', SwiGLU)")
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise ValueError(f"{path}: {flag}=true is not supported")
        required = "hidden_size num_hidden_layers num_attention_heads intermediate_size vocab_size"
        if missing := [key for key in required.split() if key not in c]:
            raise ValueError(f"{path}: required key '{missing[0]}' is missing")
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
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, past_kv, packing):
        N, H, Hkv, hd = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim  # x (N, D)
        q = apply_rope(self.wq(x).view(N, H, hd), cos, sin)  # (N, H, hd): real tokens only
        k = apply_rope(self.wk(x).view(N, Hkv, hd), cos, sin)  # (N, Hkv, hd)
        v = self.wv(x).view(N, Hkv, hd)  # (N, Hkv, hd)
        q = packing.pad(q)  # (B, T, H, hd)
        k, v = packing.pad(k).transpose(1, 2), packing.pad(v).transpose(1, 2)  # (B, Hkv, T, hd)
        if past_kv is not None:  # an earlier prefix's keys/values come first; batch 1 serves all
            k = torch.cat([past_kv[0].expand(packing.B, -1, -1, -1), k], dim=2)  # (B, Hkv, S, hd)
            v = torch.cat([past_kv[1].expand(packing.B, -1, -1, -1), v], dim=2)  # (B, Hkv, S, hd)
        y = attend(q, k, v, mask)  # (B, T, H * hd)
        return self.wo(packing.pack(y)), (k, v)  # (N, D), and the keys/values of all S positions


ATTENTION_BLOCK = 32  # query positions per block in `attend`


def use_sdpa(device):
    """F.scaled_dot_product_attention's fused kernels on GPUs; on the CPU the written-out blocks of
    `attend`, which skip most of the masked scores that SDPA computes."""
    return device.type != "cpu"


def attention_mask(allowed, n_heads, n_kv_heads, dtype):
    """`attend`'s mask for (Bm, T, S) booleans (True: may attend; Bm = B or 1), built once per
    forward pass and shared by all layers. For SDPA the booleans; for the CPU blocks an additive
    bias of 0 and -inf, the same for every KV head (Bm > 1 only) and repeated for its G stacked
    query heads (row t*G + g)."""
    if use_sdpa(allowed.device):
        return allowed[:, None]  # (Bm, 1, T, S)
    Bm, T, S = allowed.shape
    G, Hkv = n_heads // n_kv_heads, n_kv_heads if Bm > 1 else 1
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)  # (Bm, T, S)
    bias = bias.masked_fill(~allowed, float("-inf"))  # (Bm, T, S)
    bias = bias[:, None, :, None].expand(-1, Hkv, -1, G, -1)  # (Bm, Hkv, T, G, S)
    return bias.reshape(-1, T * G, S)  # (Bm*Hkv, T*G, S)


def attend(q, k, v, mask):
    """Causal softmax attention of q (B, T, H, hd), the last T of S positions, over k, v
    (B, Hkv, S, hd), with `mask` from attention_mask. Query head h reads KV head h // G
    (G = H // Hkv) without copying keys: on GPUs through SDPA's enable_gqa; on the CPU the G query
    heads of a group are stacked along the row axis (row t*G + g), so one batched matmul serves
    them all, and baddbmm adds the bias (0 or -inf) and the 1/sqrt(hd) scale inside it.
    Causal: query position t never sees keys after S - T + t, so the rows go in blocks of
    ATTENTION_BLOCK positions and each block computes only the keys it can see (fewer scores,
    and each block's stay in cache). torch.softmax computes in fp32, rounds to q's dtype."""
    B, T, H, hd = q.shape
    if use_sdpa(q.device):
        qh = q.transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(qh, k, v, mask, enable_gqa=True)  # (B, H, T, hd)
        return y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H*hd)
    bias = mask  # (B*Hkv or 1, T*G, S)
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = q.view(B, T, Hkv, G, hd).transpose(1, 2).reshape(B * Hkv, T * G, hd)  # (B*Hkv, T*G, hd)
    keys, values = k.reshape(B * Hkv, S, hd), v.reshape(B * Hkv, S, hd)  # (B*Hkv, S, hd)
    # Under torch.compile one block: a loop over T would specialise the graph to every length.
    edges = [0, T] if torch.compiler.is_compiling() else [*range(0, T, ATTENTION_BLOCK), T]
    out = []
    for start, end in zip(edges, edges[1:]):
        seen = S - T + end  # keys visible to rows < end
        block = slice(start * G, end * G)  # r = (end - start) * G rows
        q_block = rows[:, block]  # (B*Hkv, r, hd)
        k_seen = keys[:, :seen].transpose(1, 2)  # (B*Hkv, hd, seen)
        bias_block = bias[:, block, :seen]  # (B*Hkv or 1, r, seen)
        scores = torch.baddbmm(bias_block, q_block, k_seen, alpha=hd**-0.5)  # (B*Hkv, r, seen)
        out.append(torch.softmax(scores, dim=-1) @ values[:, :seen])  # (B*Hkv, r, hd)
    y = torch.cat(out, dim=1).view(B, Hkv, T, G * hd)  # (B, Hkv, T, G*hd)
    return y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H*hd)


class Packing:
    """The N real tokens of a right-padded (B, T) batch: on the CPU the linear layers, norms and
    RoPE see only them, packed as (N, ...), so padding costs no FLOPs. Attention needs the padded
    layout, zeros at the pads: a masked key still meets its value in `weights @ v`, and 0 * NaN is
    NaN. On GPUs every position is computed (N = B*T): finding the real tokens (nonzero) would wait
    for the device at every batch; pads then hold finite values that every mask hides."""

    def __init__(self, mask):
        self.B, self.T = mask.shape
        # (N,) flat indices into B*T, or None: all positions
        self.real = mask.flatten().nonzero()[:, 0] if mask.device.type == "cpu" else None

    def pack(self, t):
        """(B, T, ...) -> (N, ...)."""
        flat = t.reshape(self.B * self.T, *t.shape[2:])  # (B*T, ...)
        return flat if self.real is None else flat[self.real]  # (N, ...)

    def pad(self, t):
        """(N, ...) -> (B, T, ...), zeros at the pads (on the CPU)."""
        if self.real is None:
            return t.view(self.B, self.T, *t.shape[1:])  # (B, T, ...)
        padded = t.new_zeros(self.B * self.T, *t.shape[1:])  # (B*T, ...)
        padded = padded.index_copy(0, self.real, t)  # (B*T, ...)
        return padded.view(self.B, self.T, *t.shape[1:])  # (B, T, ...)


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

    def forward(self, x, cos, sin, mask, past_kv, packing):
        """x (N, D): the batch's real tokens, packed; see Packing."""
        a, kv = self.attention(self.attention_norm(x), cos, sin, mask, past_kv, packing)  # (N, D)
        x = x + a  # (N, D)
        return x + self.mlp(self.mlp_norm(x)), kv  # (N, D)


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
        """(hidden, kv): final-normed hidden states (B, T, D) of embeddings x (B, T, D) at
        `positions` (B, T), and per layer the keys/values (B, Hkv, S + T, hd) of the past and x.

        `mask` (B, T) is True on real tokens (default: all); x must be right-padded; pads come out
        as zeros on the CPU (see Packing). `past`, one (k, v) per layer of shape (B or 1, Hkv, S,
        hd) from an earlier call (batch 1: shared by all rows), is attended to where `past_mask`
        (B, S) is True (default: everywhere); attention over x itself is causal."""
        B, T = x.shape[:2]
        dev = x.device
        packing = Packing(torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask)
        x = packing.pack(x)  # (N, D)
        freqs = packing.pack(positions[..., None]).float() * self.inv_freq  # (N, hd/2)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (N, 1, hd)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (N, 1, hd) each
        allowed = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None]  # (1, T, T) causal
        if past is not None:
            S_past = past[0][0].shape[2]
            if past_mask is None:
                seen = torch.ones(1, T, S_past, dtype=torch.bool, device=dev)  # (1, T, S_past)
            else:
                seen = past_mask[:, None, :].expand(-1, T, -1)  # (B, T, S_past)
            allowed = torch.cat([seen, allowed.expand(len(seen), -1, -1)], dim=-1)  # (B or 1, T, S)
        attn_mask = attention_mask(allowed, self.cfg.n_heads, self.cfg.n_kv_heads, x.dtype)
        kvs = []
        for layer, past_kv in zip(self.layers, past or [None] * len(self.layers)):
            x, kv = layer(x, cos, sin, attn_mask, past_kv, packing)  # (N, D)
            kvs.append(kv)
        return packing.pad(self.norm(x)), kvs  # (B, T, D)

    def compile_blocks(self):
        """torch.compile every block, dynamic shapes: one graph serves all batch sizes, lengths and
        blocks (weights are inputs). Inductor fuses the elementwise work around the matmuls into
        a few C++ loops; needs a C++ compiler and time to compile, so it is off unless asked for."""
        for layer in self.layers:
            layer.compile(dynamic=True)
        return self

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
        layers = range(cfg.n_layers)  # every HF tensor name this config has -> ours:
        names = {hf.format(i): ours.format(i) for hf, ours in HF_TO_OURS.items() for i in layers}
        state = {}
        for hf_name, tensor in read_safetensors(path).items():
            if hf_name not in names:
                template = re.sub(r"\.\d+\.", ".{}.", hf_name, count=1)  # known, layer too high?
                why = f" (the config has {cfg.n_layers} layers)" if template in HF_TO_OURS else ""
                raise ValueError(f"{path}: unexpected tensor '{hf_name}'{why}")
            if hf_name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # some tied checkpoints store a copy; the embedding table is the one used
            name = names[hf_name]
            if tensor.shape != expected[name]:
                raise ValueError(
                    f"{path}: tensor '{hf_name}' has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(expected[name])}"
                )
            state[name] = tensor.to(device=device, dtype=dtype)
        if cfg.tie_embeddings and "tok_embeddings.weight" in state:
            state["output.weight"] = state["tok_embeddings.weight"]  # tied: one table, both names
        tied = {"output.weight"} if cfg.tie_embeddings else set()
        if missing := sorted(set(expected) - set(state) - tied):
            hf = next(hf for hf, ours in names.items() if ours == missing[0])
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ValueError(f"{path}: missing tensor '{hf}'{more}")
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_embeddings:  # assign=True replaced the shared Parameter
            model.output.weight = model.tok_embeddings.weight
        model.inv_freq = rope_frequencies(cfg).to(device)  # buffers built on meta need real values
        return model.eval().requires_grad_(False)


def reuse_freed_memory():
    """Make glibc keep freed blocks of up to 32 MB for reuse instead of handing them back to the OS:
    by default every large tensor is mapped afresh, and the first write to each of its pages traps
    into the kernel, which slows the elementwise ops after each matmul several times on a small
    CPU. Process-wide; a no-op on a libc without mallopt (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks below 32 MB (glibc's maximum) from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and keep up to 1 GB of freed heap mapped


def default_dtype(device=torch.device("cpu")):
    """bfloat16 on CUDA GPUs that support it and on CPUs that multiply it natively (AVX-512 BF16
    or AMX), else float32: without them PyTorch emulates bf16 matmuls on the CPU, far slower
    than fp32. MPS: float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load(folder, dtype=torch.float32, device="cpu"):
    """The frozen LLM in `folder` (resolve a model name with data.find_asset) and its tokenizer;
    checks that every token id has an embedding row. Also calls reuse_freed_memory(), since
    everything that loads the LLM then runs it."""
    reuse_freed_memory()
    model = Transformer.from_pretrained(folder, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_pretrained(folder)
    rows = model.cfg.vocab_size
    if tokenizer.eos_id is None or not 0 <= tokenizer.eos_id < rows:
        raise ValueError(
            f"{folder}: the eos token id {tokenizer.eos_id} is missing or outside the "
            f"{rows}-row embedding table (query likelihood ends with eos)"
        )
    if tokenizer.vocab_size > rows:
        raise ValueError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the embedding "
            f"table 'model.embed_tokens.weight' has only {rows} rows"
        )
    return model, tokenizer
