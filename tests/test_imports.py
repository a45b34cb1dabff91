"""The import budget of the ``fedpeft`` command: which heavy libraries each answer loads.

``fedpeft --help`` answers before torch would have finished importing; a library a command does
not use costs every user of it seconds of start-up (benchmarks/README.md, "Start-up"). Each case
runs the command in a fresh process, as ``python -m fedpeft_pl.cli`` runs it, and reads that
process's ``sys.modules`` afterwards.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

HEAVY = {"torch", "lightning", "timm", "torchvision", "torchmetrics", "transformers", "flwr", "opacus", "peft"}
HEAVY |= {"sklearn", "pandas", "matplotlib", "datasets", "jsonargparse", "numpy"}

# what the command ran, and the top-level packages it had loaded when it ended
PROBE = """
import gc, json, runpy, sys
*argv, out = sys.argv[1:]
sys.argv = ["fedpeft", *argv]
code = 0
try:
    runpy.run_module("fedpeft_pl.cli", run_name="__main__", alter_sys=True)
except SystemExit as done:
    code = done.code
loaded = sorted({name.split(".")[0] for name in sys.modules})
with open(out, "w") as file:
    json.dump({"exit": code, "loaded": loaded, "frozen": gc.get_freeze_count(), "collecting": gc.isenabled()}, file)
"""


def run(tmp_path, *args, code=PROBE):
    """``python -m fedpeft_pl.cli *args`` in a fresh process of this checkout: exit status, output, heavy modules
    (and, in ``run.last``, everything the probe wrote)."""
    out = tmp_path / "probe.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", code, *args, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    run.last = result
    return result["exit"], done.stdout + done.stderr, HEAVY & set(result["loaded"])


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--help"], 0, "subcommands:"),
        ([], 2, "usage: fedpeft"),
        (["bogus"], 2, "fedpeft: error: unknown command 'bogus'"),
        (["flower-app"], 2, "usage: fedpeft flower-app DIR"),
        (["flower-app", "--help"], 0, "usage: fedpeft flower-app DIR"),
        (["worker", "--help"], 0, "usage: fedpeft worker --config"),
        (["worker"], 2, "usage: fedpeft worker --config"),
        (["worker", "--config", "no-such.yaml", "--socket", "x.sock"], 2, "fedpeft: error: --config no-such.yaml"),
    ],
)
def test_help_usage_and_a_mistaken_command_load_no_heavy_library(tmp_path, args, status, says):
    exit_status, output, heavy = run(tmp_path, *args)
    assert exit_status == status and says in output, output[-3000:]
    assert heavy == set(), heavy


@pytest.mark.slow  # a process that imports torch, Lightning and Flower
def test_comm_loads_what_sizing_the_model_needs_and_nothing_a_fit_alone_uses(tmp_path):
    exit_status, output, heavy = run(tmp_path, "comm", "--config", "configs/quickstart.yaml")
    assert exit_status == 0 and "per client per direction" in output, output[-3000:]
    assert {"torch", "timm", "flwr", "jsonargparse"} <= heavy  # the model, built to count its tensors; Flower's wire
    # bytes; the config, parsed as a fit parses it. Lightning (with torchmetrics, and transformers, which
    # torchmetrics loads where it is installed) builds a fit's trainer and module, never comm's
    # (fedpeft_pl.comm_command); local DP (opacus), Hugging Face peft (HFPeft) and the data set's own libraries
    # are a fit's alone
    assert not heavy & {"lightning", "torchmetrics", "transformers", "opacus", "peft", "sklearn", "pandas", "datasets"}
    assert "lightning_utilities" not in run.last["loaded"], heavy
    # what the import built is kept out of the garbage collector's way, which collects again afterwards
    assert run.last["frozen"] > 100_000 and run.last["collecting"], run.last["frozen"]


@pytest.mark.slow  # processes that import torch and Lightning
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["fit", "--help"], "--trainer.num_rounds"),
        (["flower-app", "{tmp}/app", "--config", "configs/quickstart.yaml"], "wrote the Flower app"),
    ],
)
def test_a_fits_help_and_writing_a_flower_app_load_no_library_only_a_run_uses(tmp_path, args, says):
    """Both read the config's signatures (Lightning, timm, torch); neither trains, deploys or reads data."""
    exit_status, output, heavy = run(tmp_path, *(a.format(tmp=tmp_path) for a in args))
    assert exit_status in (0, None) and says in output, output[-3000:]
    assert {"torch", "lightning", "jsonargparse"} <= heavy, heavy
    assert not heavy & {"flwr", "opacus", "peft", "sklearn", "pandas", "datasets"}, heavy


def test_main_called_from_python_leaves_the_callers_garbage_collector_alone(capsys):
    """Only the command's own process freezes what the import built; a caller's objects stay collectable."""
    import gc

    from fedpeft_pl.cli import main

    frozen = gc.get_freeze_count()
    main(["comm", "--config", str(REPO / "configs" / "quickstart.yaml")])
    assert "per client per direction" in capsys.readouterr().out
    assert gc.get_freeze_count() == frozen and gc.isenabled()


PUBLIC_NAMES = """
import json, sys
from fedpeft_pl import ConfigError, FedAvg, Federation, Strategy
with open(sys.argv[-1], "w") as file:
    json.dump({"exit": 0, "loaded": sorted({name.split(".")[0] for name in sys.modules})}, file)
"""


def test_the_package_loads_a_public_name_with_its_own_module_only(tmp_path):
    """``from fedpeft_pl import FedAvg`` loads the strategies (torch), not Lightning."""
    _, output, heavy = run(tmp_path, code=PUBLIC_NAMES)
    assert "torch" in heavy, output[-3000:]
    assert not heavy & {"lightning", "timm", "torchmetrics", "transformers", "flwr"}, heavy


def test_every_public_name_resolves():
    import fedpeft_pl

    assert set(fedpeft_pl._WHERE) == set(fedpeft_pl.__all__)
    for name in fedpeft_pl.__all__:
        value = getattr(fedpeft_pl, name)
        assert value.__name__ == name, name
    with pytest.raises(AttributeError):
        fedpeft_pl.NoSuchName  # noqa: B018
