"""Wire bytes: the size of the messages as Flower serialises them, beside the tensor-element bytes."""

import csv

import pytest
import torch
from helpers import tiny_datamodule, tiny_module, tiny_trainer
from lightning.pytorch.loggers import CSVLogger

from fedpeft_pl import ClientAvailability, payload_bytes
from fedpeft_pl.compression import Float16, Int8
from fedpeft_pl.loop import sample_clients
from fedpeft_pl.peft import LoRA, Prompt, trainable_state

pytest.importorskip("flwr", reason='wire bytes are measured with Flower: pip install -e ".[flower]"')


def test_wire_bytes_are_the_bytes_flower_serialises_and_inflates_back():
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedpeft_pl.comm import reply_content, train_content, wire_bytes

    payload = Int8().encode({"a": torch.randn(300), "b": torch.randn(4, 5)})
    content = train_content(payload, {"proximal_mu": 0.1}, server_round=3, client=2, max_batches=7, version=2)
    objects = get_all_nested_objects(content)
    serialised = {object_id: obj.deflate() for object_id, obj in objects.items()}
    assert wire_bytes(content) == sum(len(b) for b in serialised.values())
    again = inflate_object_from_contents(content.object_id, dict(serialised))  # what a receiver rebuilds
    arrays = again["arrays"].to_torch_state_dict()
    assert all(torch.equal(arrays[k], v) for k, v in payload.items())
    assert dict(again["config"]) == {
        "proximal_mu": 0.1,
        "fedpeft.server-round": 3,
        "fedpeft.client": 2,
        "fedpeft.max-batches": 7,
        "fedpeft.version": 2,
    }
    # headers, per-array metadata and the config make the message larger than its tensors
    assert wire_bytes(content) > payload_bytes(payload)
    reply = reply_content(payload, num_examples=100, metrics={"steps": 4.0})  # a private run's client: no loss
    assert "train_loss" not in reply["metrics"]
    assert wire_bytes(reply_content(payload, 100, {"train_loss": 1.5, "steps": 20})) == wire_bytes(
        reply_content(payload, 100, {"train_loss": 1e9, "steps": 3})
    )


def test_the_counter_counts_each_reply_as_flower_serialises_it(monkeypatch):
    """Replies are counted without serialising each update again, yet byte for byte as Flower does."""
    from flwr.app.message import array

    from fedpeft_pl.comm import WireCounter, reply_content, wire_bytes

    torch.manual_seed(0)
    monkeypatch.setattr(array, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 4096)  # chunks within reach
    replies = [
        ({"a": torch.randn(30, 4), "b": torch.randn(4)}, 17, {"steps": 2.0, "train_loss": 0.5}, {}),
        ({"a": torch.randn(30, 4), "b": torch.randn(4)}, 123456, {"steps": 9.0}, {}),  # same layout, other values
        ({"a": torch.zeros(30, 4), "b": torch.zeros(30, 4)}, 5, {"steps": 1.0}, {}),  # two equal arrays: sent once
        ({"big": torch.zeros(5000)}, 8, {"steps": 1.0}, {}),  # chunks that repeat: sent once
        ({"big": torch.randn(5000)}, 8, {"steps": 1.0}, {}),
        ({"a": torch.randn(30, 4)}, 3, {"steps": 1.0}, {"c": torch.randn(2)}),  # extras
        ({"a": torch.randn(30, 4).half()}, 3, {"steps": 1.0}, {}),
    ]
    counter = WireCounter()
    counter.start_round({"a": torch.zeros(1)})
    expected = 0
    for payload, num_examples, metrics, extras in replies:
        before = counter.bytes["up"]
        counter.upload(payload, num_examples, metrics, extras)
        size = wire_bytes(reply_content(payload, num_examples, metrics, extras))
        assert counter.bytes["up"] - before == size
        expected += size
    assert counter.bytes["up"] == expected
    # the repeated objects really are sent once
    assert wire_bytes(reply_content(*replies[2][:3])) < wire_bytes(reply_content(*replies[1][:3])) + 30 * 4 * 4


def fit(tmp_path, module=None, num_rounds=2, **kwargs):
    torch.manual_seed(0)
    module = module if module is not None else tiny_module(Prompt(num_tokens=2))
    datamodule = tiny_datamodule(num_clients=4, batch_size=64)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = tiny_trainer(tmp_path, num_rounds=num_rounds, clients_per_round=3, logger=logger, **kwargs)
    trainer.fit(module, datamodule=datamodule)
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("comm/bytes_up")]
    return trainer, module, datamodule, rows


def test_a_simulation_logs_the_wire_bytes_of_the_messages_a_deployment_would_send(tmp_path):
    from fedpeft_pl.comm import reply_content, train_content, wire_bytes

    availability = ClientAvailability(dropout=0.4)
    _trainer, module, datamodule, rows = fit(
        tmp_path, compress_upload=Int8(), compress_download=Float16(), availability=availability
    )
    state = trainable_state(module)
    down_payload = Float16().encode(state)
    up_payload = Int8().encode(state)  # same names, shapes and dtypes as every upload
    for server_round, row in zip((1, 2), rows):
        sent = []
        for client in sample_clients(0, server_round, 4, 3):
            plan = availability.plan(0, server_round, client, datamodule.client_num_batches(client))
            if not plan.dropped:
                sent.append((client, plan.batches))
        down = sum(wire_bytes(train_content(down_payload, {}, server_round, c, b)) for c, b in sent)
        up = sum(
            wire_bytes(reply_content(up_payload, datamodule.client_num_samples(c), {"train_loss": 0.0, "steps": 0.0}))
            for c, _ in sent
        )
        # a dropped client is sent nothing, in both units, as in a deployment
        assert float(row["comm/bytes_down"]) == len(sent) * payload_bytes(down_payload)
        assert float(row["comm/wire_bytes_down"]) == down
        assert float(row["comm/wire_bytes_up"]) == up
        assert float(row["comm/bytes_up"]) == len(sent) * payload_bytes(up_payload)
    assert any(float(r["round/clients_dropped"]) for r in rows), "seed 0 drops a client in two rounds"


def test_comm_shows_payload_and_wire_bytes(capsys):
    from fedpeft_pl.comm import communication_report

    module = tiny_module(Prompt(num_tokens=2))
    report = communication_report(module, clients_per_round=2, num_rounds=3, upload=Int8())
    assert report.upload_wire_bytes > report.upload_bytes and report.download_wire_bytes > report.download_bytes
    text = report.format()
    assert "wire" in text and f"{report.upload_wire_bytes:,}" in text


@pytest.mark.slow  # a LoRA fit: about 30 s on a loaded 2-core machine
def test_comm_predicts_the_wire_bytes_a_lora_run_logs(tmp_path):
    """Round 1 sends LoRA's equal zero B factors once; later rounds send every trained array."""
    from fedpeft_pl.comm import communication_report

    module = tiny_module(LoRA(rank=4))
    report = communication_report(module, clients_per_round=3, num_rounds=2)
    *_, rows = fit(tmp_path, module=module, num_rounds=2)
    down = [float(r["comm/wire_bytes_down"]) for r in rows]
    up = [float(r["comm/wire_bytes_up"]) for r in rows]
    assert report.run_wire_bytes == pytest.approx(sum(down) + sum(up), rel=0.02)
    # what deduplication saves, said apart, is what the run's first download saved (ids are varints)
    assert report.first_round_savings > 0
    assert down[1] - down[0] == pytest.approx(3 * report.first_round_savings, abs=3 * 8)
    assert down[1] == pytest.approx(3 * report.download_wire_bytes, abs=3 * 8)
    assert up[0] == pytest.approx(3 * report.upload_wire_bytes, abs=3 * 8)
    assert "round 1 deduplication" in report.format() and f"{report.first_round_savings:,}" in report.format()
