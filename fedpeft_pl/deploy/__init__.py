"""Deployment across machines with Flower.

- ``writer.py``: ``fedpeft flower-app``, the app directory (needs no Flower).
- ``secure_aggregation.py``: the SecAgg+ settings and what they compose with (needs no Flower).
- ``flower.py``: the :class:`~fedpeft_pl.deploy.flower.FlowerRunner` (the ServerApp's client runner)
  and the ClientApp's message handlers.
- ``secagg.py``: the same rounds through Flower's SecAgg+.
- ``apps.py``: the ServerApp and ClientApp that an app directory runs.

A plain ``fedpeft fit`` imports nothing from here; ``flower.py``, ``secagg.py`` and ``apps.py`` need
Flower (``pip install "fedpeft-pl[flower]"``).
"""
