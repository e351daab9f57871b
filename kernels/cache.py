"""The packed, appendable container behind the codecs of this package (keys or values of a layer).

Token order on the token axis is always: packed tokens [0, num_packed) then full-precision tail
tokens [num_packed, num_packed + tail_len). Tokens are quantized a whole group at a time
(`group_size` tokens; KIVI's per-channel key statistics and QJL's per-group outlier channels need
complete groups) and only once they are older than the `window` most recent tokens, so the tail
holds the incomplete last group plus the window: `window <= tail_len < window + group_size` once the
cache holds at least `window` tokens (codecs without groups use group_size 1 and window 0).

Storage is preallocated: every packed field is a tensor [B, H, rows, ...] whose row axis has room
for `capacity` tokens (one row per token, or one row per group for per-group statistics such as
KIVI scales or QJL outlier indices), and the tail is a fixed [B, H, window + group_size, D]
buffer (one slot more than the tail ever keeps, so a decode token can be written into it before
its group is packed). Appending writes in place; it reallocates (doubling) only when the reserved
capacity is exceeded, so a decode loop that reserves its maximum length up front never allocates
cache memory; `storage_version` counts reallocations (a CUDA graph that captured the old tensors
must be captured again).

Decode under a CUDA graph (kvpack.inference.decode_graph) cannot use host integers that change
every step, so it appends a token with `append_token_on_device`: slots and rows come from device
tensors (`DecodeStep`), and the host mirrors the lengths afterwards with `advance_lengths`. It
packs exactly what `append_tokens` packs for that token, in the same step.

Serialization (`to_bytes`, block slices) writes a small JSON header plus the raw bytes of the used
rows of each field and of the tail. The header carries the codec fingerprint; loading checks it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch

MAGIC = b"KVPC"
SERIAL_VERSION = 1
_PREFIX = struct.Struct("<4sI")
_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype}")
    return name


@dataclass(frozen=True)
class FieldSpec:
    """One packed tensor of a cache: per-row trailing `shape`, `dtype`, tokens covered per row."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tokens_per_row: int = 1


@dataclass
class PackedCache:
    """Keys or values of one layer for a batch of equal-length sequences.

    Attributes:
        kind: "keys" or "values".
        fingerprint: the codec fingerprint the bytes were made with.
        dtype: dtype of the full-precision input (and of the tail).
        group_size: tokens quantized together (1 for codecs without token groups).
        window: tokens kept in full precision after the last complete group.
        specs: the packed fields' descriptions, in serialization order.
        fields: name -> tensor [B, H, rows_capacity, *spec.shape].
        tail: [B, H, window + group_size, D] full-precision buffer; the first tail_len are used.
        num_packed: tokens stored in packed form (a multiple of group_size).
        tail_len: tokens stored in the tail.
        storage_version: bumped whenever the packed fields are reallocated.
    """

    kind: str
    fingerprint: str
    dtype: torch.dtype
    group_size: int
    window: int
    specs: tuple[FieldSpec, ...]
    fields: dict[str, torch.Tensor]
    tail: torch.Tensor
    num_packed: int = 0
    tail_len: int = 0
    meta: dict = field(default_factory=dict)
    storage_version: int = 0

    @property
    def batch(self) -> int:
        return self.tail.shape[0]

    @property
    def num_heads(self) -> int:
        return self.tail.shape[1]

    @property
    def head_dim(self) -> int:
        return self.tail.shape[3]

    @property
    def device(self) -> torch.device:
        return self.tail.device

    @property
    def length(self) -> int:
        """Tokens held (packed plus tail)."""
        return self.num_packed + self.tail_len

    @property
    def capacity(self) -> int:
        """Tokens the packed fields have room for without reallocating."""
        spec = self.specs[0]
        return self.fields[spec.name].shape[2] * spec.tokens_per_row

    def packed_nbytes(self) -> int:
        """Bytes of the used packed rows plus the used tail (what `nbytes` of a codec reports)."""
        total = (
            self.tail_len * self.batch * self.num_heads * self.head_dim * self.tail.element_size()
        )
        for spec in self.specs:
            rows = self.num_packed // spec.tokens_per_row
            tensor = self.fields[spec.name]
            total += (
                rows
                * self.batch
                * self.num_heads
                * tensor[0, 0, :1].numel()
                * tensor.element_size()
            )
        return total


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def allocate(
    *,
    kind: str,
    fingerprint: str,
    specs: list[FieldSpec],
    group_size: int,
    window: int,
    batch: int,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    capacity: int,
) -> PackedCache:
    """An empty cache with room for `capacity` packed tokens (rounded up to whole groups)."""
    for name, value in (("batch", batch), ("num_heads", num_heads), ("head_dim", head_dim)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    capacity = _round_up(capacity, group_size)
    fields = {
        spec.name: torch.zeros(
            batch,
            num_heads,
            capacity // spec.tokens_per_row,
            *spec.shape,
            dtype=spec.dtype,
            device=device,
        )
        for spec in specs
    }
    tail = torch.zeros(batch, num_heads, window + group_size, head_dim, dtype=dtype, device=device)
    return PackedCache(kind, fingerprint, dtype, group_size, window, tuple(specs), fields, tail)


def reserve(cache: PackedCache, capacity: int) -> None:
    """Grow the packed fields in place to hold at least `capacity` tokens (no-op if they do)."""
    if capacity <= cache.capacity:
        return
    capacity = _round_up(capacity, cache.group_size)
    for spec in cache.specs:
        old = cache.fields[spec.name]
        new = torch.zeros(
            *old.shape[:2],
            capacity // spec.tokens_per_row,
            *spec.shape,
            dtype=old.dtype,
            device=old.device,
        )
        used = cache.num_packed // spec.tokens_per_row
        new[:, :, :used] = old[:, :, :used]
        cache.fields[spec.name] = new
    cache.storage_version += 1


def write_rows(cache: PackedCache, packed: dict[str, torch.Tensor], num_tokens: int) -> None:
    """Store freshly packed fields for `num_tokens` tokens right after the packed region."""
    if cache.num_packed + num_tokens > cache.capacity:
        reserve(cache, max(cache.num_packed + num_tokens, 2 * cache.capacity))
    for spec in cache.specs:
        first = cache.num_packed // spec.tokens_per_row
        rows = num_tokens // spec.tokens_per_row
        cache.fields[spec.name][:, :, first : first + rows] = packed[spec.name]
    cache.num_packed += num_tokens


def check_tokens(cache: PackedCache, x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(x.shape)}")
    expected = (cache.batch, cache.num_heads, cache.head_dim)
    if (x.shape[0], x.shape[1], x.shape[3]) != expected:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, "
            f"the cache holds [B, H, T, D] with (B, H, D) = {expected}"
        )
    if x.dtype != cache.dtype:
        raise ValueError(f"{name} has dtype {x.dtype}, the cache was created for {cache.dtype}")
    if x.device != cache.device:
        raise ValueError(f"{name} is on {x.device}, the cache lives on {cache.device}")


def append_tokens(cache: PackedCache, x: torch.Tensor, pack) -> PackedCache:
    """Append x [B, H, T, D]; `pack(x_groups)` quantizes whole groups into a dict of field tensors.

    Full groups older than the window are packed; everything else lands in the tail. A single
    decode token that does not complete a group is one in-place copy into the tail.
    """
    num_new = x.shape[2]
    group, window = cache.group_size, cache.window
    total_tail = cache.tail_len + num_new
    num_pack = (total_tail - window) // group * group if total_tail >= window + group else 0
    if num_pack == 0:
        cache.tail[:, :, cache.tail_len : total_tail] = x
        cache.tail_len = total_tail
        return cache
    source = x if cache.tail_len == 0 else torch.cat([cache.tail[:, :, : cache.tail_len], x], dim=2)
    write_rows(cache, pack(source[:, :, :num_pack]), num_pack)
    rest = source[:, :, num_pack:]
    cache.tail[:, :, : rest.shape[2]] = rest
    cache.tail_len = rest.shape[2]
    return cache


# -- decode steps with device-side positions (CUDA graphs) -------------------------------------


@dataclass(frozen=True)
class DecodeStep:
    """Where one decode token goes, as device tensors computed inside the step.

    Attributes:
        write_slot: int64 [1], the tail slot of the new token (the tail length before it).
        completes_group: the token makes the tail window + group_size long, so the oldest group is
            packed in this step (known on the host: the tail length is, see `completes_group`).
        pack_rows: tokens_per_row -> int64 [group_size // tokens_per_row] destination rows of the
            packed group in fields with that many tokens per row (only when completes_group).
    """

    write_slot: torch.Tensor
    completes_group: bool
    pack_rows: dict[int, torch.Tensor]


def completes_group(cache: PackedCache) -> bool:
    """Whether appending one token to `cache` packs a group (append_tokens' condition)."""
    return cache.tail_len + 1 >= cache.window + cache.group_size


def decode_step(
    lengths: torch.Tensor, cache: PackedCache, completes: bool, rows_per: tuple[int, ...]
) -> DecodeStep:
    """The slots of this step's token, then `lengths` (int64 [2] = packed, tail) advanced past it
    in place. Shared by every layer (their caches have the same lengths); `rows_per` lists the
    tokens_per_row values of the fields that will be written."""
    write_slot = lengths[1:2].clone()
    pack_rows = {}
    if completes:
        group = cache.group_size
        for per_row in rows_per:
            first = lengths[0:1] // per_row
            pack_rows[per_row] = first + torch.arange(
                group // per_row, device=lengths.device, dtype=lengths.dtype
            )
        lengths[0:1].add_(group)
        lengths[1:2].fill_(cache.window)
    else:
        lengths[1:2].add_(1)
    return DecodeStep(write_slot, completes, pack_rows)


def append_token_on_device(cache: PackedCache, x: torch.Tensor, step: DecodeStep, pack) -> None:
    """Append one token x [B, H, 1, D] at the slots of `step`, packing the oldest group if the
    token completes it (as append_tokens would). Host lengths are left alone: `advance_lengths`.

    The caller guarantees room: capacity >= num_packed + group_size when a group completes."""
    cache.tail.index_copy_(2, step.write_slot, x)
    if not step.completes_group:
        return
    group, window = cache.group_size, cache.window
    packed = pack(cache.tail[:, :, :group])
    for spec in cache.specs:
        rows = step.pack_rows[spec.tokens_per_row]
        cache.fields[spec.name].index_copy_(2, rows, packed[spec.name])
    if window:
        cache.tail[:, :, :window] = cache.tail[:, :, group : group + window].clone()


def advance_lengths(cache: PackedCache, completes: bool) -> None:
    """Mirror on the host what `append_token_on_device` did on the device."""
    if completes:
        cache.num_packed += cache.group_size
        cache.tail_len = cache.window
    else:
        cache.tail_len += 1


# -- serialization -------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def _header(cache: PackedCache, start: int, num_packed: int, tail_len: int) -> dict:
    return {
        "version": SERIAL_VERSION,
        "fingerprint": cache.fingerprint,
        "kind": cache.kind,
        "dtype": dtype_name(cache.dtype),
        "batch": cache.batch,
        "num_heads": cache.num_heads,
        "head_dim": cache.head_dim,
        "group_size": cache.group_size,
        "window": cache.window,
        "start": start,
        "num_packed": num_packed,
        "tail_len": tail_len,
        "fields": [
            [spec.name, dtype_name(spec.dtype), list(spec.shape), spec.tokens_per_row]
            for spec in cache.specs
        ],
    }


def serialize(cache: PackedCache, start: int | None = None, end: int | None = None) -> bytes:
    """The whole cache (start = end = None) or the packed token range [start, end) as bytes.

    A range must be aligned to group boundaries and lie inside the packed region (no tail).
    """
    if start is None and end is None:
        start, end, tail_len = 0, cache.num_packed, cache.tail_len
    else:
        if start is None or end is None:
            raise ValueError("give both start and end, or neither")
        if not 0 <= start < end <= cache.num_packed:
            raise ValueError(
                f"block [start, end) = [{start}, {end}) must lie in the packed region "
                f"[0, {cache.num_packed})"
            )
        if start % cache.group_size or end % cache.group_size:
            raise ValueError(f"start and end must be multiples of group_size={cache.group_size}")
        tail_len = 0
    header = json.dumps(_header(cache, start, end - start, tail_len), sort_keys=True).encode()
    parts = [_PREFIX.pack(MAGIC, len(header)), header]
    for spec in cache.specs:
        rows = slice(start // spec.tokens_per_row, end // spec.tokens_per_row)
        parts.append(_tensor_bytes(cache.fields[spec.name][:, :, rows]))
    parts.append(_tensor_bytes(cache.tail[:, :, :tail_len]))
    return b"".join(parts)


def read_header(data: bytes) -> tuple[dict, int]:
    """Parse the header; returns it and the offset of the first tensor byte."""
    if len(data) < _PREFIX.size:
        raise ValueError("data is too short to hold a packed cache")
    magic, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("data does not start with a packed-cache header")
    end = _PREFIX.size + header_len
    header = json.loads(data[_PREFIX.size : end])
    if header.get("version") != SERIAL_VERSION:
        raise ValueError(f"unknown packed-cache version {header.get('version')}")
    return header, end


def _read_tensor(
    data: bytes, offset: int, shape: tuple[int, ...], dtype: torch.dtype, device
) -> tuple:
    count = 1
    for size in shape:
        count *= size
    num_bytes = count * torch.empty((), dtype=dtype).element_size()
    if offset + num_bytes > len(data):
        raise ValueError("packed-cache data is truncated")
    if num_bytes == 0:  # torch.frombuffer refuses empty buffers (a block has an empty tail)
        return torch.empty(shape, dtype=dtype, device=device), offset
    raw = torch.frombuffer(bytearray(data[offset : offset + num_bytes]), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device), offset + num_bytes


def deserialize_into(cache: PackedCache, data: bytes) -> PackedCache:
    """Append a serialized block (or a whole serialized cache) to `cache`, checking compatibility.

    The block must start where the cache's packed region ends, and the cache must have no tail yet
    (load blocks first, then keep appending tokens).
    """
    header, offset = read_header(data)
    expected = _header(
        cache, header.get("start", -1), header.get("num_packed", -1), header.get("tail_len", -1)
    )
    for key in (
        "fingerprint",
        "kind",
        "dtype",
        "batch",
        "num_heads",
        "head_dim",
        "group_size",
        "window",
        "fields",
    ):
        if header.get(key) != expected[key]:
            raise ValueError(
                f"data has {key}={header.get(key)!r}, this cache needs {expected[key]!r}"
            )
    if cache.tail_len:
        raise ValueError(
            "load blocks into a cache before appending tokens to it (its tail is not empty)"
        )
    if header["start"] != cache.num_packed:
        raise ValueError(
            f"block starts at token {header['start']}, "
            f"the cache holds {cache.num_packed} packed tokens"
        )
    batch, heads, num_packed = cache.batch, cache.num_heads, header["num_packed"]
    packed = {}
    for spec in cache.specs:
        shape = (batch, heads, num_packed // spec.tokens_per_row, *spec.shape)
        packed[spec.name], offset = _read_tensor(data, offset, shape, spec.dtype, cache.device)
    if num_packed:
        write_rows(cache, packed, num_packed)
    tail_shape = (batch, heads, header["tail_len"], cache.head_dim)
    tail, offset = _read_tensor(data, offset, tail_shape, cache.dtype, cache.device)
    if offset != len(data):
        raise ValueError(f"packed-cache data has {len(data) - offset} trailing bytes")
    cache.tail[:, :, : header["tail_len"]] = tail
    cache.tail_len = header["tail_len"]
    return cache
