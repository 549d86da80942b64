"""KV pages: one block's pre-RoPE keys/values plus a small header, as numpy buffers.

A page travels through Ray's object store as (header, keys, values): numpy arrays come back
zero-copy and read-only there, and bfloat16 (no numpy dtype) travels as a uint16 view.
`to_bytes()` gives a durable copy (Redis value, file): magic, header length, msgpack header,
then the raw key and value bytes. Byte order is little-endian throughout.

Pages are keyed by model, stream, unit and a full content hash (the LMCache lesson: keys made
from token ids alone collide across videos, since every frame's placeholder tokens are equal).

Torch is imported only by the conversions to and from tensors: a page passes through processes
that never compute on it (the coordinator), and unpickling one imports this module.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from pipeline.errors import InvalidInputError, PageCorruptError

if TYPE_CHECKING:
    import torch

KINDS = ("frame", "summary", "page", "sink")
_MAGIC = b"SKVP\x01"
_LEN = struct.Struct("<I")

# torch dtype name -> (numpy storage dtype, "carrier": the name of a torch dtype of the same item
# size that numpy knows, and its numpy twin). Dtypes numpy lacks (bf16, fp8) are stored as
# unsigned ints.
_STORAGE = {
    "float32": (np.dtype("<f4"), "float32", np.dtype("<f4")),
    "float16": (np.dtype("<f2"), "float16", np.dtype("<f2")),
    "bfloat16": (np.dtype("<u2"), "int16", np.dtype("<i2")),
    "float8_e4m3fn": (np.dtype("u1"), "uint8", np.dtype("u1")),
    "float8_e5m2": (np.dtype("u1"), "uint8", np.dtype("u1")),
}


def _storage(dtype: str) -> np.dtype:
    if dtype not in _STORAGE:
        raise InvalidInputError(f"unsupported KV dtype {dtype!r}; "
                                f"expected one of {sorted(_STORAGE)}")
    return _STORAGE[dtype][0]


@dataclass(frozen=True)
class PageHeader:
    model_id: str
    stream_id: str
    unit_id: int                         # block id in the stream
    kind: str                            # one of KINDS
    layers: tuple[int, int]              # (first, last + 1)
    frame_range: tuple[int, int]         # (first, last + 1)
    time_range: tuple[float, float]      # (start, end) seconds
    positions: tuple[int, int]           # (first original position, count)
    dtype: str                           # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]               # [layers, kv_heads, tokens, head_dim], keys == values
    content_hash: str                    # hex blake2b-128, see content_hash()
    extra: dict = field(default_factory=dict, hash=False)  # small, msgpack-able

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidInputError(f"page kind {self.kind!r} is not one of {KINDS}")
        _storage(self.dtype)

    def to_msgpack(self) -> bytes:
        try:
            return msgpack.packb(asdict(self), use_bin_type=True)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"page header is not msgpack-able: {e}") from e

    @classmethod
    def from_msgpack(cls, data: bytes) -> PageHeader:
        try:
            d = msgpack.unpackb(data, raw=False)
            return cls(
                model_id=str(d["model_id"]), stream_id=str(d["stream_id"]),
                unit_id=int(d["unit_id"]), kind=d["kind"],
                layers=_pair(d["layers"], int), frame_range=_pair(d["frame_range"], int),
                time_range=_pair(d["time_range"], float), positions=_pair(d["positions"], int),
                dtype=d["dtype"], shape=tuple(int(n) for n in d["shape"]),
                content_hash=str(d["content_hash"]), extra=dict(d["extra"]),
            )
        except Exception as e:  # any malformed input: msgpack, missing key, wrong type
            raise PageCorruptError(f"malformed page header: {type(e).__name__}: {e}") from e


def _pair(x, cast) -> tuple:
    a, b = x
    return cast(a), cast(b)


def content_hash(model_id: str, stream_id: str, unit_id: int, kind: str, dtype: str,
                 shape: tuple[int, ...], keys: np.ndarray, values: np.ndarray) -> str:
    """blake2b-128 over the page identity (model, stream, unit, kind), its dtype/shape (same bytes
    read as another dtype are another page) and the raw bytes of keys then values."""
    ident = msgpack.packb([model_id, stream_id, unit_id, kind, dtype, list(shape)])
    h = hashlib.blake2b(ident, digest_size=16)
    h.update(keys)
    h.update(values)
    return h.hexdigest()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    # CPU + contiguous: no copy, the array shares memory with the tensor.
    storage, carrier, _ = _STORAGE[str(t.dtype).removeprefix("torch.")]
    return t.detach().to("cpu").contiguous().view(getattr(torch, carrier)).numpy().view(storage)


@dataclass(frozen=True, eq=False)
class KVPage:
    header: PageHeader
    keys: np.ndarray    # header.shape, storage dtype of header.dtype (bf16 -> uint16)
    values: np.ndarray  # same

    def __post_init__(self):
        want = _storage(self.header.dtype)
        for name in ("keys", "values"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != want or a.shape != self.header.shape:
                got = (getattr(a, "dtype", type(a).__name__), getattr(a, "shape", None))
                raise PageCorruptError(f"page {name} {got} do not match header "
                                       f"({want}, {self.header.shape})")
            object.__setattr__(self, name, np.ascontiguousarray(a))  # no-op when contiguous

    @classmethod
    def from_tensors(cls, keys: torch.Tensor, values: torch.Tensor, *, model_id: str,
                     stream_id: str, unit_id: int, frame_range: tuple[int, int],
                     time_range: tuple[float, float], positions: tuple[int, int],
                     kind: str = "frame", layers: tuple[int, int] | None = None,
                     extra: dict | None = None) -> KVPage:
        """keys, values: [layers, kv_heads, tokens, head_dim], same dtype and shape.
        CPU contiguous inputs are not copied: the page shares their memory, so do not write to
        them afterwards (verify() would catch it). Other devices are copied to CPU once."""
        if keys.shape != values.shape or keys.dtype != values.dtype or keys.dim() != 4:
            raise InvalidInputError(f"keys {tuple(keys.shape)} {keys.dtype} and values "
                                    f"{tuple(values.shape)} {values.dtype} must be 4-D and alike")
        dtype, shape = str(keys.dtype).removeprefix("torch."), tuple(keys.shape)
        _storage(dtype)
        layers = (0, shape[0]) if layers is None else _pair(layers, int)
        positions = _pair(positions, int)
        if layers[1] - layers[0] != shape[0] or positions[1] != shape[2]:
            raise InvalidInputError(f"layers {layers} / positions {positions} do not match "
                                    f"shape {shape} [layers, kv_heads, tokens, head_dim]")
        k, v = to_numpy(keys), to_numpy(values)
        header = PageHeader(
            model_id=model_id, stream_id=stream_id, unit_id=int(unit_id), kind=kind,
            layers=layers, frame_range=_pair(frame_range, int),
            time_range=_pair(time_range, float), positions=positions, dtype=dtype,
            shape=shape, content_hash=content_hash(model_id, stream_id, int(unit_id), kind,
                                                   dtype, shape, k, v),
            extra=dict(extra or {}),
        )
        return cls(header, k, v)

    def to_tensors(self, device: str | torch.device = "cpu", shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (keys, values) in the header's dtype on `device`.

        Copies only when needed: a writable array is wrapped zero-copy (the CPU tensors share
        the page's memory); a read-only array (Ray object store, from_bytes over bytes) is
        copied once on CPU, because torch tensors are always writable and writing into the
        object store's mapping is undefined, unless `shared`: the caller promises never to write
        (KV once made is never written: a replica's blocks and window), and the CPU tensors map
        the object store's one copy, which every process on the node shares. For another device
        the read-only array is wrapped without a copy just for the host-to-device transfer,
        which is the one copy."""
        import torch

        torch_dtype = getattr(torch, self.header.dtype)
        np_carrier = _STORAGE[self.header.dtype][2]
        on_cpu = torch.device(device).type == "cpu"

        def convert(a: np.ndarray) -> torch.Tensor:
            a = a.view(np_carrier)
            if a.flags.writeable:
                t = torch.from_numpy(a)
            elif on_cpu and not shared:
                t = torch.from_numpy(a.copy())
            else:
                with warnings.catch_warnings():  # torch warns on read-only arrays; never written
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.from_numpy(a)
            return t.view(torch_dtype).to(device)

        return convert(self.keys), convert(self.values)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def verify(self) -> None:
        """Recompute the content hash; raise PageCorruptError if it differs from the header's."""
        h = self.header
        got = content_hash(h.model_id, h.stream_id, h.unit_id, h.kind, h.dtype, h.shape,
                           self.keys, self.values)
        if got != h.content_hash:
            raise PageCorruptError(f"page {h.stream_id}/{h.unit_id} ({h.kind}) hash {got} != "
                                   f"header {h.content_hash}")

    def to_bytes(self) -> bytes:
        """magic | u32 header length | msgpack header | keys bytes | values bytes."""
        head = self.header.to_msgpack()
        return b"".join([_MAGIC, _LEN.pack(len(head)), head, self.keys, self.values])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, verify: bool = True) -> KVPage:
        """Inverse of to_bytes(). The arrays are zero-copy views of `data` (read-only for
        bytes). Verifies the content hash unless verify=False."""
        mv = memoryview(data).cast("B")
        start = len(_MAGIC) + _LEN.size
        if len(mv) < start or mv[:len(_MAGIC)] != _MAGIC:
            raise PageCorruptError("not a KV page: bad magic")
        (n,) = _LEN.unpack(mv[len(_MAGIC):start])
        header = PageHeader.from_msgpack(mv[start:start + n])
        storage = _storage(header.dtype)
        count = int(np.prod(header.shape, dtype=np.int64))
        off = start + n
        if len(mv) != off + 2 * count * storage.itemsize:
            raise PageCorruptError(f"KV page is {len(mv)} bytes, header {header.shape} "
                                   f"{header.dtype} needs {off + 2 * count * storage.itemsize}")
        k = np.frombuffer(mv, storage, count, off).reshape(header.shape)
        v = np.frombuffer(mv, storage, count, off + k.nbytes).reshape(header.shape)
        page = cls(header, k, v)
        if verify:
            page.verify()
        return page
