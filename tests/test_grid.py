"""The paper's experiment grid: every overlay composes with the method configs, and the launcher works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft_pl.cli import main

REPO = Path(__file__).resolve().parents[1]
GRID = [sys.executable, str(REPO / "scripts" / "grid.py")]
OVERLAYS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "experiments").glob("*/*.yaml"))


@pytest.mark.slow  # the grid script in processes
def test_the_grid_covers_every_method_setting_and_data_set():
    printed = subprocess.run([*GRID, "print"], cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(printed) == 6 * 4 * 3
    assert (
        len({line.split("--trainer.logger.init_args.save_dir ")[1].split()[0] + line.split()[3] for line in printed})
        == 72
    )
    for method in ("head", "bias", "adapter", "prompt", "lora", "full"):
        assert sum(f"configs/{method}.yaml" in line for line in printed) == 12
    for setting in ("n16-all-iid", "n16-all-dir0.1", "n64-m8-iid", "n64-m8-dir0.1"):
        assert sum(f"settings/{setting}.yaml" in line for line in printed) == 18
    with_dp = subprocess.run(
        [
            *GRID,
            "print",
            "--methods",
            "bias",
            "--datasets",
            "pcam",
            "--settings",
            "n64-m8-iid",
            "--dp",
            "none",
            "local",
            "central",
            "--",
            "--trainer.num_rounds",
            "5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert [("dp/local.yaml" in c, "dp/central.yaml" in c) for c in with_dp] == [
        (False, False),
        (True, False),
        (False, True),
    ]
    assert all(c.endswith("--trainer.num_rounds 5") for c in with_dp)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_experiment_overlay_composes_with_a_method_config(overlay, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    main(["comm", "--config", "configs/prompt.yaml", "--config", overlay])
    printed = capsys.readouterr().out
    assert "per client per direction" in printed
    if "settings/n16" in overlay:
        assert "per round (16 clients" in printed
    if "settings/n64" in overlay or "datasets" in overlay:
        assert "per round (8 clients" in printed
    if "dp/" in overlay:
        kind = {
            "local": "local DP-SGD",
            "central": "central DP-FedAvg",
            "adaptive": "adaptive clipping from S=0.1",
            "ftrl": "central DP-FTRL",
            "distributed": "distributed DP (discrete Gaussian shares",
        }[Path(overlay).stem]
        assert kind in printed
        assert "epsilon 5.0" in printed and "delta 0.001" in printed
    if "compression/int8" in overlay:
        assert "Int8" in printed


@pytest.mark.slow  # whole fits
def test_collect_tabulates_finished_runs(tmp_path):
    out = tmp_path / "grid"
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--trainer.num_rounds",
            "2",
            "--trainer.clients_per_round",
            "2",
            "--trainer.local_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(out / "digits" / "n16-all-iid"),
            "--trainer.logger.init_args.name",
            "prompt",
        ]
    )
    table = subprocess.run(
        [*GRID, "collect", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    ).stdout.splitlines()
    assert table[0].startswith("| dataset | setting | method |")
    row = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert row[:4] == ["digits", "n16-all-iid", "prompt", "2"]
    assert 0.0 < float(row[4]) <= 1.0 and float(row[5].replace(",", "")) > 0
