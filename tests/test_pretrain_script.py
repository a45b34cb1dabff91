"""scripts/pretrain_tiny_vit.py reproduces its output for a seed, and the output loads as a backbone."""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from fedpeft_pl import Backbone

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "fedpeft_pl" / "assets" / "vit_pico_mnist.safetensors"


def pretrain(output: Path, seed: int) -> tuple[dict, dict]:
    """The tensors and metadata the script writes (safetensors orders metadata keys arbitrarily on disk)."""
    subprocess.run(
        [sys.executable, "scripts/pretrain_tiny_vit.py", "--epochs", "1", "--seed", str(seed), "--output", str(output)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=600,
    )
    with safe_open(str(output), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


@pytest.mark.slow  # processes: whole fits through the console script
def test_the_same_seed_gives_the_same_weights(tmp_path):
    (first, first_meta), (second, second_meta) = (pretrain(tmp_path / f"{n}.safetensors", seed=3) for n in "ab")
    assert first_meta == second_meta
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    other, _ = pretrain(tmp_path / "c.safetensors", seed=4)
    assert not all((first[k] == other[k]).all() for k in first)


def test_the_shipped_backbone_is_small_headless_and_loads():
    assert SHIPPED.stat().st_size <= 5 * 2**20
    with safe_open(str(SHIPPED), "pt") as handle:
        assert not [k for k in handle.keys() if k.startswith("head.")]
        assert "MNIST" in handle.metadata()["pretraining"]
    backbone = Backbone(
        "vit_tiny_patch16_224",
        weights_file=str(SHIPPED),
        img_size=32,
        kwargs={"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4},
    )
    model = backbone.build(10)
    backbone.load_weights(model)
    with safe_open(str(SHIPPED), "pt") as handle:
        assert (model.state_dict()["blocks.3.mlp.fc2.weight"] == handle.get_tensor("blocks.3.mlp.fc2.weight")).all()


@pytest.mark.parametrize("kwargs", [{"embed_dim": 96}, {"depth": 6}])
def test_the_shipped_backbone_refuses_another_shape(kwargs):
    from fedpeft_pl import ConfigError

    backbone = Backbone(
        "vit_tiny_patch16_224",
        weights_file=str(SHIPPED),
        img_size=32,
        kwargs={"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, **kwargs},
    )
    with pytest.raises(ConfigError, match="does not fit"):
        backbone.load_weights(backbone.build(10))
