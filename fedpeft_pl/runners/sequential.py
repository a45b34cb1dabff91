"""The in-process runner: a process's clients one after another through Lightning's epoch loop."""

from __future__ import annotations

from collections.abc import Iterator

from fedpeft_pl.exchange import LOCAL
from fedpeft_pl.federation import ClientEvaluation, ClientResult, Round
from fedpeft_pl.peft import load_trainable_state, local_names, trainable_state
from fedpeft_pl.runners.base import ClientExecutor, RunnerHost, client_metrics

__all__ = ["SequentialRunner"]


class SequentialRunner:
    """The in-process runner: the clients of this process's share, one after another, in one module.

    The module's trainable tensors are swapped in place per client (the backbone exists once),
    each client trains with Lightning's epoch loop, and its result is yielded as soon as it is
    done, so ``on_client_end`` sees the client's trained state in the module.
    """

    def __init__(self, loop: RunnerHost) -> None:
        self.loop = loop

    def run(self, round: Round) -> Iterator[ClientResult]:
        """Train the round's clients one after another through Lightning's epoch loop; one result each."""
        loop = self.loop
        context = loop.context
        module = context.module
        datamodule = context.datamodule
        # the module holds the global state and, for a personalised method, the initial local part
        executor = ClientExecutor(loop, module)
        for client in round.share:
            session = executor.start(round, client)
            if isinstance(session, ClientResult):
                yield session
                continue
            session.load_into(module)
            module.begin_client(session)
            try:
                with loop.no_gradient_sync():
                    loop.train_local(round.number, client, round.plans[client].batches, session)
                result = executor.finish(
                    session,
                    trainable_state(module),
                    datamodule.client_num_samples(client),
                    client_metrics(context.releases_client_statistics, module),
                )
            except Exception as error:  # one client's failure must not end the run
                result = ClientResult(client, error=error)
            finally:
                module.end_client()
                executor.reset_local()
            yield result

    def evaluate(self, round: Round, clients: list[int]) -> Iterator[ClientEvaluation]:
        """Each client's model (the global state plus its own local part, if any) on its own test split."""
        loop = self.loop
        context = loop.context
        module = context.module
        datamodule = context.datamodule
        start = trainable_state(module)
        local_init = {n: t for n, t in start.items() if n in local_names(module)}
        try:
            for client in clients:
                if local_init:
                    own = loop.client_states.get(client)
                    load_trainable_state(
                        module, {n: own.get(LOCAL + n, t) for n, t in local_init.items()}, partial=True
                    )
                count, metrics = module.evaluate_on(
                    datamodule.client_test_dataloader(client), context.forward_context()
                )
                yield ClientEvaluation(client, count, metrics)
        finally:
            load_trainable_state(module, start)
