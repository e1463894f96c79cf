"""Stage D: the non-autoregressive CTC speech decoder (hidden states -> discrete units).

Input: c_1..c_M, the LLM's final-layer hidden state that predicted each answer token.
Each c_i is repeated lambda times (upsampling), projected to the decoder width, run
through a few causal LLaMA-style layers (RMSNorm, RoPE, SwiGLU; no final norm, as in
the published model) and projected to K+1 classes (K units + the CTC blank, id K).

Because the layers are causal, the outputs for a prefix never change when more tokens
arrive. Streaming uses that: inside `with decoder.streaming(batch_size):` each call
appends the new tokens' lambda*m positions to a per-layer KV cache, so a new token costs
lambda positions instead of a recomputation of the whole prefix.

With full causal attention (the published model) a step still attends over every earlier
position, so its cost grows with the answer. `attention_window` (our models' option)
limits each position to the last W positions: the step cost and the cache stop growing
once the answer is W/lambda tokens long, and streaming still equals one-shot decoding.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llama_omni.configbase import ConfigBase, require
from llama_omni.streaming import StreamingModule

IGNORE_INDEX = -100


@dataclass
class SpeechDecoderConfig(ConfigBase):
    input_width: int  # width of the LLM hidden states c_i
    n_layers: int = 2
    width: int = 4096
    n_heads: int = 32
    ffn: int = 11008
    upsample: int = 25  # lambda
    unit_vocab: int = 1000  # K; the blank is id K
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. Llama-3.1's {"rope_type": "llama3", ...}
    rms_eps: float = 1e-5
    final_norm: bool = False  # the published decoder has none
    # Each position attends to itself and the W-1 positions before it (upsampled frames);
    # None = full causal attention, as in the published model.
    attention_window: int | None = None
    # Our models' option: each c_i comes with the LLM's input embedding of token i (the
    # token it predicted: teacher-forced in training, the sampled one at inference),
    # concatenated after it, so input_width is twice the LLM width. A state alone only
    # carries a distribution over token i; a small LLM is often unsure which token it will
    # emit, and then the decoder cannot know which word to speak.
    token_input: bool = False
    # Our models' option: each upsampled copy of a state gets a learnt vector for its index
    # among its token's lambda copies. Without it only the causal attention over identical
    # copies can tell the decoder where inside a token it is, and so which of the token's
    # ~10 units to emit there; two small layers find that hard.
    copy_position: bool = False
    # Our models' option: dropout on each layer's attention and feed-forward outputs, in
    # training only. A small decoder trained on a few thousand answers learns the training
    # answers far better than new ones (CTC loss ~1.4 against ~2.3 held out).
    dropout: float = 0.0
    # Our models' option: one token of lookahead. The positions of token i also read the
    # input of token i+1 (zeros after the last token) through `lookahead_proj`, which starts
    # at zero. A token's sound depends on its neighbour (a word split into pieces, the
    # joins between words); the price is that token i's units wait for token i+1.
    lookahead: bool = False
    # Inference only: subtracted from the blank's log-probability before the greedy choice.
    # A small CTC decoder emits too few units (ours: about 3/4 of the reference answers'),
    # dropping sounds; a penalty > 0 lets more units through. Training ignores it.
    blank_penalty: float = 0.0

    def __post_init__(self) -> None:
        for name in ("input_width", "n_layers", "width", "n_heads", "ffn", "upsample", "unit_vocab"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value > 0,
                f"SpeechDecoderConfig.{name} must be a positive integer, got {value!r}",
            )
        require(
            self.width % self.n_heads == 0 and (self.width // self.n_heads) % 2 == 0,
            f"SpeechDecoderConfig: width {self.width} must split into {self.n_heads} heads of even size",
        )
        require(self.rope_theta > 0, "SpeechDecoderConfig.rope_theta must be positive")
        require(
            self.attention_window is None
            or (isinstance(self.attention_window, int) and self.attention_window > 0),
            "SpeechDecoderConfig.attention_window must be a positive integer or null, "
            f"got {self.attention_window!r}",
        )
        require(0.0 <= self.dropout < 1.0, f"SpeechDecoderConfig.dropout must be in [0, 1), got {self.dropout!r}")
        require(
            not isinstance(self.blank_penalty, bool) and math.isfinite(self.blank_penalty)
            and self.blank_penalty >= 0,
            f"SpeechDecoderConfig.blank_penalty must be a finite number >= 0, got {self.blank_penalty!r}",
        )
        if self.rope_scaling is not None:
            kind = _rope_type(self.rope_scaling)
            require(
                kind in ("default", "linear", "llama3"),
                f"SpeechDecoderConfig.rope_scaling type {kind!r} is not supported "
                "(supported: default, linear, llama3)",
            )

    @property
    def blank_id(self) -> int:
        return self.unit_vocab

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @classmethod
    def preset(cls, name: str, input_width: int | None = None) -> "SpeechDecoderConfig":
        presets = {
            "llama-omni-8b": dict(
                input_width=4096,
                rope_theta=500000.0,
                rope_scaling=dict(LLAMA31_ROPE_SCALING),
            ),
            "tiny-test": dict(
                input_width=64, n_layers=2, width=64, n_heads=4, ffn=128, upsample=25,
                unit_vocab=32, rope_theta=10000.0,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown speech decoder preset {name!r}; known: {sorted(presets)}")
        values = presets[name]
        if input_width is not None:
            values = {**values, "input_width": input_width}
        return cls(**values)

    @classmethod
    def from_published(cls, config: dict[str, Any]) -> "SpeechDecoderConfig":
        """Read the published checkpoint's config.json (ctc_decoder_config is a string)."""
        spec = config.get("ctc_decoder_config")
        match = re.fullmatch(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)\s*", str(spec))
        if match is None:
            raise ValueError(
                f"config.json ctc_decoder_config must look like '(layers,width,heads,ffn)', got {spec!r}"
            )
        n_layers, width, n_heads, ffn = map(int, match.groups())
        scaling = config.get("rope_scaling")
        return cls(
            input_width=int(config["hidden_size"]),
            n_layers=n_layers, width=width, n_heads=n_heads, ffn=ffn,
            upsample=int(config.get("ctc_upsample_factor", 25)),
            unit_vocab=int(config.get("unit_vocab_size", 1000)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=dict(scaling) if scaling else None,
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        )


LLAMA31_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _rope_type(scaling: dict[str, Any]) -> str:
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim/2] RoPE inverse frequencies, with Llama-3.1's frequency-dependent scaling."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None or _rope_type(scaling) == "default":
        return inv.float()
    if _rope_type(scaling) == "linear":
        return (inv / float(scaling["factor"])).float()
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelength > original / low, inv / factor, inv)
    blend = (original / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(in_band, blended, scaled).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerCache:
    """Keys and values of one layer over the positions a new query may still see.

    Stored in a buffer that grows by doubling, so appending lambda positions per text
    token copies nothing in the common case (a torch.cat per step would copy the whole
    cache and make each step cost grow with the answer length). With an attention window
    W, positions older than the last W-1 are dropped when the buffer is full, so memory
    stays bounded and the amortized copy per position stays constant.
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self._keys: torch.Tensor | None = None  # [B, H, capacity, hd]
        self._values: torch.Tensor | None = None
        self.offset = 0  # absolute position held in buffer slot 0
        self.length = 0  # positions seen so far (absolute end)

    @property
    def empty(self) -> bool:
        return self.length == 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, H, T, hd] keys/values; returns views over the positions the new
        queries may see, which end at the new absolute length."""
        past, end = self.length, self.length + k.shape[2]
        first = self.offset if self.window is None else max(self.offset, past - (self.window - 1))
        if self._keys is None or end - self.offset > self._keys.shape[2]:
            capacity = max(2 * (end - first), 256)
            keys = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            values = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if self._keys is not None:
                kept = slice(first - self.offset, past - self.offset)
                keys[:, :, : past - first] = self._keys[:, :, kept]
                values[:, :, : past - first] = self._values[:, :, kept]
            self._keys, self._values, self.offset = keys, values, first
        self._keys[:, :, past - self.offset : end - self.offset] = k
        self._values[:, :, past - self.offset : end - self.offset] = v
        self.length = end
        seen = slice(first - self.offset, end - self.offset)
        return self._keys[:, :, seen], self._values[:, :, seen]


def attention_mask(
    query_start: int, queries: int, key_start: int, keys: int, window: int | None, device
) -> torch.Tensor:
    """[Q, K] bool: query at absolute position p sees keys at positions (p - W, p]."""
    query_pos = torch.arange(query_start, query_start + queries, device=device)[:, None]
    key_pos = torch.arange(key_start, key_start + keys, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed


class Attention(nn.Module):
    """Causal multi-head self-attention (no grouped-query heads), HF Llama parameter names."""

    def __init__(self, config: SpeechDecoderConfig, device=None, dtype=None):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.window = config.attention_window
        w = config.width
        self.q_proj = nn.Linear(w, w, bias=False, device=device, dtype=dtype)
        self.k_proj = nn.Linear(w, w, bias=False, device=device, dtype=dtype)
        self.v_proj = nn.Linear(w, w, bias=False, device=device, dtype=dtype)
        self.o_proj = nn.Linear(w, w, bias=False, device=device, dtype=dtype)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]

    def forward(self, x, cos, sin, cache: LayerCache | None) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        new = q.shape[2]
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.extend(k, v)
        if past == 0 and self.window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            first = past + new - k.shape[2]  # absolute position of the first visible key
            allowed = attention_mask(past, new, first, k.shape[2], self.window, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        batch = x.shape[0]
        return self.o_proj(out.transpose(1, 2).reshape(batch, new, -1))  # [B, T, D]


class FeedForward(nn.Module):
    def __init__(self, config: SpeechDecoderConfig, device=None, dtype=None):
        super().__init__()
        w, f = config.width, config.ffn
        self.gate_proj = nn.Linear(w, f, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(w, f, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(f, w, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: SpeechDecoderConfig, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.width, config.rms_eps, device, dtype)
        self.self_attn = Attention(config, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.width, config.rms_eps, device, dtype)
        self.mlp = FeedForward(config, device, dtype)
        self.dropout = nn.Dropout(config.dropout)  # identity in eval mode

    def forward(self, x, cos, sin, cache: LayerCache | None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


@dataclass
class DecoderState:
    batch_size: int
    caches: list[LayerCache]
    positions: int = 0  # upsampled positions already in the cache
    last_symbol: torch.Tensor | None = None  # [B] argmax at the last position (for collapse)
    pending: torch.Tensor | None = None  # [B, 1, Din] with lookahead: the token awaiting its next


class SpeechDecoder(StreamingModule[DecoderState]):
    def __init__(self, config: SpeechDecoderConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.input_proj = nn.Linear(config.input_width, config.width, device=device, dtype=dtype)
        # Zero at first: switching it on leaves a trained decoder's outputs unchanged.
        self.copy_embedding = (
            nn.Parameter(torch.zeros(config.upsample, config.input_width, device=device, dtype=dtype))
            if config.copy_position else None
        )  # [lambda, Din]
        self.lookahead_proj = (
            nn.Linear(config.input_width, config.width, bias=False, device=device, dtype=dtype)
            if config.lookahead else None
        )
        if self.lookahead_proj is not None:
            nn.init.zeros_(self.lookahead_proj.weight)  # starts as the decoder without lookahead
        self.layers = nn.ModuleList(DecoderLayer(config, device, dtype) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.width, config.rms_eps, device, dtype) if config.final_norm else None
        self.output_proj = nn.Linear(config.width, config.unit_vocab + 1, device=device, dtype=dtype)
        inv = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv, persistent=False)

    def reconfigured(self, **changes: Any) -> tuple["SpeechDecoder", bool]:
        """A decoder with config fields changed, on this one's device and dtype, and whether
        it kept these weights (they fit, e.g. for a new attention_window) or starts fresh.

        A wider input (e.g. switching token_input on) keeps the weights too: the new input
        columns start at zero, so the decoder starts out computing what it computed before;
        so do switching copy_position on (its embedding starts at zero) and lookahead on
        (its projection starts at zero), and so does a
        deeper decoder: the added layers go on top with their attention and feed-forward
        output projections at zero, so each starts as the identity (its residual) and
        learns from there.
        """
        param = next(self.parameters())
        decoder = SpeechDecoder(self.config.replace(**changes), device=param.device, dtype=param.dtype)
        weights = self.state_dict()
        old = weights["input_proj.weight"]  # [D, Din_old]
        new = decoder.input_proj.weight
        if new.shape[0] == old.shape[0] and new.shape[1] > old.shape[1]:
            extra = old.new_zeros(old.shape[0], new.shape[1] - old.shape[1])
            weights["input_proj.weight"] = torch.cat([old, extra], 1)  # [D, Din_new]
        fresh = decoder.state_dict()
        for name in ("copy_embedding", "lookahead_proj.weight"):
            if name in fresh and name not in weights:
                weights[name] = fresh[name].clone()  # zeros: no change yet
        for i in range(self.config.n_layers, decoder.config.n_layers):
            layer = decoder.layers[i]
            nn.init.zeros_(layer.self_attn.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)
            weights.update({f"layers.{i}.{k}": v for k, v in layer.state_dict().items()})
        kept = {k: v.shape for k, v in weights.items()} == {
            k: v.shape for k, v in decoder.state_dict().items()
        }
        if kept:
            decoder.load_state_dict(weights)
        return decoder.train(self.training), kept

    def _init_streaming_state(self, batch_size: int) -> DecoderState:
        caches = [LayerCache(self.config.attention_window) for _ in self.layers]
        return DecoderState(batch_size, caches)

    # -- upsampling -------------------------------------------------------------------------
    def upsample(
        self,
        hidden: torch.Tensor,
        lengths: torch.Tensor | None = None,
        target_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, D] -> ([B, T, D], lengths [B]) with T = lambda * M.

        With `target_lengths` (training), an item whose unit sequence is longer than
        lambda * M is stretched uniformly to the target length, so CTC stays feasible.
        With copy_position, each copy gets the embedding of its index within its token
        (a stretched token's copies past lambda - 1 share the last one).
        """
        batch, tokens, _ = hidden.shape
        lam = self.config.upsample
        if lengths is None:
            lengths = torch.full((batch,), tokens, dtype=torch.long, device=hidden.device)
        up = lengths * lam
        if target_lengths is not None:
            up = torch.maximum(up, target_lengths.to(up.device))
        total = int(up.max()) if batch else 0
        t = torch.arange(total, device=hidden.device)[None, :]  # [1, T]
        ratio = up.double() / lengths.clamp(min=1).double()  # [B]
        index = (t.double() / ratio[:, None]).long()  # [B, T]
        valid = t < up[:, None]
        index = index.masked_fill(~valid, 0).clamp(max=max(tokens - 1, 0))
        out = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        if self.copy_embedding is not None:
            copies = self.copy_embedding[copy_indices(index, lam)]  # [B, T, Din]
            # Only on the token's own input, not on the lookahead half after it.
            out = out + F.pad(copies, (0, out.shape[-1] - copies.shape[-1]))
        return out.masked_fill(~valid[..., None], 0.0), up  # [B, T, D], [B]

    # -- forward ----------------------------------------------------------------------------
    def _rope(self, start: int, length: int, dtype: torch.dtype):
        positions = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [T, hd]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward_upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, Din] upsampled states (with lookahead [B, T, 2 Din]: each position's token
        input, then the next token's) -> [B, T, K+1] float32 log-probabilities.

        When streaming, `x` holds only the new positions and the KV cache supplies the rest.
        """
        state = self._streaming_state
        start = state.positions if state is not None else 0
        width = self.config.input_width
        h = self.input_proj(x[..., :width])  # [B, T, D]
        if self.lookahead_proj is not None:
            h = h + self.lookahead_proj(x[..., width:])
        cos, sin = self._rope(start, h.shape[1], h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, state.caches[i] if state is not None else None)
        if self.norm is not None:
            h = self.norm(h)
        if state is not None:
            state.positions += x.shape[1]
        return F.log_softmax(self.output_proj(h).float(), dim=-1)  # [B, T, K+1]

    def forward(
        self,
        hidden: torch.Tensor,
        lengths: torch.Tensor | None = None,
        target_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, Din] token states -> (log-probs [B, T, K+1], output lengths [B])."""
        if hidden.shape[-1] != self.config.input_width:
            raise ValueError(
                f"speech decoder expects hidden states of width {self.config.input_width}, "
                f"got {hidden.shape[-1]}"
            )
        if self.is_streaming and (lengths is not None or target_lengths is not None):
            raise ValueError("streaming feeds whole new tokens: pass neither lengths nor target_lengths")
        if self.lookahead_proj is not None:
            hidden = self._with_next_inputs(hidden, lengths)  # [B, M', 2 Din]
            if hidden.shape[1] == 0:  # streaming: the first token waits for the second
                return self._no_positions(hidden.shape[0])
        x, out_lengths = self.upsample(hidden, lengths, target_lengths)
        return self.forward_upsampled(x), out_lengths

    def _with_next_inputs(self, hidden: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """[B, M, Din] -> [B, M, 2 Din]: each token's input, then the next token's (zeros
        after an item's last token). Streaming: the last token given is held back until the
        next call (or `flush`), so the output covers the tokens before it."""
        state = self._streaming_state
        if state is not None:
            seq = hidden if state.pending is None else torch.cat([state.pending, hidden], 1)
            state.pending = seq[:, -1:]
            return torch.cat([seq[:, :-1], seq[:, 1:]], -1)
        tokens = hidden.shape[1]
        ahead = F.pad(hidden[:, 1:], (0, 0, 0, 1))  # [B, M, Din]: token i+1's input at i
        if lengths is not None:
            index = torch.arange(tokens, device=hidden.device)[None, :]  # [1, M]
            has_next = index + 1 < lengths[:, None].to(hidden.device)  # [B, M]
            ahead = ahead * has_next[..., None].to(ahead.dtype)
        return torch.cat([hidden, ahead], -1)

    def _no_positions(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.output_proj.weight.device
        log_probs = torch.zeros(batch, 0, self.config.unit_vocab + 1, device=device)  # [B, 0, K+1]
        return log_probs, torch.zeros(batch, dtype=torch.long, device=device)

    def flush(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming with lookahead: (log-probs [B, T, K+1], lengths [B]) of the last token
        given, which waited for a next token that will not come (its lookahead input is
        zeros, as after an answer's last token in training). Without lookahead, or with no
        token waiting, no positions."""
        state = self.streaming_state
        pending, state.pending = state.pending, None
        if pending is None:
            return self._no_positions(state.batch_size)
        x, lengths = self.upsample(torch.cat([pending, torch.zeros_like(pending)], -1))
        return self.forward_upsampled(x), lengths

    def units_if_ended(self) -> list[list[int]]:
        """Streaming: per row, the units `flush` would give now, with the stream left as it
        was. A row whose answer ends while the others go on gets its last units at once."""
        saved = copy.deepcopy(self.streaming_state)
        try:
            return self.greedy_units(self.flush()[0])
        finally:
            self._streaming_state = saved

    # -- loss and decoding ------------------------------------------------------------------
    def ctc_loss(
        self, log_probs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """CTC summed over the batch and divided by the number of target units.

        targets: [B, U] unit ids, padded with IGNORE_INDEX.
        """
        target_lengths = targets.ne(IGNORE_INDEX).sum(-1)
        flat = targets[targets.ne(IGNORE_INDEX)]
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),  # [T, B, K+1]
            flat,
            lengths,
            target_lengths,
            blank=self.config.blank_id,
            reduction="sum",
            zero_infinity=True,
        )
        return loss / target_lengths.sum().clamp(min=1)

    def greedy_units(self, log_probs: torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
        """Best path per position (after `blank_penalty`), collapsed. When streaming,
        continues from the last chunk."""
        if self.config.blank_penalty:
            log_probs = log_probs.clone()
            log_probs[..., self.config.blank_id] -= self.config.blank_penalty
        best = log_probs.argmax(-1)  # [B, T]
        state = self._streaming_state
        previous = state.last_symbol if state is not None else None
        units = []
        for b in range(best.shape[0]):
            row = best[b, : int(lengths[b])] if lengths is not None else best[b]
            prev = int(previous[b]) if previous is not None else None
            units.append(ctc_collapse(row.tolist(), self.config.blank_id, prev))
        if state is not None and best.shape[1] > 0:
            state.last_symbol = best[:, -1].clone()
        return units

    @torch.no_grad()
    def predict_units(self, hidden: torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
        """[B, M, Din] -> unit sequences (offline, whole answers)."""
        log_probs, out_lengths = self(hidden, lengths)
        return self.greedy_units(log_probs, out_lengths)


def copy_indices(index: torch.Tensor, upsample: int) -> torch.Tensor:
    """[B, T] token index of each upsampled position -> [B, T] its index among the copies
    of that token (0 at the token's first copy), capped at upsample - 1."""
    t = torch.arange(index.shape[1], device=index.device).expand_as(index)  # [B, T]
    starts = torch.ones_like(index, dtype=torch.bool)
    starts[:, 1:] = index[:, 1:] != index[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # [B, T]
    return (t - first).clamp(max=upsample - 1)


def ctc_collapse(symbols: Sequence[int], blank: int, previous: int | None = None) -> list[int]:
    """Merge repeats, then drop blanks: [1,1,2,b,b,2,3] -> [1,2,2,3].

    `previous` is the symbol just before `symbols` (from an earlier chunk), so a unit
    repeated across a chunk boundary is not emitted twice.
    """
    out = []
    for s in symbols:
        if s != previous and s != blank:
            out.append(s)
        previous = s
    return out
