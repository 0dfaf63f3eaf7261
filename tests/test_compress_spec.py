import subprocess
import sys

import pytest

from ctp_eval.compress.spec import (
    CompressSpec,
    QuantSpec,
    SparseSpec,
    SpecError,
    canonical_spec,
    parse_spec,
)

CANONICAL = [
    "none",
    "gptq:w4",
    "gptq:w3g128",
    "gptq:w2g64-act",
    "gptq:w4g128-sym-act",
    "rtn:w4g128",
    "sparsegpt:0.5",
    "sparsegpt:0.625",
    "sparsegpt:2:4",
    "magnitude:0.75",
    "magnitude:2:4",
    "sparsegpt:0.5+gptq:w4",
    "sparsegpt:2:4+gptq:w4g128",
    "magnitude:0.5+rtn:w4",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_round_trip(text):
    spec = parse_spec(text)
    assert str(spec) == text
    assert parse_spec(str(spec)) == spec


def test_fields_and_aliases():
    s = parse_spec("gptq:w3g128")
    assert s.quant == QuantSpec("gptq", 3, 128) and s.sparse is None and s.needs_calibration
    s = parse_spec("sparsegpt:2:4")
    assert s.sparse == SparseSpec("sparsegpt", n=2, m=4) and s.sparse.sparsity == 0.5
    assert parse_spec(None).is_none and parse_spec("").is_none and parse_spec("NONE").is_none
    assert not parse_spec("magnitude:0.5+rtn:w4").needs_calibration
    # order and spelling normalize to one canonical key
    assert canonical_spec(" GPTQ:W4+SparseGPT:.50 ") == "sparsegpt:0.5+gptq:w4"
    assert canonical_spec("gptq:w4g0") == "gptq:w4"
    assert parse_spec(CompressSpec()) == CompressSpec()


@pytest.mark.parametrize(
    "bad",
    [
        "gptq", "gptq:", "gptq:4", "gptq:w9", "gptq:w1", "gptq:w4x", "awq:w4", "sparsegpt:1.5", "sparsegpt:0",
        "sparsegpt:abc", "sparsegpt:4:2", "gptq:w4+gptq:w3", "sparsegpt:0.5+rtn:w4", "magnitude:0.5+gptq:w4",
        "rtn:w4-act", "sparsegpt:0.5+gptq:w4-act",
    ],
)
def test_errors_list_valid_forms(bad):
    with pytest.raises(SpecError) as e:
        parse_spec(bad)
    msg = str(e.value)
    assert repr(bad) in msg and "Valid forms" in msg and "sparsegpt:0.5+gptq:w4" in msg


def test_parse_does_not_import_torch():
    code = "import sys, ctp_eval.compress as c; c.parse_spec('gptq:w4'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
