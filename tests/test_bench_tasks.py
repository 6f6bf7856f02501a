"""benchmarks/tasks.py's pure parts (the end-to-end run is `python benchmarks/tasks.py --scale quick`)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.tasks import curves_png


def test_curves_are_named_after_the_results_file():
    r = Path("benchmarks/results")
    assert curves_png(r / "tasks_full.json") == r / "tasks_curves.png"  # the committed three-task figure
    assert curves_png(r / "tasks_full_qa2_zen4.json") == r / "tasks_curves_qa2_zen4.png"
    assert curves_png(r / "tasks_quick.json") == r / "tasks_curves_quick.png"
    assert curves_png(r / "mine.json") == r / "mine_curves.png"  # never tasks_curves.png: it would overwrite it
    assert curves_png(r / "tasksfoo.json") == r / "tasksfoo_curves.png"
