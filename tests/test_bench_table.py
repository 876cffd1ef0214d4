"""bench/table.py: pytest-benchmark JSON -> the README's Performance table."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

TABLE = Path(__file__).resolve().parents[1] / "bench" / "table.py"


def _table_module():
    spec = importlib.util.spec_from_file_location("bench_table", TABLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(name, group, provider, median, baseline, **info):
    return {"name": name, "fullname": f"bench/x.py::{name}", "group": None, "param": provider,
            "stats": {"median": median},
            "extra_info": {"group": group, "provider": provider, "baseline": baseline, **info}}


RESULTS = {
    "machine_info": {"machine": "x86_64"},
    "commit_info": {"id": "0123456789abcdef", "dirty": True},
    "datetime": "2026-11-25T10:00:00.000000+00:00",
    "lgsae_command": "pytest bench/ --benchmark-only --scale small",
    "lgsae_scale": "small",
    "lgsae_device": "CPU test x2 threads",
    "benchmarks": [
        _bench("test_step[fp32-gemm_topk]", "step fp32", "gemm_topk", 0.200, "gemm_topk",
               peak_memory_mb=0.05),
        _bench("test_step[bf16-sparse]", "step bf16", "sparse", 0.0004, "sparse",
               speedup_vs_sparsify_fp32=2.5),  # recorded, not shown: bf16 vs fp32
        _bench("test_step[bf16-sparsify]", "step bf16", "sparsify", 0.0005, "sparse"),
        _bench("test_step[fp32-sparse]", "step fp32", "sparse", 0.250, "gemm_topk"),
        _bench("test_e2e[groups]", "e2e 30 layers", "groups", 10.0, "groups", mean_fvu=0.45),
        _bench("test_e2e[per-layer]", "e2e 30 layers", "per-layer", 37.5, "groups",
               ratio_a_over_b=3.75, target_a_over_b=3.0, peak_rss_mb=2345.6),
        _bench("test_e2e[saelens_dense]", "e2e 30 layers", "saelens_dense", 80.0, "groups",
               ratio_c_over_b=8.0, ratio_c_over_b_incl_harvest=6.1),
        _bench("test_e2e[groups_bf16]", "e2e 30 layers", "groups_bf16", 6.0, "groups",
               fvu_rel_to_fp32=0.004),
        _bench("test_step_parts[bf16]", "step parts bf16", "sparse", 0.300, "sparse",
               parts_ms={"floor": 150.0, "encode": 152.25, "rest": 7.04}),
    ],
}


def test_table_rows_ratios_and_header(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RESULTS))
    out = _table_module().main([str(path)])
    assert capsys.readouterr().out == out
    assert "CPU test x2 threads" in out and "2026-11-25T10:00:00" in out
    assert "`pytest bench/ --benchmark-only --scale small`" in out and "0123456789 (dirty)" in out
    assert "| step fp32 | `sparse` | 250 ms | 1.25x |" in out
    # rows of a group stay together, groups in order of first appearance
    assert out.index("`gemm_topk`") < out.index("| step fp32 | `sparse`") < out.index("step bf16")
    assert "| step bf16 | `sparse` | 400 µs | 1.00x | sparsify takes 1.25x our time |" in out
    assert "sparsify fp32" not in out  # only like-for-like comparisons in the table
    assert "| e2e 30 layers | `per-layer` | 37.5 s | 3.75x | (a)/(b) 3.75x; target >= 3.00x; " \
           "peak RSS 2,346 MB |" in out
    assert "(c)/(b) 8.00x; 6.10x incl." in out and "FVU +0.40% vs fp32" in out
    assert "peak 0.05 MB" in out and "FVU 0.450" in out
    assert "| step parts bf16 | `sparse` | 300 ms | 1.00x | ms: floor 150.0, encode 152.2, " \
           "rest 7.0 |" in out


def test_readme_markers_replaced_atomically_and_missing_markers_fail(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RESULTS))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n<!-- perf-table:start -->\nold table\n"
                      "<!-- perf-table:end -->\n\nafter\n")
    readme.chmod(0o644)
    mod = _table_module()
    table = mod.main([str(path), "--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and table in text
    assert text.startswith("# x\n\n## Performance\n<!-- perf-table:start -->\nDevice:")
    assert text.endswith(table + "<!-- perf-table:end -->\n\nafter\n")
    assert readme.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    mod.main([str(path), "--readme", str(readme)])  # idempotent
    assert readme.read_text() == text

    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    with pytest.raises(ValueError, match="perf-table:start"):
        mod.main([str(path), "--readme", str(bare)])
    assert bare.read_text() == "no markers\n"
    proc = subprocess.run([sys.executable, str(TABLE), str(path), "--readme", str(bare)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "needs the markers" in proc.stderr


def test_sweep_encode_check_rejects_wrong_selections():
    """bench/sweep_encode.py times a configuration only after `check` accepts its output."""
    spec = importlib.util.spec_from_file_location(
        "sweep_encode", TABLE.parent / "sweep_encode.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    import torch

    from lgsae.reference import EncodeOut

    pre = torch.randn(6, 50).relu()
    want = pre.topk(5, dim=1)
    good = EncodeOut(want.values.flip(1), want.indices.flip(1), None, None)  # any order is fine
    assert sweep.check(good, want.values, 50, 5) is None
    worse = want.values.clone()
    worse[2, 0] -= 0.5
    assert "values differ" in sweep.check(EncodeOut(worse, want.indices, None, None),
                                          want.values, 50, 5)
    twice = want.indices.clone()
    twice[1, 1] = twice[1, 0]
    assert "twice" in sweep.check(EncodeOut(want.values, twice, None, None), want.values, 50, 5)
    outside = want.indices.clone()
    outside[0, 0] = 50
    assert "range" in sweep.check(EncodeOut(want.values, outside, None, None),
                                  want.values, 50, 5)
    if not torch.cuda.is_available():
        assert sweep.main([]) == 2  # no GPU: says so and exits 2, timing nothing
