"""The experiment's command line (python -m experiments.recsys): argument checks, --help, every method in the table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.recsys import __main__ as cli
from experiments.recsys.methods import METHODS

from .test_recsys import _folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
        (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
        (["--patience", "0"], "--patience: must be >= 1"),
        (["--batch-size", "-3"], "--batch-size: must be >= 1"),
        (["--relax-grid", "1.5"], r"--relax-grid: must be in \[0, 1\], got 1.5"),
        (["--relax-grid", "0.5", "0.5"], "--relax-grid: a value is listed more than once"),
        (["--beta", "1.0"], r"--beta: must be in \[0, 1\), got 1.0"),
        (["--val-users", "0"], "--val-users: must be >= 1, got 0"),
        (["--test-users", "0"], "--test-users: must be >= 1"),
        (["--methods", "mb-C", "mb-C"], "--methods: listed more than once: mb-C"),
        (["--methods", "nope"], "--methods: invalid choice: 'nope'"),
        (["--trace-every", "0"], "--trace-every: must be >= 1, got 0"),
        (["--trace", "t.json", "--methods", "single"], "--trace: .* add vanilla or mb-C"),
        (["--lr", "0"], r"--lr: must be in \(0, 10\]"),
        (["--seeds", "two"], "--seeds: expected an integer, got 'two'"),
        (["--grid", "weights=0.1"], "--grid: weights not in --methods"),
        (["--methods", "dwa", "--grid", "dwa=0"], r"--grid: dwa: values must be >= 0 \(> 0 for dwa\)"),
        (["--grid", "mb-C=0.5"], "--grid: expected METHOD=V1,V2"),
        (["--methods", "vanilla", "--relax-grid", "0.5"], "--relax-grid: no MetaBalance method"),
        (["--data", "/no/such/folder"], "--data: /no/such/folder does not exist"),
        (["--neg-ratio", "0"], "--neg-ratio: must be >= 1"),
        (["--max-users", "1"], "--max-users: must be >= 2"),
    ],
)
def test_bad_arguments_fail_in_argparse_before_loading(argv, message, capsys, monkeypatch):
    from experiments.recsys import data

    def no_load(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("data loaded despite a bad argument")

    monkeypatch.setattr(data, "load", no_load)
    monkeypatch.setattr(data, "synthetic", no_load)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_help_lists_every_method_and_needs_no_torch():
    """--help runs with torch and numpy unimportable (so it needs no bootstrap of the heavy stack)."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; "
        "from experiments.recsys.__main__ import main; main(['--help'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, info in METHODS.items():
        assert sum(line.split()[:1] == [name] and info.help in line for line in lines) == 1, name


def test_every_method_runs_and_is_in_the_table(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    out = tmp_path / "out.json"
    methods = list(METHODS)
    data = str(_folder(folder, False))
    grids = ["--relax-grid", "0.5", "--grid", "weights=0.1,0.5"]
    cli.main(
        [
            "--data",
            data,
            "--methods",
            *methods,
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            *grids,
            "--quiet",
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    table = text[text.index("| method") :]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == len(methods)
    for name in methods:
        assert any(METHODS[name].label in row for row in rows), name
    payload = json.loads(out.read_text())
    assert set(payload["runs"]) == set(methods)
    assert set(payload["grid"]["weights"]) == {"0.1", "0.5"}
    by_method = {row["method"]: row for row in payload["table"]}
    # Paired tests against both references for every trained method, none for the references against themselves.
    for name in methods:
        refs = set(by_method[name]["paired"])
        expected = set() if name == "mostpop" else {"vanilla", "mb-C"} - {name}
        assert refs == expected, name
    cmp = by_method["pcgrad"]["paired"]["vanilla"]
    assert cmp["seeds"] == [0, 1] and 0.0 <= cmp["p_wilcoxon"] <= 1.0


def test_report_merges_partial_outputs(tmp_path, capsys):
    from experiments.recsys import report

    folder = tmp_path / "data"
    folder.mkdir()
    _folder(folder, False)
    base = ["--data", str(folder), "--seeds", "2", "--epochs", "1", "--batch-size", "2", "--quiet"]
    cli.main([*base, "--methods", "vanilla", "--out", str(tmp_path / "a.json")])
    cli.main([*base, "--methods", "gradsim", "mb-C", "--relax-grid", "0.7", "--out", str(tmp_path / "b.json")])
    capsys.readouterr()
    report.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(tmp_path / "t.json")])
    rows = {r["method"]: r for r in json.loads((tmp_path / "t.json").read_text())}
    assert list(rows) == ["vanilla", "gradsim", "mb-C"]
    assert set(rows["gradsim"]["paired"]) == {"vanilla", "mb-C"}  # paired across the two files by seed
