import pickle
import warnings

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_store import KVPage, PageHeader
from pipeline.errors import InvalidInputError, PageCorruptError, StreamKVError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so NaN payloads and -0.0 compare exactly."""
    return t.contiguous().view(INT_VIEW[t.dtype])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def make(keys, values, **over) -> KVPage:
    fields = dict(model_id="m", stream_id="s", unit_id=3, frame_range=(6, 8),
                  time_range=(3.0, 4.0), positions=(100, keys.shape[2]), kind="frame")
    fields.update(over)
    return KVPage.from_tensors(keys, values, **fields)


def kv(shape=(2, 2, 3, 4), dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))


def from_raw(b: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    ints = np.frombuffer(b, f"<i{dtype.itemsize}").copy()
    return torch.from_numpy(ints).view(dtype).reshape(shape)


@st.composite
def raw_kv(draw):
    """Random dtype/shape, every bit pattern allowed (NaN, inf, -0.0, subnormals)."""
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=4, max_size=4)))
    n = int(np.prod(shape)) * dtype.itemsize
    k, v = draw(st.binary(min_size=n, max_size=n)), draw(st.binary(min_size=n, max_size=n))
    return from_raw(k, dtype, shape), from_raw(v, dtype, shape)


@settings(max_examples=60, deadline=None)
@given(raw_kv())
def test_round_trips_are_exact(kv_pair):
    keys, values = kv_pair
    page = make(keys, values, extra={"note": "x", "n": [1, 2]})
    assert page.header.dtype == str(keys.dtype).removeprefix("torch.")
    assert page.header.shape == tuple(keys.shape)
    assert page.nbytes == 2 * keys.numel() * keys.element_size()
    k, v = page.to_tensors()
    assert same(k, keys) and same(v, values)

    assert PageHeader.from_msgpack(page.header.to_msgpack()) == page.header
    back = KVPage.from_bytes(page.to_bytes())  # read-only views over bytes, verified
    assert back.header == page.header
    assert not back.keys.flags.writeable
    k, v = back.to_tensors()
    assert same(k, keys) and same(v, values)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_round_trip(dtype):
    keys, values = kv(dtype=dtype)
    page = KVPage.from_bytes(make(keys, values).to_bytes())
    assert page.keys.dtype == np.uint8
    k, v = page.to_tensors()
    assert same(k, keys) and same(v, values)


def test_bf16_travels_as_uint16_and_float32_stays():
    assert make(*kv(dtype=torch.bfloat16)).keys.dtype == np.uint16
    assert make(*kv(dtype=torch.float16)).keys.dtype == np.float16
    assert make(*kv(dtype=torch.float32)).keys.dtype == np.float32


def test_cpu_contiguous_input_is_not_copied():
    keys, values = kv()
    page = make(keys, values)
    assert page.keys.ctypes.data == keys.data_ptr()
    k, _ = page.to_tensors()  # writable arrays: wrapped zero-copy as well
    assert k.data_ptr() == keys.data_ptr()


def test_non_contiguous_input():
    keys, values = kv(shape=(2, 3, 2, 4))
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [2, 2, 3, 4], strided
    k, v = make(keys, values).to_tensors()
    assert same(k, keys.contiguous()) and same(v, values.contiguous())


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_read_only_numpy_input_round_trips(dtype):
    """As Ray hands them back: header + read-only arrays over someone else's bytes."""
    keys, values = kv(dtype=dtype)
    src = make(keys, values)
    ro_k = np.frombuffer(src.keys.tobytes(), src.keys.dtype).reshape(src.keys.shape)
    ro_v = np.frombuffer(src.values.tobytes(), src.values.dtype).reshape(src.values.shape)
    assert not ro_k.flags.writeable
    page = KVPage(src.header, ro_k, ro_v)
    page.verify()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        k, v = page.to_tensors()
    assert same(k, keys) and same(v, values)
    k.add_(1)  # a private, writable copy: the read-only source is untouched
    assert np.array_equal(ro_k, src.keys)


def test_pickle_keeps_page():  # the Ray object-store path pickles header + arrays
    page = make(*kv())
    back = pickle.loads(pickle.dumps(page, protocol=5))
    back.verify()
    assert back.header == page.header and np.array_equal(back.keys, page.keys)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_hash_changes_with_any_byte(data):
    keys, values = kv(shape=(1, 2, 3, 2), dtype=torch.float16)
    page = make(keys, values)
    raw = bytearray(page.keys.tobytes() + page.values.tobytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    half = len(raw) // 2
    flipped = make(from_raw(raw[:half], torch.float16, keys.shape),
                   from_raw(raw[half:], torch.float16, keys.shape))
    assert flipped.header.content_hash != page.header.content_hash


@pytest.mark.parametrize("field,value", [("unit_id", 4), ("stream_id", "s2"),
                                         ("model_id", "m2"), ("kind", "summary")])
def test_hash_changes_with_identity(field, value):
    keys, values = kv()
    assert make(keys, values, **{field: value}).header.content_hash != \
        make(keys, values).header.content_hash


def test_hash_covers_dtype():  # the same bytes read as another dtype are another page
    keys, values = kv(dtype=torch.float16)
    as_bf16 = make(keys.view(torch.bfloat16), values.view(torch.bfloat16))
    assert as_bf16.header.content_hash != make(keys, values).header.content_hash


def test_verify_detects_corruption():
    page = make(*kv())
    page.verify()
    page.values[0, 0, 0, 0] ^= 1  # writable: arrays share the tensor's memory
    with pytest.raises(PageCorruptError, match="hash"):
        page.verify()


def test_from_bytes_detects_corruption():
    blob = bytearray(make(*kv()).to_bytes())
    blob[-1] ^= 0x80
    with pytest.raises(PageCorruptError):
        KVPage.from_bytes(bytes(blob))
    page = KVPage.from_bytes(blob, verify=False)
    with pytest.raises(PageCorruptError):
        page.verify()


@pytest.mark.parametrize("mangle", [
    lambda b: b"XXXX" + b[4:],              # bad magic
    lambda b: b[:-3],                       # truncated data
    lambda b: b[:9] + b"\xc1" + b[10:],     # malformed msgpack header
    lambda b: b[:3],                        # shorter than the preamble
])
def test_malformed_bytes_are_typed_errors(mangle):
    with pytest.raises(PageCorruptError):
        KVPage.from_bytes(mangle(make(*kv()).to_bytes()))


def test_malformed_header_fields():
    head = msgpack.unpackb(make(*kv()).header.to_msgpack())
    del head["shape"]
    with pytest.raises(PageCorruptError, match="shape"):
        PageHeader.from_msgpack(msgpack.packb(head))


def test_arrays_must_match_header():
    page = make(*kv())
    with pytest.raises(PageCorruptError):
        KVPage(page.header, page.keys[:1], page.values)
    with pytest.raises(PageCorruptError):
        KVPage(page.header, page.keys.view(np.int16), page.values)


def test_invalid_inputs():
    keys, values = kv()
    with pytest.raises(InvalidInputError):
        make(keys, values[:, :, :2])                        # shapes differ
    with pytest.raises(InvalidInputError):
        make(keys, values.float())                          # dtypes differ
    with pytest.raises(InvalidInputError):
        make(keys[0], values[0], positions=(0, 3))          # not 4-D
    with pytest.raises(InvalidInputError):
        make(keys, values, kind="frames")
    with pytest.raises(InvalidInputError):
        make(keys, values, positions=(0, 99))               # count != tokens
    with pytest.raises(InvalidInputError):
        make(keys, values, layers=(4, 5))                   # span != layers
    with pytest.raises(InvalidInputError):
        make(keys.to(torch.int64), values.to(torch.int64))  # unsupported dtype
    with pytest.raises(InvalidInputError):
        make(keys, values, extra={"o": object()}).header.to_msgpack()
    assert issubclass(PageCorruptError, StreamKVError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_from_read_only():
    keys, values = kv()
    page = KVPage.from_bytes(make(keys, values).to_bytes())
    k, v = page.to_tensors("cuda")
    assert k.is_cuda and same(k.cpu(), keys) and same(v.cpu(), values)
    cuda_page = make(keys.cuda(), values.cuda())  # from GPU tensors: one copy to CPU
    assert cuda_page.header.content_hash == make(keys, values).header.content_hash
