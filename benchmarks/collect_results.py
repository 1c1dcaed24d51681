"""Gather benchmarks/results/*.md into benchmarks/RESULTS.md (run after the benchmarks)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
ORDER = [
    "quality",
    "tuning",
    "training",
    "loader",
    "cellprofiler",
    "crop",
    "memory",
    "aggregate",
    "metrics",
    "package",
]


def _demote(text: str) -> str:
    """Push every markdown heading one level down, so each file becomes a section."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def main() -> None:
    parts = sorted(
        (HERE / "results").glob("*.md"),
        key=lambda p: (next((i for i, k in enumerate(ORDER) if p.stem.startswith(k)), 99), p.stem),
    )
    header = (
        "# Benchmark results\n\n"
        "Numbers measured by the scripts in `benchmarks/` (each section names its command, date "
        "and machine). Regenerate a section by rerunning its script, then "
        "`python benchmarks/collect_results.py`.\n"
    )
    body = "\n".join("\n" + _demote(p.read_text().strip()) for p in parts)
    (HERE / "RESULTS.md").write_text(header + body + "\n")
    print(f"Wrote {HERE / 'RESULTS.md'} from {len(parts)} result files")


if __name__ == "__main__":
    main()
