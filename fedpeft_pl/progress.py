"""A progress bar that counts a round's batches and names the client being trained."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override

from fedpeft_pl.federation import Round
from fedpeft_pl.hooks import FederatedCallback


class FederatedProgressBar(TQDMProgressBar, FederatedCallback):
    """Lightning's TQDM bar, one bar per round: ``Round 3/50 ... client 17 (2/8)``.

    The bars write to standard error, with fedpeft's round lines, so standard output stays clean
    for what a command prints (``fedpeft comm``) and ``fedpeft fit ... > out.txt`` holds no bar
    text. The trainer turns the bar on only where standard error is a terminal (or a notebook).

    Args:
        refresh_rate: update the bar every this many batches (0 disables it).
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._clients: list[int] = []
        self._pending = 0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        # the round's total is only known once its clients are sampled: see on_round_start
        pass

    @override
    def on_round_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round) -> None:
        if self.is_disabled:
            return
        self._clients = list(round.clients)
        self._pending = 0
        bar = self.train_progress_bar
        bar.reset(total=round.batches)
        bar.initial = 0
        bar.set_description(f"Round {round.number}/{trainer.max_epochs}")

    @override
    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round: Round, client: int) -> None:
        if self.is_disabled:
            return
        position = self._clients.index(client) + 1
        self.train_progress_bar.set_postfix_str(f"client {client} ({position}/{len(self._clients)})")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        if self.is_disabled:
            return
        bar = self.train_progress_bar
        self._pending += 1
        if self._pending >= self.refresh_rate or bar.n + self._pending >= (bar.total or 0):
            bar.update(self._pending)
            self._pending = 0

    # Lightning's bars name sys.stdout when they are made: make them while it is standard error
    @override
    def init_sanity_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_sanity_tqdm()

    @override
    def init_train_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    @override
    def init_validation_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    @override
    def init_test_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_test_tqdm()

    @override
    def init_predict_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_predict_tqdm()
