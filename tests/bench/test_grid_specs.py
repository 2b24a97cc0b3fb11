import pytest

from kvlab.bench.runner import grid
from kvlab.errors import ParameterError


def test_policy_specs_set_parameters_and_label_the_variant():
    cells = grid(["kvzip", "kvzip:heads=shared"], [0.5], ["int4:r0"])
    assert [cell.label for cell in cells] == ["kvzip", "kvzip:heads=shared"]
    assert cells[1].policy.heads == "shared"
    assert cells[0].quantization == "int4:r0"
    with pytest.raises(ParameterError):
        grid(["kvzip:heads"], [0.5])
