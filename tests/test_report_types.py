"""The report's effective type: one kind where the relative count and the output share agree, both otherwise."""

from __future__ import annotations

from pathlib import Path

from ella.report import (PathReport, effective_layer_types, format_report, plot_relative, pyplot, save_figure,
                         write_report)


def _row(layer: str, path: str, kind: str, relative: float, share: float | None) -> PathReport:
    return PathReport(layer=layer, path=path, kind=kind, precisions=(1.0,), n_params=10, n_eff=relative * 10,
                      normalised=relative, relative=relative, output_share=share)


ROWS = [
    _row("blocks.0", "fc", "F-FC", 0.6, 0.01), _row("blocks.0", "conv", "CONV", 0.4, 0.99),  # disagree
    _row("blocks.1", "fc", "F-FC", 0.3, 0.2), _row("blocks.1", "conv", "CONV", 0.7, 0.8),  # agree
    PathReport(layer="head.0", path=None, kind="Linear", precisions=(2.0,), n_params=5, n_eff=3.0, normalised=0.6,
               relative=1.0),
]


def test_the_type_names_both_readings_where_they_point_to_different_paths() -> None:
    assert effective_layer_types(ROWS) == {"blocks.0": "F-FC? (rel) / CONV (out)", "blocks.1": "CONV"}
    lines = format_report(ROWS).splitlines()
    assert lines[1].endswith("  F-FC? (rel) / CONV (out)") and lines[2].endswith("  F-FC? (rel) / CONV (out)")
    assert lines[3].endswith("  CONV") and lines[0].split()[-3] == "output"


def test_without_output_shares_the_type_is_the_largest_relative_count() -> None:
    rows = [_row("0", "fc", "F-FC", 0.6, None), _row("0", "conv", "CONV", 0.4, None)]
    assert effective_layer_types(rows) == {"0": "F-FC"}
    assert "output" not in format_report(rows).splitlines()[0]


def test_the_writers_take_a_path_given_as_text(tmp_path: Path) -> None:
    """A str path works as a Path does (the writers once called ``.mkdir`` / ``.parent`` on it)."""
    text, data = write_report(ROWS, str(tmp_path / "report"))
    assert text.read_text().startswith("layer") and data == tmp_path / "report" / "effective_parameters.json"
    assert plot_relative(ROWS, str(tmp_path / "relative.png")).stat().st_size > 0
    path = save_figure(pyplot().figure(), str(tmp_path / "figures" / "empty.png"))
    assert path == tmp_path / "figures" / "empty.png" and path.is_file()
