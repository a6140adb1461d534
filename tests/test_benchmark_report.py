"""benchmarks/report.py writes BENCHMARKS.md again from a run's results: what it does not render (sections and
subsections written by hand) must come back verbatim and in place."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import report as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


EXISTING = """# Benchmarks

Preamble of an older run.

## Goals by hand

A table written by hand.

## Summary

old summary

## 1. Forward

old forward

### MixNet_S

old S

### By hand inside a rendered section

kept text

### MixNet_L

old L

## Hand-written section after a rendered subsection

kept too

### Its own subsection

and this

## Graph form

### MixNet_S

old graph S

## Install: time and size per Python

old install
"""

RENDERED = """# Benchmarks

Preamble of the new run.

## Summary

new summary

## 1. Forward

new forward

### MixNet_S

new S

### MixNet_L

new L

### A new rendered subsection

new sub

## Graph form

### MixNet_S

new graph S

## Install: time and size per Python

new install
"""


def test_hand_written_blocks_come_back_in_place(report) -> None:
    merged = report.keep_hand_written(RENDERED, EXISTING)
    headings = [line for line in merged.splitlines() if line.startswith("#")]
    assert headings == [
        "# Benchmarks",
        "## Goals by hand",
        "## Summary",
        "## 1. Forward",
        "### MixNet_S",
        "### By hand inside a rendered section",
        "### MixNet_L",
        "### A new rendered subsection",  # a rendered section's own subsections stay together
        "## Hand-written section after a rendered subsection",
        "### Its own subsection",
        "## Graph form",
        "### MixNet_S",
        "## Install: time and size per Python",
    ]
    # The new run's numbers replace the old ones; the hand-written text is there once, verbatim.
    for new in ("Preamble of the new run.", "new summary", "new S", "new L", "new graph S", "new install"):
        assert new in merged
    for old in ("Preamble of an older run.", "old summary", "old S", "old graph S", "old install"):
        assert old not in merged
    for kept in ("A table written by hand.", "kept text", "kept too", "and this"):
        assert merged.count(kept) == 1


def test_a_report_with_nothing_hand_written_is_unchanged(report) -> None:
    assert report.keep_hand_written(RENDERED, RENDERED) == RENDERED


def test_the_projects_own_report_survives_being_written_again(report) -> None:
    # BENCHMARKS.md against itself minus its hand-written blocks: the merge gives it back whole.
    existing = (BENCHMARKS.parent / "BENCHMARKS.md").read_text(encoding="utf-8")
    blocks = report._blocks(existing)
    hand = {key for key, _ in blocks if "by hand" in key.lower() or key.startswith("## Summary of the speed goals")}
    assert hand, "BENCHMARKS.md has no hand-written section to check with"
    rendered = "".join(block for key, block in blocks if key not in hand)
    assert report.keep_hand_written(rendered, existing) == "".join(block for _, block in blocks)
