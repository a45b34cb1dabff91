"""A server-side probe for the secure aggregation test: records every result the server is handed."""

from pathlib import Path

import torch

from fedpeft_pl.hooks import FederatedCallback


class RecordResults(FederatedCallback):
    """Saves each round's successful client results (client, samples, aggregate_of, payload) to
    ``<log_dir>/results.pt``."""

    def __init__(self) -> None:
        self.results = []

    def on_client_end(self, trainer, pl_module, round, result) -> None:
        payload = {k: v.detach().cpu().clone() for k, v in result.payload.items()}
        self.results.append((round.number, result.client, result.num_samples, tuple(result.aggregate_of), payload))
        torch.save(self.results, Path(trainer.log_dir) / "results.pt")
