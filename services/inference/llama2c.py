"""Load a llama2.c checkpoint (legacy "v0" export) as a Hugging Face `LlamaForCausalLM`.

The checkpoint is 7 int32 header fields (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, max_seq_len) followed by float32 arrays, each row-major (out, in):
tok_embeddings, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, then the RoPE tables
(skipped). A positive vocab_size means the classifier shares the token embedding.

llama2.c rotates interleaved pairs (2i, 2i+1) of each head; HF rotates the two halves of the head
(rotate_half). We permute the rows of wq and wk so that HF's layout computes the same attention.

`Llama2cTokenizer` reads `tok512.bin` (int32 max_token_len, then per token: float32 score,
int32 length, bytes) and encodes exactly as llama2.c's `run.c` `encode()`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

_HEADER = struct.Struct("<7i")
BOS_ID = 1
EOS_ID = 2
_BYTE_FALLBACK_OFFSET = 3  # ids 3..258 are <0x00>..<0xFF>


def _interleaved_to_half_split(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...)."""
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    return (
        weight.view(num_heads, head_dim // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def load_llama2c_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32):
    """Build a `LlamaForCausalLM` with the weights of a llama2.c v0 checkpoint.

    Args:
        checkpoint: path of the `.bin` file.
        dtype: parameter dtype of the returned model.

    Raises:
        ValueError: the file is not a llama2.c v0 checkpoint (sizes do not add up).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = Path(checkpoint).read_bytes()
    if len(raw) < _HEADER.size:
        raise ValueError(f"checkpoint {checkpoint}: too short for a llama2.c header")
    dim, hidden_dim, num_layers, num_heads, num_kv_heads, vocab_size, max_seq_len = (
        _HEADER.unpack_from(raw, 0)
    )
    shared_classifier = vocab_size > 0
    vocab_size = abs(vocab_size)
    if min(dim, hidden_dim, num_layers, num_heads, num_kv_heads, vocab_size, max_seq_len) <= 0:
        raise ValueError(f"checkpoint {checkpoint}: not a llama2.c v0 header")
    head_dim = dim // num_heads
    kv_dim = num_kv_heads * head_dim
    floats = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size)

    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        count = int(np.prod(shape))
        if offset + count > floats.size:
            raise ValueError(
                f"checkpoint {checkpoint}: truncated (needs more than {floats.size} floats)"
            )
        array = floats[offset : offset + count].reshape(shape)
        offset += count
        return torch.from_numpy(array.copy())

    embedding = take(vocab_size, dim)
    rms_attention = take(num_layers, dim)
    wq = take(num_layers, dim, dim)
    wk = take(num_layers, kv_dim, dim)
    wv = take(num_layers, kv_dim, dim)
    wo = take(num_layers, dim, dim)
    rms_ffn = take(num_layers, dim)
    w1 = take(num_layers, hidden_dim, dim)
    w2 = take(num_layers, dim, hidden_dim)
    w3 = take(num_layers, hidden_dim, dim)
    rms_final = take(dim)
    take(max_seq_len, head_dim // 2)  # freq_cis_real: HF recomputes RoPE
    take(max_seq_len, head_dim // 2)  # freq_cis_imag
    classifier = embedding if shared_classifier else take(vocab_size, dim)
    if offset != floats.size:
        raise ValueError(
            f"checkpoint {checkpoint}: {floats.size - offset} unexpected trailing floats"
        )

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=shared_classifier,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attention_bias=False,
        mlp_bias=False,
    )
    state = {
        "model.embed_tokens.weight": embedding,
        "model.norm.weight": rms_final,
        "lm_head.weight": classifier,
    }
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        state[prefix + "input_layernorm.weight"] = rms_attention[layer]
        state[prefix + "post_attention_layernorm.weight"] = rms_ffn[layer]
        state[prefix + "self_attn.q_proj.weight"] = _interleaved_to_half_split(wq[layer], num_heads)
        state[prefix + "self_attn.k_proj.weight"] = _interleaved_to_half_split(
            wk[layer], num_kv_heads
        )
        state[prefix + "self_attn.v_proj.weight"] = wv[layer]
        state[prefix + "self_attn.o_proj.weight"] = wo[layer]
        state[prefix + "mlp.gate_proj.weight"] = w1[layer]
        state[prefix + "mlp.down_proj.weight"] = w2[layer]
        state[prefix + "mlp.up_proj.weight"] = w3[layer]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The tied lm_head may be reported missing; nothing else may be.
    missing = [name for name in missing if not (shared_classifier and name == "lm_head.weight")]
    assert not missing and not unexpected, f"state dict mismatch: {missing} {unexpected}"
    if shared_classifier:
        model.tie_weights()
    return model.to(dtype).eval()


class Llama2cTokenizer:
    """The llama2.c BPE tokenizer (`tok512.bin`), encoding as `run.c` does."""

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID

    def __init__(self, path: str | Path) -> None:
        raw = Path(path).read_bytes()
        (self.max_token_length,) = struct.unpack_from("<i", raw, 0)
        offset = 4
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        while offset < len(raw):
            score, length = struct.unpack_from("<fi", raw, offset)
            offset += 8
            self.pieces.append(raw[offset : offset + length])
            self.scores.append(score)
            offset += length
        # run.c looks pieces up by binary search over a sorted copy; with duplicate pieces it would
        # find one of them, so keep the first id of each piece (the vocab has no duplicates we use).
        self._ids: dict[bytes, int] = {}
        for token_id, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`: BOS, the dummy-prefix space, UTF-8 chars, then greedy BPE merges."""
        ids: list[int] = [BOS_ID] if add_bos else []
        if not text:
            return ids
        tokens = [self._ids[b" "]]
        for char in text:
            piece = char.encode("utf-8")
            if piece in self._ids:
                tokens.append(self._ids[piece])
            else:
                tokens.extend(byte + _BYTE_FALLBACK_OFFSET for byte in piece)
        while True:
            best_score, best_index, best_id = -1e10, -1, -1
            for index in range(len(tokens) - 1):
                merged = self.pieces[tokens[index]] + self.pieces[tokens[index + 1]]
                merged_id = self._ids.get(merged)
                if merged_id is not None and self.scores[merged_id] > best_score:
                    best_score, best_index, best_id = self.scores[merged_id], index, merged_id
            if best_index < 0:
                break
            tokens[best_index : best_index + 2] = [best_id]
        return ids + tokens

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; as in run.c, the dummy-prefix space of the piece after BOS goes."""
        out = bytearray()
        previous = -1
        for token_id in token_ids:
            if token_id in (BOS_ID, EOS_ID) or token_id == 0:
                if not skip_special_tokens:
                    out += self.pieces[token_id]
                previous = token_id
                continue
            piece = self.pieces[token_id]
            if _BYTE_FALLBACK_OFFSET <= token_id < _BYTE_FALLBACK_OFFSET + 256:
                piece = bytes([token_id - _BYTE_FALLBACK_OFFSET])
            elif previous == BOS_ID and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            previous = token_id
        return out.decode("utf-8", errors="replace")
