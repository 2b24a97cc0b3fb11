import pytest

from kvlab.cache.quant import QuantizationParams, parse_quantization
from kvlab.errors import ParameterError


@pytest.mark.parametrize("label, expected", [
    ("int4", QuantizationParams("int4")),
    ("INT4:r0", QuantizationParams("int4", residual_tokens=0)),
    ("int2:g64:r8", QuantizationParams("int2", group_size=64, residual_tokens=8)),
    ("int4:r0:tail", QuantizationParams("int4", residual_tokens=0, quantize_tail=True)),
])
def test_labels_read_back(label, expected):
    assert parse_quantization(label) == expected
    assert parse_quantization(expected.label) == expected


@pytest.mark.parametrize("label", ["int3", "int4:x2", "int4:r", "int4:g0", "int4:tail"])
def test_bad_labels_name_the_syntax_or_the_scheme(label):
    with pytest.raises(ParameterError):
        parse_quantization(label)

