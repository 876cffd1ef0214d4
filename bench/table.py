"""Turn pytest-benchmark JSON into the README's "Performance" table (markdown).

    pytest bench/ --benchmark-only --benchmark-json RESULTS.json
    python bench/table.py RESULTS.json                     # print the table
    python bench/table.py RESULTS.json --readme README.md  # replace it between the markers

One row per benchmark: group, provider, median, the median relative to the group's first provider
(as recorded by bench/conftest.py), and notes (end-to-end ratios and FVU, our providers against
sparsify in the same group, i.e. the same dtype and work, peak memory), under a line with the
device, date, commit and the command that produced the JSON.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
# extra_info key -> note format, in the order they are shown
NOTES = [
    ("ratio_a_over_b", "(a)/(b) {:.2f}x"),
    ("ratio_a_over_b_incl_harvest", "{:.2f}x incl. shared harvest"),
    ("ratio_c_over_b", "(c)/(b) {:.2f}x"),
    ("ratio_c_over_b_incl_harvest", "{:.2f}x incl. (b)'s harvest + grouping"),
    ("step_over_floor", "step/floor {:.3f}x (median of paired rounds)"),
    ("step_over_floor_quartiles", "quartiles {:s}"),
    ("floor_ms", "floor {:.1f} ms"),
    ("step_ms", "step {:.1f} ms"),
    ("mean_fvu", "FVU {:.3f}"),
    ("fvu_rel_to_fp32", "FVU {:+.2%} vs fp32"),
    ("peak_memory_mb", "peak {} MB"),
    ("peak_rss_mb", "peak RSS {} MB"),
]


OURS = ("sparse", "triton", "reference")  # our providers, compared with sparsify in their group


def _num(v):
    """Three significant digits, thousands separated: 0.0469, 1.96, 681, 12,345."""
    return f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 100 else f"{v:.3g}"



def _time(seconds: float) -> str:
    for unit, f in (("s", 1), ("ms", 1e3), ("µs", 1e6)):
        if seconds * f >= 1 or unit == "µs":
            return f"{seconds * f:.3g} {unit}"
    raise AssertionError


def _notes(info: dict) -> str:
    out = [fmt.format(_num(info[k])) if "{}" in fmt else fmt.format(info[k])
           for k, fmt in NOTES if info.get(k) is not None]
    if info.get("ratio_a_over_b") is not None and "target_a_over_b" in info:
        out.insert(1, f"target >= {info['target_a_over_b']:.2f}x")
    if info.get("parts_ms"):  # bench_step.py::test_step_parts: medians of each part, in ms
        out.append("ms: " + ", ".join(f"{part} {ms:.1f}" for part, ms in info["parts_ms"].items()))
    return "; ".join(out)


def rows(results: dict) -> list[tuple[str, str, float, float, str]]:
    """(group, provider, median s, median / the group's first provider, notes) per benchmark."""
    found = []
    for b in results["benchmarks"]:
        info = b.get("extra_info", {})
        group = info.get("group") or b.get("group") or b["fullname"].split("::")[0]
        provider = info.get("provider") or b.get("param") or b["name"]
        found.append((group, provider, b["stats"]["median"], info.get("baseline"), info))
    first: dict[str, float] = {}
    by_key = {(g, p): t for g, p, t, _, _ in found}
    for g, _, t, base, _ in found:
        first.setdefault(g, by_key.get((g, base), t) if base else t)
    order = {g: i for i, g in enumerate(first)}  # groups in order of first appearance
    found.sort(key=lambda r: order[r[0]])  # stable: providers keep their run order
    out = []
    for g, p, t, _, info in found:
        notes = _notes(info)
        peer = by_key.get((g, "sparsify"))
        if peer is not None and p in OURS:  # like for like: the same group = same dtype and work
            notes = "; ".join(filter(None, [f"sparsify takes {peer / t:.2f}x our time", notes]))
        out.append((g, p, t, t / first[g], notes))
    return out


def render(results: dict) -> str:
    m, c = results.get("machine_info", {}), results.get("commit_info", {})
    device = results.get("lgsae_device") or m.get("cpu", {}).get("brand_raw") or m.get("machine")
    commit = (c.get("id") or "?")[:10] + (" (dirty)" if c.get("dirty") else "")
    cmd = results.get("lgsae_command", "pytest bench/ --benchmark-only")
    head = (f"Device: {device}; date: {results.get('datetime', '?')[:19]}; commit {commit}; "
            f"scale {results.get('lgsae_scale', '?')}.  \n"
            f"Command: `{cmd}`\n")
    lines = ["| group | provider | median | vs first | notes |", "|---|---|---|---|---|"]
    lines += [f"| {g} | `{p}` | {_time(t)} | {r:.2f}x | {n} |" for g, p, t, r, n in rows(results)]
    return head + "\n" + "\n".join(lines) + "\n"


def replace_between_markers(text: str, table: str, where: str = "README") -> str:
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"{where} needs the markers {START} and {END} (in that order) around "
                         "the place for the table; add them and run again")
    return text[:i + len(START)] + "\n" + table + text[j:]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python bench/table.py", description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--readme", type=Path, default=None,
                   help=f"also replace the text between {START} and {END} in this file")
    a = p.parse_args(argv)
    table = render(json.loads(a.results.read_text(encoding="utf-8")))
    print(table, end="")
    if a.readme is not None:
        new = replace_between_markers(a.readme.read_text(encoding="utf-8"), table, str(a.readme))
        _write_atomic(a.readme, new)
    return table


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        sys.exit(f"table.py: error: {e}")
