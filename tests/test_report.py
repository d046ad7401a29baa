import csv

from csr_eval.report import write_results


def test_write_results_writes_the_rows_as_csv_and_the_lines_as_markdown(tmp_path, capsys):
    rows = [{"context": 4096, "ratio": 1.25}, {"context": 8192, "ratio": 1.09}]
    write_results(rows, tmp_path / "sub" / "bench", ["| context | ratio |", "|---|---|", "| 4096 | 1.25 |"])
    with open(tmp_path / "sub" / "bench.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"context": "4096", "ratio": "1.25"}, {"context": "8192", "ratio": "1.09"}]
    assert (tmp_path / "sub" / "bench.md").read_text() == "| context | ratio |\n|---|---|\n| 4096 | 1.25 |\n"
    assert "| 4096 | 1.25 |" in capsys.readouterr().out


def test_rows_of_different_tables_share_one_csv_with_every_column(tmp_path):
    rows = [{"table": "speed", "ms": 6.75}, {"table": "quality", "layer": 3, "rel_err": 0.2}]
    write_results(rows, tmp_path / "mixed", ["x"])
    with open(tmp_path / "mixed.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"table": "speed", "ms": "6.75", "layer": "", "rel_err": ""},
                                           {"table": "quality", "ms": "", "layer": "3", "rel_err": "0.2"}]
