"""The bench renderer turns records of the harness's format into a table and plots."""
import json

import pytest

from benches.render import main


def _record(provider, ms, **kw):
    base = {"op": "cross_entropy", "case": "N37-V1003", "mode": "full", "provider": provider,
            "median_ms": ms, "p20_ms": ms * 0.9, "p80_ms": ms * 1.1,
            "peak_extra_mem_gb": 0.1, "floor_bytes": 1e6, "floor_flops": 0.0,
            "floor_ms": 0.5, "ratio_to_floor": ms / 0.5, "tflops": None, "gbps": 1e6 / ms / 1e6,
            "shape": {"N": 37}, "ratio_vs": {}}
    return {**base, **kw}


def test_render_writes_markdown_with_ratios_and_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    payload = {"created": "t", "machine": {"gpu": "Example GPU", "torch": "x", "triton": "y",
                                           "cuda": "z", "measured_bandwidth_gbps": 3000.0,
                                           "measured_bf16_matmul_tflops": 790.0},
               "records": [_record("fastlab", 1.0, ratio_vs={"peer": 2.5}),
                           _record("peer", 2.5, ratio_vs={"fastlab": 0.4})]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(payload))
    assert main([str(path)]) == 0
    text = (tmp_path / "benches.md").read_text()
    assert "Example GPU" in text and "| N37-V1003 | full | fastlab | 1.0000 |" in text
    assert "peer 2.50" in text and "| 2.00 |" in text
    assert (tmp_path / "cross_entropy.png").read_bytes()[:4] == b"\x89PNG"
