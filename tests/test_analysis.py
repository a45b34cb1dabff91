import os
import sys
from pathlib import Path

import matplotlib
import nbformat
import pytest
from nbclient import NotebookClient

from fedpeft_pl.analysis import format_table, load_runs, plot_accuracy, summarize
from fedpeft_pl.cli import main

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "--trainer.num_rounds",
    "2",
    "--trainer.clients_per_round",
    "2",
    "--trainer.local_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Two short real runs of the quickstart task: Prompt and Full."""
    root = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        for method, name in (("Prompt", "prompt"), ("Full", "full")):
            main(
                [
                    "fit",
                    "--config",
                    "configs/quickstart.yaml",
                    *SHORT,
                    "--model.peft",
                    f"fedpeft_pl.peft.{method}",
                    "--trainer.logger.init_args.save_dir",
                    str(root),
                    "--trainer.logger.init_args.name",
                    name,
                ]
            )
    finally:
        os.chdir(cwd)
    return root


def test_runs_are_found_and_read(logs):
    runs = {run.method: run for run in load_runs(logs)}
    assert set(runs) == {"Prompt", "Full"}
    prompt = runs["Prompt"]
    assert prompt.rounds == 2
    megabytes, accuracy = prompt.accuracy_vs_megabytes()
    _, cumulative = prompt.series("comm/cumulative_bytes")
    assert megabytes == [b / 2**20 for b in cumulative]
    assert accuracy == prompt.series("server/acc")[1]
    assert prompt.final_accuracy == accuracy[-1]


def test_summary_compares_bytes_with_full(logs):
    rows = {row["method"]: row for row in summarize(load_runs(logs))}
    full, prompt = rows["Full"], rows["Prompt"]
    assert full["x_fewer_bytes_than_Full"] == 1.0
    assert prompt["x_fewer_bytes_than_Full"] == pytest.approx(full["total_MiB"] / prompt["total_MiB"])
    assert prompt["x_fewer_bytes_than_Full"] > 30
    table = format_table(list(rows.values())).splitlines()
    assert table[0].startswith("| run | method | rounds | final_acc") and len(table) == 4


def test_plot_has_one_line_per_run_in_both_panels(logs):
    figure = plot_accuracy(load_runs(logs))
    by_bytes, by_round = figure.axes
    assert len(by_bytes.lines) == len(by_round.lines) == 2
    assert by_bytes.get_xscale() == "log"


def test_missing_logs_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no TensorBoard event files or CSVLogger metrics\.csv"):
        load_runs(tmp_path)


def test_a_csv_logger_run_reads_as_its_tensorboard_twin_and_is_reported(logs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    root = tmp_path / "csv"
    main(
        [
            "fit",
            "--config",
            "configs/quickstart.yaml",
            *SHORT,
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir",
            str(root),
        ]
    )
    folder = root / "prompt" / "version_0"
    assert (folder / "metrics.csv").is_file() and not list(folder.glob("events.out.tfevents.*"))
    summary = capsys.readouterr().err.splitlines()
    suggested = [line.split("#")[0].split() for line in summary[summary.index("next:") + 1 :]]
    assert [command[:2] for command in suggested] == [["fedpeft", "report"], ["fedpeft", "export"]], summary
    assert suggested[0][2] == str(root)  # no tensorboard: this run wrote no event files
    (run,) = load_runs(root)
    twin = next(r for r in load_runs(logs) if r.method == "Prompt")  # the same run, logged to TensorBoard
    assert (run.name, run.method, run.rounds) == ("prompt/version_0", "Prompt", 2)
    for tag in ("comm/cumulative_bytes", "comm/bytes_up", "comm/bytes_down", "round/clients_aggregated"):
        assert run.series(tag) == twin.series(tag), tag
    for tag in ("server/acc", "server/loss", "train/loss", "server/acc_vs_cumulative_bytes"):
        steps, values = run.series(tag)
        assert steps == twin.series(tag)[0] and len(steps) >= 2, tag
        assert values == pytest.approx(twin.series(tag)[1], rel=1e-6), tag  # TensorBoard keeps float32
    assert run.accuracy_vs_megabytes()[0] == twin.accuracy_vs_megabytes()[0]
    main(["report", suggested[0][2], "--output", str(tmp_path / "report")])
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| prompt/version_0 | Prompt | 2 |" in table, table
    assert "skipped" not in capsys.readouterr().err


def test_a_folder_with_both_logs_is_one_run(logs, tmp_path):
    import shutil

    folder = tmp_path / "both" / "version_0"
    shutil.copytree(logs / "prompt" / "version_0", folder)
    (folder / "metrics.csv").write_text("server/acc,step\n0.5,1\n")  # read only where no event files are
    (run,) = load_runs(tmp_path / "both")
    assert run.rounds == 2 and run.series("server/acc")[1] != [0.5]


@pytest.mark.slow  # a notebook kernel
def test_the_notebook_runs_headless_on_real_logs(logs, monkeypatch):
    monkeypatch.setenv("FEDPEFT_RUNS", str(logs))
    notebook = nbformat.read(REPO / "notebooks" / "accuracy_vs_communication.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [(e.ename, e.evalue) for e in errors]
    assert any("| run | method |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_fedpeft_report_writes_the_table_and_figures_and_skips_unfinished_runs(logs, tmp_path, capsys):
    import shutil

    unfinished = tmp_path / "unfinished" / "version_0"
    shutil.copytree(logs / "prompt" / "version_0", unfinished)
    config = unfinished / "config.yaml"
    config.write_text(config.read_text().replace("num_rounds: 2", "num_rounds: 5"))
    output = tmp_path / "report"
    main(["report", str(logs), str(tmp_path / "unfinished"), "--output", str(output)])
    out = capsys.readouterr()
    assert "skipped" in out.err and "2 of 5 rounds" in out.err
    table = (output / "report.md").read_text()
    assert "| run | method | rounds | final_acc" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    assert sorted(row.split(" | ")[1] for row in rows) == ["Full", "Prompt"], table
    for figure in ("accuracy_vs_mib.png", "accuracy_vs_round.png"):
        assert (output / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert str(output / "report.md") in out.out


def test_fedpeft_report_without_matplotlib_writes_the_table_and_names_the_extra(logs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    output = tmp_path / "report"
    main(["report", str(logs), "--output", str(output)])
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "figures not drawn" in err[0] and "fedpeft-pl[analysis]" in err[0]
    assert sorted(p.name for p in output.iterdir()) == ["report.md"]
    assert "| run | method | rounds | final_acc" in (output / "report.md").read_text()
    assert out.out.strip() == f"wrote {output / 'report.md'}"
