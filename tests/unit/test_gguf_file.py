"""Our GGUF reader against the gguf package's own: the same fields and the same tensor bytes for a
file holding every value type, and clear errors for files that are not whole GGUFs."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants

from shard_common.model.gguf_file import GGUFFile, GGUFFormatError


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "all.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁world")
    w.add_array("t.tokens", ["<s>", "", "▁the", "日本"] * 50)
    w.add_array("t.scores", [0.5, -1.25, 3.0])
    w.add_key_value("t.types", [1, 2, 3, 6], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    rng = np.random.default_rng(0)
    w.add_tensor("norm", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("dense", rng.standard_normal((8, 64)).astype(np.float16))
    q = rng.standard_normal((16, 64)).astype(np.float32)
    w.add_tensor("quant", quants.quantize(q, QT.Q4_0), raw_dtype=QT.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_fields_and_tensors_equal_the_gguf_packages_reader(gguf_path):
    ours, theirs = GGUFFile(gguf_path), GGUFReader(str(gguf_path))
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == expected
    assert ours.fields["t.tokens"][2] == "▁the" and ours.fields["t.u64"] == 2**63 + 5
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert mine.qtype == ref.tensor_type
        assert mine.shape == tuple(reversed(ref.shape.tolist()))
        data = np.asarray(ref.data)
        if mine.qtype in (QT.F32, QT.F16):
            data = data.reshape(mine.shape)
        assert mine.data.dtype == data.dtype and mine.data.shape == data.shape and np.array_equal(mine.data, data)


def test_a_file_that_is_not_a_whole_gguf_is_a_clear_error(gguf_path, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + gguf_path.read_bytes()[4:])
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        GGUFFile(bad)
    raw = gguf_path.read_bytes()
    for cut in (10, 200, len(raw) - 100):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(raw[:cut])
        with pytest.raises(GGUFFormatError, match="truncated|past the end"):
            GGUFFile(short)
