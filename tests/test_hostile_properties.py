"""Property-based tests over the two parsers that see untrusted input first: the safetensors header parser and the
key grammar. Whatever the bytes, the header parser either returns or raises AdapterFormatError (never anything
else, never hangs); `parse_key` never raises and round-trips every name the grammar produces."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_convert.errors import AdapterFormatError
from lora_convert.io.dtypes import DTYPE_SIZES
from lora_convert.io.tensor_files import (
    _checked_entry,
    _offset_ordered,
    _well_formed_in_order,
    read_safetensors_header,
)
from lora_convert.peft.naming import PEFT_PREFIX, VISION_SEGMENTS, Factor, parse_key

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


def _parse_bytes(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter_model.safetensors"
        path.write_bytes(data)
        try:
            tensors, metadata = read_safetensors_header(path)
        except AdapterFormatError as exc:
            assert exc.message
            return None
        return tensors, metadata


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_else(data):
    _parse_bytes(data)


@SETTINGS
@given(st.binary(max_size=256), st.integers(min_value=0, max_value=2**64 - 1))
def test_random_length_prefix(body, length):
    _parse_bytes(struct.pack("<Q", length) + body)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
dtype_values = st.sampled_from(sorted(DTYPE_SIZES)) | st.text(max_size=5) | json_values
shape_values = st.lists(st.integers(min_value=-2, max_value=9), max_size=3) | json_values
offset_values = st.lists(st.integers(min_value=-5, max_value=400), min_size=0, max_size=3) | json_values
entries = (
    st.fixed_dictionaries({}, optional={"dtype": dtype_values, "shape": shape_values, "data_offsets": offset_values})
    | json_values
)
key_text = st.text(min_size=0, max_size=30) | st.sampled_from(["__metadata__", "base_model.model.x.lora_A.weight"])


@pytest.mark.slow
@SETTINGS
@given(st.dictionaries(key_text, entries, max_size=5) | json_values, st.integers(min_value=0, max_value=400))
def test_random_header_json(header, data_len):
    raw = json.dumps(header).encode()
    result = _parse_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * data_len)
    if result is not None:
        tensors, _ = result
        spans = sorted((t.start, t.start + t.nbytes) for t in tensors.values())
        for (_a0, a1), (b0, _b1) in zip(spans, spans[1:], strict=False):
            assert a1 <= b0  # accepted headers never overlap
        for t in tensors.values():
            assert t.start + t.nbytes <= 8 + len(raw) + data_len
            assert t.nbytes == t.numel * DTYPE_SIZES[t.dtype]


@pytest.mark.slow
@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(sorted(DTYPE_SIZES)), st.lists(st.integers(0, 5), max_size=3)), max_size=5))
def test_well_formed_headers_are_accepted_and_match_the_library(specs):
    """Headers we build by the format's rules parse, and agree with the safetensors library."""
    header, offset = {}, 0
    for i, (dtype, shape) in enumerate(specs):
        n = DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    result = _parse_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * offset)
    assert result is not None
    tensors, _ = result
    assert sorted(tensors) == sorted(header)
    for key, entry in header.items():
        assert list(tensors[key].shape) == entry["shape"] and tensors[key].dtype == entry["dtype"]


# Entries that get data_offsets from their shape below: mostly well formed, so that the fast path has work to do.
sized_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(sorted(DTYPE_SIZES)),
        "shape": st.lists(st.integers(min_value=-1, max_value=5), max_size=3),
    }
)


@settings(SETTINGS, max_examples=600)
@given(
    st.lists(
        st.tuples(key_text, sized_entries | entries, st.none() | st.integers(0, 60), st.sampled_from([0, 0, 0, 1, -1])),
        max_size=5,
    ),
    st.integers(min_value=-8, max_value=64),
)
def test_fast_header_path_agrees_with_the_plain_one(specs, slack):
    """`_well_formed_in_order` (the fast path) either declines or returns exactly what the plain path, entry by
    entry through `_checked_entry` and then `_offset_ordered`, returns for the same header."""
    header, offset = {}, 0
    for key, entry, start, error in specs:
        if isinstance(entry, dict) and str(entry.get("dtype")) in DTYPE_SIZES:
            shape = entry.get("shape")
            if isinstance(shape, list) and all(type(d) is int for d in shape):  # negative sizes included
                n = DTYPE_SIZES[entry["dtype"]]
                for d in shape:
                    n *= d
                begin = offset if start is None else start  # None: next in offset order; else anywhere
                entry = {**entry, "data_offsets": [begin, begin + n + error]}
                offset = max(offset, begin + n)
        # Control characters in names are `_tensor_infos`' concern: it takes the fast path only without them.
        header["".join(c for c in key if c >= " " and c != "\x7f")] = entry
    header.pop("__metadata__", None)
    data_len = max(0, offset + slack)  # around the end of the last tensor: truncation both sides of it
    path, data_start = Path("adapter_model.safetensors"), 100
    fast = _well_formed_in_order(header, path, data_start, data_len)
    if fast is None:
        return
    plain = _offset_ordered(
        str(path), [_checked_entry(str(path), k, e, path, data_start, data_len) for k, e in header.items()]
    )
    assert list(fast.items()) == list(plain.items())


# ---- parse_key --------------------------------------------------------------------------------------------------
@SETTINGS
@given(st.text(max_size=120))
def test_parse_key_never_raises(key):
    parsed = parse_key(key)
    assert parsed.key == key
    assert isinstance(parsed.factor, Factor)


segment = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda s: (
        s
        not in {
            "lora_A",
            "lora_B",
            "lora_embedding_A",
            "lora_embedding_B",
            "lora_magnitude_vector",
            "base_layer",
            "weight",
            "bias",
            "layers",
            "experts",
            "modules_to_save",
            "original_module",
        }
        and s not in VISION_SEGMENTS
    )
)


@SETTINGS
@given(
    prefix=st.lists(segment, min_size=1, max_size=2),
    layer=st.none() | st.integers(0, 200),
    expert=st.none() | st.integers(0, 300),
    tail=st.lists(segment, min_size=1, max_size=3),
    depth=st.integers(0, 2),
    factor=st.sampled_from(["lora_A", "lora_B"]),
    peft_prefix=st.booleans(),
)
def test_parse_key_round_trips_the_grammar(prefix, layer, expert, tail, depth, factor, peft_prefix):
    parts = list(prefix)
    if layer is not None:
        parts += ["layers", str(layer)]
    local = list(tail)
    if expert is not None:
        local = local[:1] + ["experts", str(expert)] + local[1:]
    module = ".".join(parts + local)
    key = (PEFT_PREFIX if peft_prefix else "") + module + ".base_layer" * depth + f".{factor}.weight"
    p = parse_key(key)
    assert p.factor is Factor(factor)
    assert p.module == module
    assert p.base_layer_depth == depth
    assert p.has_peft_prefix == peft_prefix
    assert p.adapter_name is None
    assert p.layer == layer
    if layer is not None:
        assert p.stack_prefix == ".".join(prefix)
        assert p.expert == expert
        if expert is not None:
            assert "experts" in p.local_name.split(".") and str(expert) not in p.local_name.split(".")


@SETTINGS
@given(st.lists(segment, min_size=1, max_size=4), st.sampled_from(["default", "my_adapter"]))
def test_adapter_name_segment_is_recognised(parts, name):
    p = parse_key(PEFT_PREFIX + ".".join(parts) + f".lora_B.{name}.weight")
    assert p.factor is Factor.LORA_B and p.adapter_name == name and p.module == ".".join(parts)
