"""The paper's communication table, produced by ``fedpeft comm`` on the shipped method configs.

    python benchmarks/comm_table.py        # writes benchmarks/results/communication.md

ViT-B/16 with a 100-class head, fp32, m=8 clients a round, 50 rounds (configs/<method>.yaml). No
weights are downloaded: ``fedpeft comm`` builds the architecture and counts the tensors that travel.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from fedpeft_pl.peft import METHOD_NAMES

REPO = Path(__file__).resolve().parents[1]
METHODS = ["full", *(m for m in METHOD_NAMES if m != "full")]  # the baseline first
MIB = 2**20


def comm(method: str) -> dict[str, str]:
    command = [sys.executable, "-m", "fedpeft_pl.cli", "comm", "--config", f"configs/{method}.yaml"]
    printed = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in printed.splitlines():
        match = re.match(r"(\S.*?)\s{2,}(\S.*)$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def number(text: str) -> int:
    return int(text.split()[0].replace(",", ""))


def main() -> None:
    lines = [
        "ViT-B/16 (`vit_base_patch16_224.augreg_in21k`), 100 classes, fp32, m=8, 50 rounds, both directions.",
        "",
        "Command: `python benchmarks/comm_table.py` (one `fedpeft comm --config configs/<method>.yaml` per row)",
        "",
        "| method | trainable parameters | MiB per client per direction | MB per round (m=8, both directions) "
        "| MB for 50 rounds | fewer bytes than Full |",
        "|---|---|---|---|---|---|",
    ]
    full = None
    for method in METHODS:
        rows = comm(method)
        client = number(rows["per client per direction"])
        full = full or client
        lines.append(
            f"| {rows['method'].split('(')[0]} | {number(rows['trainable parameters']):,} | {client / MIB:.3f} | "
            f"{number(rows['per round (8 clients, both directions)']) / 1e6:,.2f} | "
            f"{number(rows['whole run (50 rounds)']) / 1e6:,.1f} | {full / client:,.1f}x |"
        )
    table = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results" / "communication.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
