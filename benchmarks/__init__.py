"""Benchmarks: scripts that print tables and write them to benchmarks/results/."""

import json
from pathlib import Path


def write_results(out: Path, text: str, results: dict) -> None:
    """Write a benchmark's tables to ``out``.md, its records to ``out``.json; print the tables."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(text)
