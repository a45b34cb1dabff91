"""A probe for the deployment fault test: the simulation it is compared with leaves out the clients
that the deployment lost, as if they had dropped out."""

import os

from fedpeft_pl.hooks import ClientDropped, FederatedCallback


class DropClients(FederatedCallback):
    """Keeps ``client`` out of ``round`` for each ``round:client`` in ``FEDPEFT_TEST_DROP`` (comma-separated);
    does nothing where the variable is unset (the deployed server)."""

    def on_client_start(self, trainer, pl_module, round, client) -> None:
        pairs = [p.split(":") for p in os.environ.get("FEDPEFT_TEST_DROP", "").split(",") if p]
        if (round.number, client) in {(int(r), int(c)) for r, c in pairs}:
            raise ClientDropped("lost by the test")
