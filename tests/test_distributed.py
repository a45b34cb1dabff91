"""Multi-process simulation with Lightning's DDP strategy: two CPU processes (gloo) against one.

Each process trains its share of the sampled clients with its own copy of the one backbone; the
updates are gathered before the server aggregates, so both runs must end with the same global
state, the same server-side state (error-feedback residuals, server optimizer moments, privacy
accounting), the same per-client state (SCAFFOLD's and FedDyn's client tensors) and the same
logged bytes, and the two processes' console must say what one process says, no more. The
strategy is README's plain ``ddp``: fedpeft sets what a federated run needs of it (LoRA has buffers).
"""

import re
from pathlib import Path

import pytest
import torch
from test_cli import QUICKSTART, fedpeft, scalars

pytestmark = pytest.mark.slow  # every case starts two DDP processes

SHORT = [
    "--trainer.num_rounds",
    "2",
    "--trainer.clients_per_round",
    "3",
    "--trainer.local_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    # one runner for both runs, whatever auto would choose for one process or two
    "--trainer.client_runner",
    "sequential",
]
SETTINGS = {
    # LoRA (which has buffers) on the vectorised runner: each process trains its share stacked
    "lora-vectorized-int8-feedback-fedadam": [
        "--config",
        str(Path(QUICKSTART).parent / "quickstart" / "lora.yaml"),
        "--trainer.logger.init_args.name",
        "prompt",
        "--trainer.client_runner",
        "vectorized",
        "--trainer.compress_upload",
        "fedpeft_pl.compression.Int8",
        "--trainer.compress_upload.error_feedback",
        "true",
        "--trainer.aggregation",
        "fedpeft_pl.strategies.FedAdam",
        "--trainer.aggregation.lr",
        "0.05",
    ],
    "scaffold": ["--trainer.aggregation", "fedpeft_pl.strategies.Scaffold"],
    # FedDyn's per-client tensors and a personalised local head, plus per-client evaluation
    "feddyn-fedper": [
        "--config",
        str(Path(QUICKSTART).parent / "quickstart" / "personal" / "fedper.yaml"),
        "--trainer.logger.init_args.name",
        "prompt",
        "--trainer.aggregation",
        "fedpeft_pl.strategies.FedDyn",
        "--trainer.aggregation.alpha",
        "0.01",
    ],
    "local-dp": [
        "--trainer.privacy",
        "fedpeft_pl.privacy.LocalDP",
        "--trainer.privacy.epsilon",
        "8.0",
        "--trainer.privacy.max_grad_norm",
        "1.0",
        # secret noise differs between any two runs by design: compare the processes on reproducible noise
        "--trainer.privacy.reproducible_noise",
        "true",
    ],
}


def run(tmp_path: Path, name: str, *extra: str) -> tuple[dict, dict, str]:
    # one thread per process in both runs, so that their float sums agree to the last bit
    result = fedpeft(
        "fit",
        "--config",
        QUICKSTART,
        *SHORT,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / name),
        *extra,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / name / "prompt" / "version_0"
    console = re.sub(r"\d+(\.\d+)?", "N", result.stderr.replace(str(tmp_path / name), "RUN"))
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False), scalars(run_dir), console


def assert_same_rounds(logs: dict, reference: dict, rounds: int, tolerance: float = 1e-4) -> None:
    """Equal bytes and clients every round; metrics equal up to float noise."""
    assert logs.keys() == reference.keys()
    for tag in ("comm/bytes_down", "comm/bytes_up", "comm/cumulative_bytes", "round/clients_aggregated"):
        assert logs[tag] == reference[tag], tag
    per_client = ["clients/acc_mean", "clients/acc_p10", "clients/acc_std"] if "clients/acc_mean" in reference else []
    assert "server/acc" in reference
    # a private run logs no training loss (un-noised per-client statistics)
    for tag in [t for t in ("server/acc", "server/loss", "train/loss", *per_client) if t in reference]:
        assert [step for step, _ in logs[tag]] == list(range(1, rounds + 1)), tag
        for (_, value), (_, expected) in zip(logs[tag], reference[tag]):
            assert value == pytest.approx(expected, abs=tolerance), tag


def flat(value, prefix=""):
    """Every tensor and number in a nested checkpoint entry, by path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}/{i}").items()}
    return {prefix: value}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_two_ddp_processes_end_where_one_process_ends(tmp_path, setting):
    single, single_logs, single_console = run(tmp_path, "single", *SETTINGS[setting])
    multi, multi_logs, multi_console = run(
        tmp_path, "ddp", *SETTINGS[setting], "--trainer.strategy", "ddp", "--trainer.devices", "2"
    )
    # the same lines, numbers aside: no warning per process, nothing said twice
    assert multi_console.splitlines() == single_console.splitlines()
    if "vectorized" in setting:
        assert "vectorized (set in the config" in multi_console

    assert multi["global_step"] == single["global_step"]  # every process counts every client's steps
    assert single["state_dict"].keys() == multi["state_dict"].keys()
    for name, tensor in single["state_dict"].items():
        torch.testing.assert_close(multi["state_dict"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    # the server's own state: residuals of every client, optimizer moments, privacy histories
    server_single = flat({k: v for k, v in single["callbacks"].items() if "ProgressBar" not in k})
    server_multi = flat({k: v for k, v in multi["callbacks"].items() if "ProgressBar" not in k})
    assert server_single.keys() == server_multi.keys()
    assert len(server_single) > 1
    for key, value in server_single.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(server_multi[key], value, rtol=1e-4, atol=1e-5, msg=key)
        elif isinstance(value, float):
            assert server_multi[key] == pytest.approx(value, rel=1e-4), key
        elif "dirpath" not in key and "best" not in key and "last_model_path" not in key and "kth" not in key:
            assert server_multi[key] == value, key
    # every client's own state (SCAFFOLD's and FedDyn's per-client tensors), merged from both processes
    clients_single = flat(single["loops"]["fit_loop"]["state_dict"]["client_states"])
    clients_multi = flat(multi["loops"]["fit_loop"]["state_dict"]["client_states"])
    assert clients_single.keys() == clients_multi.keys()
    if setting in ("scaffold", "feddyn-fedper"):
        assert clients_single
    for key, value in clients_single.items():
        torch.testing.assert_close(clients_multi[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert_same_rounds(multi_logs, single_logs, rounds=2)
