"""Linear probing of frozen inputs (paper Table 1: raw encoder features x vs reconstructed x̂ vs latents z).

Protocol, after DINOv2's linear evaluation (dinov2/eval/linear.py): a grid of linear classifiers, one per
(pooling, learning rate), trained *in parallel* on the same frozen inputs (each pooling's learning rates are one
batched linear layer, (L, D, K)), SGD with momentum 0.9 and a cosine schedule, no weight decay, zero init; the
best grid point is picked on a held-out split of the training set (`val_fraction`, seeded) and its top-1 on the
test set is reported. Inputs are tokens (N, T, D) (features x, x̂) or latents (N, C, h, w) (read as h*w tokens of
C channels). Poolings: `mean` (mean token), `mean_max` (concatenated mean and max token) and `flatten` (all tokens
concatenated; only when T*D <= max_flatten_dim). Inputs are standardised per dimension with training-split
statistics (`standardize=True`), so one learning-rate grid fits features and latents of any scale.

Difference to the paper: DINOv2's released heads read concat(CLS, mean patch token). FAE reconstructs only patch
tokens, so there is no CLS for x̂ (fae-paper.md open question 16); we train fresh heads on patch-token poolings for
all three inputs instead of reusing DINOv2's head, which keeps the comparison like for like.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fae.config import ConfigError
from fae.data.readable import readable_batches
from fae.precision import strict_fp32

if TYPE_CHECKING:
    from fae.models.autoencoder import FeatureAutoEncoder

POOLINGS = ("mean", "mean_max", "flatten")


@dataclass
class ProbeConfig:
    learning_rates: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
    poolings: tuple[str, ...] = POOLINGS
    epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    val_fraction: float = 0.1
    standardize: bool = True
    max_flatten_dim: int = 16384
    seed: int = 0

    def validate(self) -> None:
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError("probe learning_rates must be a non-empty list of positive numbers")
        bad = [p for p in self.poolings if p not in POOLINGS]
        if bad or not self.poolings:
            raise ValueError(f"probe poolings must be a non-empty subset of {list(POOLINGS)}, "
                             f"got {list(self.poolings)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("probe epochs and batch_size must be positive")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"probe val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class ProbeResult:
    top1: float                       # test top-1 of the grid point picked on the validation split
    best_pooling: str
    best_lr: float
    val_top1: float
    grid: list[dict[str, Any]] = field(default_factory=list)   # every (pooling, lr) with its val top-1
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    num_classes: int = 0
    input_shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, T, D) tokens stay; (N, C, h, w) latents -> (N, h*w, C)."""
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    raise ValueError(f"probe inputs must be tokens (N, T, D) or latents (N, C, h, w), got shape {tuple(x.shape)}")


def pool(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "mean":
        return tokens.mean(1)
    if pooling == "mean_max":
        return torch.cat([tokens.mean(1), tokens.amax(1)], dim=1)
    if pooling == "flatten":
        return tokens.flatten(1)
    raise ValueError(f"unknown pooling {pooling!r}; choose from {list(POOLINGS)}")


def pooled_inputs(x: torch.Tensor, poolings: tuple[str, ...] | list[str] = POOLINGS,
                  max_flatten_dim: int = 16384) -> dict[str, torch.Tensor]:
    """Tokens (N, T, D) or latents (N, C, h, w) -> {pooling: (N, d)} for every usable pooling (float32, CPU).

    Pool batch by batch with this to probe data sets whose full token tensors would not fit in memory.
    """
    tokens = as_tokens(x.detach().float().cpu())
    flat_ok = tokens.shape[1] * tokens.shape[2] <= max_flatten_dim
    return {p: pool(tokens, p) for p in poolings if p != "flatten" or flat_ok}


def _train_heads(x: torch.Tensor, y: torch.Tensor, lrs: torch.Tensor, num_classes: int, cfg: ProbeConfig,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Train len(lrs) linear heads on the same data at once; returns weights (L, D, K) and biases (L, K)."""
    n, d = x.shape
    heads = lrs.shape[0]
    w = torch.zeros(heads, d, num_classes, requires_grad=True)
    b = torch.zeros(heads, num_classes, requires_grad=True)
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            logits = torch.einsum("nd,ldk->lnk", x[idx], w) + b[:, None, :]
            # sum over heads of each head's mean cross-entropy: every head gets exactly its own gradient
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(heads), reduction="sum") / idx.numel()
            gw, gb = torch.autograd.grad(loss, (w, b))
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine to 0
            with torch.no_grad():
                buf_w.mul_(cfg.momentum).add_(gw)
                buf_b.mul_(cfg.momentum).add_(gb)
                w -= (lrs * scale)[:, None, None] * buf_w
                b -= (lrs * scale)[:, None] * buf_b
            step += 1
    return w.detach(), b.detach()


@torch.no_grad()
def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    correct = torch.zeros(w.shape[0])
    for i in range(0, x.shape[0], chunk):
        logits = torch.einsum("nd,ldk->lnk", x[i:i + chunk], w) + b[:, None, :]
        correct += (logits.argmax(-1) == y[i:i + chunk]).float().sum(1)
    return correct / max(x.shape[0], 1)


def linear_probe(train_inputs: torch.Tensor | dict[str, torch.Tensor], train_labels: torch.Tensor,
                 test_inputs: torch.Tensor | dict[str, torch.Tensor], test_labels: torch.Tensor,
                 config: ProbeConfig | None = None, **overrides: Any) -> ProbeResult:
    """Train the (pooling x learning-rate) grid on the training inputs, pick on a held-out split, report test top-1.

    Inputs: tokens (N, T, D), latents (N, C, h, w), or already pooled {pooling: (N, d)} dicts (`pooled_inputs`);
    labels int (N,). Keyword overrides set ProbeConfig fields (e.g. `epochs=5`).
    """
    cfg = ProbeConfig(**{**(asdict(config) if config else {}), **overrides})
    cfg.validate()
    shape = tuple(train_inputs.shape[1:]) if isinstance(train_inputs, torch.Tensor) else ()
    if isinstance(train_inputs, torch.Tensor) and isinstance(test_inputs, torch.Tensor) \
            and as_tokens(train_inputs).shape[1:] != as_tokens(test_inputs).shape[1:]:
        raise ValueError(f"train and test inputs differ in shape: {tuple(train_inputs.shape[1:])} vs "
                         f"{tuple(test_inputs.shape[1:])}")
    tr = train_inputs if isinstance(train_inputs, dict) else \
        pooled_inputs(train_inputs, cfg.poolings, cfg.max_flatten_dim)
    te = test_inputs if isinstance(test_inputs, dict) else pooled_inputs(test_inputs, cfg.poolings, cfg.max_flatten_dim)
    poolings = [p for p in cfg.poolings if p in tr and p in te]
    if not poolings:
        raise ConfigError(f"no usable pooling among {list(cfg.poolings)} (flatten needs T*D <= max_flatten_dim="
                          f"{cfg.max_flatten_dim}; pooled inputs given: {sorted(tr)})")
    ytr, yte = train_labels.detach().long().cpu().flatten(), test_labels.detach().long().cpu().flatten()
    n_train, n_test = tr[poolings[0]].shape[0], te[poolings[0]].shape[0]
    if n_train != ytr.shape[0] or n_test != yte.shape[0]:
        raise ValueError(f"inputs and labels differ in length: train {n_train} vs {ytr.shape[0]}, "
                         f"test {n_test} vs {yte.shape[0]}")
    num_classes = int(max(ytr.max(), yte.max())) + 1
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n_train, generator=g)
    n_val = max(1, int(round(cfg.val_fraction * n_train)))
    if n_train - n_val < 1:
        raise ValueError(f"{n_train} training inputs are too few to hold out a validation split")
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    lrs = torch.tensor(cfg.learning_rates, dtype=torch.float32)
    grid, best = [], None
    for pooling in poolings:
        f_tr, f_te = tr[pooling].float(), te[pooling].float()
        if f_tr.shape[1] != f_te.shape[1]:
            raise ValueError(f"{pooling}: train and test inputs differ in size ({f_tr.shape[1]} vs {f_te.shape[1]})")
        if cfg.standardize:
            mu, sd = f_tr[fit_idx].mean(0), f_tr[fit_idx].std(0).clamp_min(1e-6)
            f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
        w, b = _train_heads(f_tr[fit_idx], ytr[fit_idx], lrs, num_classes, cfg, g)
        val_acc = _accuracy(f_tr[val_idx], ytr[val_idx], w, b)
        for j, lr in enumerate(cfg.learning_rates):
            grid.append({"pooling": pooling, "lr": lr, "val_top1": float(val_acc[j])})
        j = int(val_acc.argmax())
        if best is None or float(val_acc[j]) > best[0]:
            test_acc = float(_accuracy(f_te, yte, w[j:j + 1], b[j:j + 1])[0])
            best = (float(val_acc[j]), pooling, cfg.learning_rates[j], test_acc)
    assert best is not None
    return ProbeResult(top1=best[3], best_pooling=best[1], best_lr=best[2], val_top1=best[0], grid=grid,
                       num_train=int(fit_idx.numel()), num_val=int(n_val), num_test=int(n_test),
                       num_classes=num_classes, input_shape=shape)


@torch.no_grad()
def fae_probe_inputs(images: Iterable[tuple[torch.Tensor, torch.Tensor]], encoder: torch.nn.Module,
                     autoencoder: FeatureAutoEncoder | None = None, poolings: tuple[str, ...] = POOLINGS,
                     max_flatten_dim: int = 16384, device: str | torch.device = "cpu",
                     progress: bool = False) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """Pooled probe inputs for the three sides of Table 1, from (images, labels) batches.

    raw = encoder(images) (B, N, D); z = autoencoder.encode(raw).mean (B, C, h, w) (the posterior mean, as the
    latent cache uses); recon = autoencoder.decode(z) = x̂ (B, N, D). Without an autoencoder only `raw`.
    Returns ({"raw"|"recon"|"latent": {pooling: (N, d)}}, labels (N,)).
    """
    out: dict[str, dict[str, list[torch.Tensor]]] = {}
    labels = []
    iterator: Iterable = images
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(images, desc="probe features", unit="batch")
    for x_img, y in iterator:
        with strict_fp32():  # metric features: no TF32, whatever a training run in this process set
            x = encoder(x_img.to(device))
            sides = {"raw": x}
            if autoencoder is not None:
                z = autoencoder.encode(x).mean
                sides["latent"], sides["recon"] = z, autoencoder.decode(z)
        for side, value in sides.items():
            for p, v in pooled_inputs(value, poolings, max_flatten_dim).items():
                out.setdefault(side, {}).setdefault(p, []).append(v)
        labels.append(y.detach().long().cpu().flatten())
    return {side: {p: torch.cat(v) for p, v in d.items()} for side, d in out.items()}, torch.cat(labels)


SIDES = {"raw": "x: frozen encoder features", "recon": "x̂: FAE reconstruction decode(z)",
         "latent": "z: FAE latent (posterior mean)"}


def run_probe(fae: str | None = None, encoder: str | None = None, config_path: str | None = None,
              data_kind: str | None = None, data_root: str | None = None, image_size: int | None = None,
              train_split: str = "train", test_split: str = "test", train_limit: int | None = None,
              test_limit: int | None = None, probe: ProbeConfig | None = None, device: str = "auto",
              progress: bool = False) -> Any:
    """`fae eval probe`: load the FAE bundle, its frozen encoder and the data set, probe x / x̂ / z side by side.

    Returns an EvalReport whose table has one row per input (top-1, best pooling and learning rate).
    """
    from fae.config import from_dict
    from fae.data import DataConfig, build_dataset
    from fae.distributed import resolve_device
    from fae.encoders import FrozenEncoder, encoder_config_from_spec
    from fae.io import find_autoencoder_bundle, read_bundle_config
    from fae.metrics.datasets import data_block
    from fae.metrics.networks import state_dict_sha256
    from fae.metrics.report import EvalReport

    probe = probe or ProbeConfig()
    dev = resolve_device(device)
    autoencoder, enc_ref = None, None
    if fae is not None:
        from fae.models.autoencoder import FeatureAutoEncoder

        bundle = find_autoencoder_bundle(fae)   # a stage-1 bundle or the run holding it
        enc_ref = read_bundle_config(bundle).get("encoder")
        autoencoder = FeatureAutoEncoder.from_pretrained(bundle).to(dev).eval()
    if encoder is not None:
        enc = FrozenEncoder.from_config(encoder_config_from_spec(encoder))
    elif enc_ref is not None:
        enc = FrozenEncoder.from_reference(enc_ref)
    else:
        raise ConfigError("fae eval probe needs --fae (a bundle that records its encoder) or --encoder")
    enc = enc.to(dev)
    if autoencoder is not None:
        from fae.models.autoencoder import check_encoder_shape

        check_encoder_shape(autoencoder.config, enc, "the FAE bundle", "; pass the encoder it was trained on")
    # probing sees each image once, unaugmented, as the data block describes it
    data = data_block(config_path, data_kind, data_root, image_size, default_image_size=enc.input_size)
    cfg = from_dict(DataConfig, data, "data")

    def batches(split: str, limit: int | None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        ds = build_dataset(from_dict(DataConfig, {**data, "limit": limit}, "data"), split)
        return ((b["image"], b["label"]) for b in readable_batches(ds, probe.batch_size))

    tr, ytr = fae_probe_inputs(batches(train_split, train_limit), enc, autoencoder, probe.poolings,
                               probe.max_flatten_dim, dev, progress)
    te, yte = fae_probe_inputs(batches(test_split, test_limit), enc, autoencoder, probe.poolings,
                               probe.max_flatten_dim, dev, progress)
    results = {side: linear_probe(tr[side], ytr, te[side], yte, probe) for side in SIDES if side in tr}
    rows = [{"input": SIDES[side], "top1": r.top1, "val_top1": r.val_top1, "pooling": r.best_pooling,
             "lr": r.best_lr} for side, r in results.items()]
    protocol = {**asdict(probe), "selection": f"best (pooling, lr) on a {probe.val_fraction:.0%} held-out split of "
                "the training set; test top-1 of that head", "latent": "posterior mean",
                "cls_token": "none: patch-token poolings only (FAE reconstructs no CLS token)"}
    inputs = {"data": {**asdict(cfg), "train_split": train_split, "test_split": test_split},
              "fae_bundle": fae, "num_train": int(ytr.numel()), "num_test": int(yte.numel())}
    network = {"name": f"encoder:{enc.config.kind}:{enc.config.name_or_path}", "weights_hash": state_dict_sha256(enc),
               "encoder": enc.reference()}
    metrics: dict[str, float | int | None] = {f"top1_{side}": r.top1 for side, r in results.items()}
    report = EvalReport("probe", metrics, network, int(yte.numel()), protocol, inputs, table=rows)
    report.inputs["grids"] = {side: r.grid for side, r in results.items()}
    return report
