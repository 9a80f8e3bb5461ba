"""Opt-in CPU speed for model.py's Llama: the same weights and numbers, less work per token.

  PackedTransformer  model.Transformer whose linear layers, norms and RoPE see only the real
                     tokens of a padded batch, and whose attention skips the scores that the
                     causal mask hides (blocks of ATTENTION_BLOCK query positions)
  reuse_freed_memory glibc keeps freed tensors' pages mapped (fewer page faults)
  native_bf16        whether this CPU multiplies bfloat16 in hardware

runtime.load_llm takes PackedTransformer on the CPU in float32, where bench.py measures it faster
than model.Transformer (SDPA over padded batches) on the same pairs (2-core AMD EPYC: scoring
1.03x, training 1.12x); in bfloat16 it was no faster (emulated bf16 here; on an AVX-512 BF16 CPU
SDPA was faster), so bfloat16 and GPUs take model.Transformer. A reader who copies the model needs
none of this file.
"""

import ctypes

import torch

import model

ATTENTION_BLOCK = 32  # query positions per block in `attend`


class Packing:
    """The N real tokens of a right-padded (B, T) batch, packed as (N, ...) for the linear layers,
    norms and RoPE, so that padding costs no FLOPs. Attention needs the padded layout, zeros at
    the pads: a masked key still meets its value in `weights @ v`, and 0 * NaN is NaN."""

    def __init__(self, mask):
        self.B, self.T = mask.shape
        self.real = mask.flatten().nonzero()[:, 0]  # (N,) flat indices into B*T

    def pack(self, t):
        """(B, T, ...) -> (N, ...)."""
        return t.reshape(self.B * self.T, *t.shape[2:])[self.real]  # (N, ...)

    def pad(self, t):
        """(N, ...) -> (B, T, ...), zeros at the pads."""
        padded = t.new_zeros(self.B * self.T, *t.shape[1:])  # (B*T, ...)
        padded = padded.index_copy(0, self.real, t)  # (B*T, ...)
        return padded.view(self.B, self.T, *t.shape[1:])  # (B, T, ...)


def attention_bias(allowed, n_heads, n_kv_heads, dtype):
    """`attend`'s additive mask for (Bm, T, S) booleans (True: may attend; Bm = B or 1), built
    once per forward pass and shared by all layers: 0 and -inf, the same for every KV head (Bm > 1
    only) and repeated for its G stacked query heads (row t*G + g)."""
    Bm, T, S = allowed.shape
    G, Hkv = n_heads // n_kv_heads, n_kv_heads if Bm > 1 else 1
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)  # (Bm, T, S)
    bias = bias.masked_fill(~allowed, float("-inf"))  # (Bm, T, S)
    bias = bias[:, None, :, None].expand(-1, Hkv, -1, G, -1)  # (Bm, Hkv, T, G, S)
    return bias.reshape(-1, T * G, S)  # (Bm*Hkv, T*G, S)


def attend(q, k, v, bias):
    """Causal softmax attention of q (B, T, H, hd), the last T of S positions, over k, v
    (B, Hkv, S, hd), with `bias` from attention_bias. The G = H // Hkv query heads that share a
    KV head are stacked along the row axis (row t*G + g), so one batched matmul serves them all
    without copying keys, and baddbmm adds the bias and the 1/sqrt(hd) scale inside it.
    Causal: query position t never sees keys after S - T + t, so the rows go in blocks of
    ATTENTION_BLOCK positions and each block computes only the keys it can see (fewer scores,
    and each block's stay in cache). torch.softmax computes in fp32, rounds to q's dtype."""
    B, T, H, hd = q.shape
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


class PackedBlock(model.Block):
    def forward(self, x, cos, sin, bias, past_kv, packing):
        """x (N, D): the batch's real tokens, packed."""
        attention = self.attention
        q, k, v = attention.project(self.attention_norm(x), cos, sin)  # (N, H or Hkv, hd)
        q = packing.pad(q)  # (B, T, H, hd)
        k, v = packing.pad(k).transpose(1, 2), packing.pad(v).transpose(1, 2)  # (B, Hkv, T, hd)
        if past_kv is not None:  # an earlier prefix's keys/values come first; batch 1 serves all
            k = torch.cat([past_kv[0].expand(packing.B, -1, -1, -1), k], dim=2)  # (B, Hkv, S, hd)
            v = torch.cat([past_kv[1].expand(packing.B, -1, -1, -1), v], dim=2)  # (B, Hkv, S, hd)
        x = x + attention.wo(packing.pack(attend(q, k, v, bias)))  # (N, D)
        return x + self.mlp(self.mlp_norm(x)), (k, v)  # (N, D)


class PackedTransformer(model.Transformer):
    """model.Transformer's numbers (to float rounding) with less work on the CPU; pads come out as
    zeros, in the hidden states and in the keys/values."""

    Block = PackedBlock

    def hidden(self, x, positions, mask=None, past=None, past_mask=None):
        """As model.Transformer.hidden; `mask` (B, T), True on real tokens, saves the pads' work."""
        B, T = x.shape[:2]
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        packing = Packing(mask)
        x = packing.pack(x)  # (N, D)
        cos, sin = self.rotation(packing.pack(positions), x.dtype)  # (N, 1, hd) each
        allowed = self.allowed(T, past, past_mask)  # (B or 1, T, S)
        bias = attention_bias(allowed, self.cfg.n_heads, self.cfg.n_kv_heads, x.dtype)
        kvs = []
        for layer, past_kv in zip(self.layers, past or [None] * len(self.layers)):
            x, kv = layer(x, cos, sin, bias, past_kv, packing)  # (N, D)
            kvs.append(kv)
        return packing.pad(self.norm(x)), kvs  # (B, T, D)


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


def native_bf16():
    """AVX-512 BF16 or AMX: without them PyTorch emulates bf16 matmuls, far slower than fp32."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()
