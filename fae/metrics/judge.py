"""A small CNN classifier trained on real images, to score class-conditional samples by class agreement: the share
of generated images that the classifier assigns to the class they were conditioned on.

    clf = train_classifier(DataConfig(kind="fashion_mnist", image_size=32), "runs/classifier")   # cached
    agreement = class_agreement(clf, samples["arr_0"], samples["labels"])

The classifier sees images exactly as the data pipeline produces them (same size, crop and fit). `channels`: "grey"
(images averaged to one channel: it judges shape, not colour; the default for Fashion-MNIST, which is grey) or
"colour" (RGB; the default for image folders, whose classes may differ in colour). On Fashion-MNIST it reaches
about 91-92% test accuracy after 3 epochs (CPU, ~1 min). Any labelled data set works (`fae train judge`); one without a
test split is scored on a held-out share of its training images (every `HOLDOUT_EVERY`-th, so every class keeps
its share).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fae.config import ConfigError, to_dict
from fae.io import PretrainedMixin, atomic_write_text, read_bundle_config
from fae.precision import strict_fp32


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    width: int = 32
    in_channels: int = 1               # 1: images are averaged to grey; 3: colour (RGB)

    def validate(self) -> None:
        if self.num_classes < 2 or self.width < 2:
            raise ValueError("num_classes must be >= 2 and width >= 2")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey) or 3 (colour), not {self.in_channels}")


Channels = Literal["grey", "colour"]
IN_CHANNELS: dict[str, int] = {"grey": 1, "colour": 3}
HOLDOUT_EVERY = 10   # a data set without a test split: every 10th training image (in file order) is held out


class SmallCNN(nn.Module, PretrainedMixin):
    """conv-pool, conv-pool, conv, adaptive pool to 4x4, MLP head: any input size >= 4 px. The head sees where
    features are (not only their average), which Fashion-MNIST's shape-defined classes need; the early pooling keeps
    training to about half a minute per 60k-image epoch on two CPU cores."""

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        w = config.width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(config.in_channels, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                      block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(4 * w * 16, 128), nn.ReLU(),
                                  nn.Linear(128, config.num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> logits (B, num_classes)."""
        x = images.float().mean(1, keepdim=True) if self.config.in_channels == 1 else images.float()
        return self.head(self.features(2 * x - 1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor | np.ndarray, batch_size: int = 500) -> torch.Tensor:
        """Class ids for float (B,3,H,W) images in [0,1] or uint8 (B,H,W,3) arrays."""
        self.eval()
        x = _as_float_images(images)
        device = next(self.parameters()).device
        with strict_fp32():  # a metric network: no TF32, whatever a training run in this process set
            return torch.cat([self(x[i:i + batch_size].to(device)).argmax(1).cpu()
                              for i in range(0, len(x), batch_size)])


def _as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B,H,W,3), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 255
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be (B,3,H,W) in [0,1], got {tuple(images.shape)}")
    return images.float()


def _stack(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every readable item of `dataset` (unreadable files are left out, fae.data.readable)."""
    from fae.data.readable import readable_batches

    batches = list(readable_batches(dataset, 256))
    if not batches:
        raise ConfigError(f"{getattr(dataset, 'root', 'the data set')}: no readable images")
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


def default_channels(data: Any) -> Channels:
    """Grey for Fashion-MNIST (grey images), colour for everything else."""
    return "grey" if data.kind == "fashion_mnist" else "colour"


def _splits(data: Any, train_limit: int | None) -> tuple[Any, Any, str, list[str] | None]:
    """(train, test, where the test images come from, class names): the data set's test split, or for an image
    folder without one every HOLDOUT_EVERY-th training image (the rest train)."""
    from dataclasses import replace

    from torch.utils.data import Subset

    from fae.data import build_dataset

    train = build_dataset(replace(data, hflip=False, limit=train_limit), "train")
    names = getattr(train, "class_names", None)
    try:
        test = build_dataset(replace(data, hflip=False, limit=None), "test")
    except FileNotFoundError:
        if data.kind != "image_folder":
            raise
        full = build_dataset(replace(data, hflip=False, limit=None), "train")
        n = len(full)  # type: ignore[arg-type]  # every fae data set has a length
        held = [i for i in range(n) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
        kept = [i for i in range(n) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
        if train_limit is not None and train_limit < len(kept):
            kept = [kept[i * len(kept) // train_limit] for i in range(train_limit)]
        return Subset(full, kept), Subset(full, held), f"held out: every {HOLDOUT_EVERY}th training image", names
    test_names = getattr(test, "class_names", None)
    if names is not None and test_names is not None and names != test_names:
        raise ConfigError(f"{data.root}: the train and test splits have different classes ({names} vs {test_names}); "
                          "a judge needs the same class folders in both")
    return train, test, "test", names


def train_classifier(data: Any, out_dir: str | Path, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, width: int = 32, device: str = "cpu", progress: bool = True,
                     train_limit: int | None = None, channels: Channels | None = None) -> SmallCNN:
    """Train on the train split of `data` (a DataConfig) and save to `out_dir`; a saved classifier for the same
    data and settings is loaded instead. `channels`: grey or colour (default: `default_channels(data)`). The test
    accuracy, where the test images came from, their number and the class names are recorded in the bundle."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    channels = channels or default_channels(data)
    if channels not in IN_CHANNELS:
        raise ConfigError(f"channels must be grey or colour, not {channels!r}")
    out = Path(out_dir)
    key = {"data": to_dict(replace(data, hflip=False, limit=None)), "epochs": epochs, "batch_size": batch_size,
           "lr": lr, "seed": seed, "width": width, "train_limit": train_limit, "channels": channels}
    if (out / "config.json").is_file() and read_bundle_config(out).get("key") == key:
        return SmallCNN.from_pretrained(out, map_location=device).eval()
    train, test, test_split, class_names = _splits(data, train_limit)
    train_x, train_y = _stack(train)
    test_x, test_y = _stack(test)
    num_classes = len(class_names) if class_names else int(train_y.max()) + 1
    if num_classes < 2:
        raise ConfigError(f"{data.root or data.kind}: a judge needs at least two classes (one sub-folder per class)")
    if len(train_x) < batch_size:
        batch_size = len(train_x)   # a small folder: one batch per epoch rather than none
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(ClassifierConfig(num_classes=num_classes, width=width,
                                          in_channels=IN_CHANNELS[channels])).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * (len(train_x) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        bar = tqdm(total=steps, desc="classifier", disable=not progress)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(train_x), generator=g)
            for i in range(len(train_x) // batch_size):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                x = train_x[idx]
                flip = torch.rand(len(idx), generator=g) < 0.5       # flips are label-preserving here
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
                loss = F.cross_entropy(model(x.to(device)), train_y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
        bar.close()
    accuracy = float((model.predict(test_x) == test_y).float().mean())
    model.save_pretrained(out, extra={"key": key, "test_accuracy": accuracy, "test_split": test_split,
                                      "test_images": len(test_y), "image_size": data.image_size,
                                      "class_names": class_names})
    return model.eval()


def class_agreement(classifier: SmallCNN, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                    ) -> dict[str, Any]:
    """Share of images classified as their conditioning label, overall and per class."""
    labels = torch.as_tensor(np.asarray(labels)).long()
    pred = classifier.predict(images)
    hit = (pred == labels).float()
    per_class = {int(k): float(hit[labels == k].mean()) for k in labels.unique()}
    return {"agreement": float(hit.mean()), "per_class": per_class, "num_images": int(len(labels))}


def caption_agreement(features: torch.Tensor, prompts: list[str], reference: torch.Tensor, captions: list[str],
                      k: int = 5) -> dict[str, Any]:
    """Text-image agreement without a downloaded judge: does the nearest real image (cosine similarity in a frozen
    encoder's feature space) to each generated image carry that image's prompt as its caption?

    `features` (N, ...) of the generated images, `prompts[i]` the prompt of image i; `reference` (M, ...) features
    of the real images with `captions[j]`. Returns top-1 and top-k hit rates and their chance levels (a random
    real image, or k of them, carrying the prompt), overall and per prompt."""
    if len(prompts) != features.shape[0] or len(captions) != reference.shape[0]:
        raise ValueError(f"{features.shape[0]} generated images with {len(prompts)} prompts, {reference.shape[0]} "
                         f"real images with {len(captions)} captions: one each")
    a = F.normalize(features.flatten(1).float(), dim=1)
    b = F.normalize(reference.flatten(1).float(), dim=1)
    nearest = (a @ b.T).topk(min(k, b.shape[0]), dim=1).indices.tolist()
    hits = np.array([[captions[j] == p for j in row] for row, p in zip(nearest, prompts, strict=True)])
    share = {p: sum(c == p for c in captions) / len(captions) for p in set(prompts)}
    per_prompt = {p: float(hits[[q == p for q in prompts], 0].mean()) for p in dict.fromkeys(prompts)}
    return {"top1": float(hits[:, 0].mean()), f"top{k}": float(hits.any(1).mean()),
            "chance_top1": float(np.mean([share[p] for p in prompts])),
            f"chance_top{k}": float(np.mean([1 - (1 - share[p]) ** k for p in prompts])),
            "per_prompt_top1": per_prompt, "nearest_captions": [captions[row[0]] for row in nearest]}


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    atomic_write_text(Path(path), json.dumps(report, indent=2))
