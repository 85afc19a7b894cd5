"""Self-supervised pretraining of the demo's frozen encoder: a small ViT in the DINOv2 architecture.

No pretrained DINOv2/SigLIP2 weights can be downloaded offline, and a random encoder would make "adapting a
pretrained representation" meaningless, so `fae demo` first trains a transformers `Dinov2Model` (32 px, patch 4,
8x8 tokens of width 128) on the demo's training images without labels, then freezes it
(`fae train encoder --config configs/demo/encoder_pretrain.yaml`). docs/demo-encoder.md has the measured numbers.

- objective: DINOv2's own, in miniature. Self-distillation (DINO): an EMA teacher sees two global crops, the
  student sees them plus small local crops, and the student's CLS prototype distribution must match the teacher's
  centred, sharpened one across views. Masked-image modelling (iBOT): the student's global crops have a random
  fraction of patches replaced by the mask token, and at those positions its patch-token distribution must match
  the teacher's on the unmasked crop. The patch loss matters here because FAE consumes the patch tokens.
- init: 2-D sine-cosine position table and "mimetic" attention weights (Trockman & Kolter, 2023: W_q W_k^T ~ I,
  W_v W_o ~ -I plus noise), which make a ViT learn like a convolutional net from the first step; transformers'
  default init (all weights N(0, 0.02)) barely moves in the few hundred steps a CPU budget allows.
- output: the teacher (as in DINO), as an ordinary `Dinov2Model.save_pretrained` folder plus
  `preprocessor_config.json` (the mean/std training used, read by `FrozenEncoder`) and `fae_pretrain.json` (config,
  data identity, cache key). `FrozenEncoder(kind="dinov2", name_or_path=<folder>)` loads it like a hub model.
- cache: `demo_encoder()` keys the result by (config, data content, PRETRAIN_VERSION) under
  `$FAE_CACHE/demo-encoder/<key>/` (default `~/.cache/fae`), written atomically, so a second demo run skips training.
- shipped: the package carries the result of `configs/demo/encoder_pretrain.yaml` (fp32, seed 0) as the asset
  `demo-encoder` (fae.assets, 3 MB, made by `scripts/ship_demo_assets.py`, SHA-256 checked on every use). `fae demo`
  uses it, as a real user downloads a pretrained encoder; `fae demo --from-scratch` trains it instead.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from fae import distributed as D
from fae.config import to_dict
from fae.data import DataConfig, build_dataset
from fae.data.features import dataset_signature
from fae.data.loading import num_items
from fae.encoders import IMAGENET_MEAN, IMAGENET_STD
from fae.io import cache_root
from fae.training import OptimConfig, TrainConfig, TrainStage, unwrap

# Bump when a code change alters what a given config trains: it is part of the cache key.
PRETRAIN_VERSION = "2"
RECORD_NAME = "fae_pretrain.json"


@dataclass
class EncoderArchConfig:
    """A transformers Dinov2Config at data.image_size."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    patch_size: int = 4
    init: Literal["mimetic", "default"] = "mimetic"
    mimetic_qk: tuple[float, float] = (0.7, 0.7)  # (noise, identity) weights of W_q W_k^T
    mimetic_vo: tuple[float, float] = (0.4, 0.4)  # (noise, identity) weights of W_v W_o

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive, not {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by num_heads and by 4")


@dataclass
class ViewsConfig:
    """Augmented views per image (one batched affine resampling per view set)."""

    global_scale: tuple[float, float] = (0.35, 1.0)  # area fraction of the two global crops
    local_crops: int = 4
    local_size: int = 16                             # px; a multiple of the patch size
    local_scale: tuple[float, float] = (0.1, 0.35)
    jitter: float = 0.4                              # brightness and contrast factors in [1-jitter, 1+jitter]

    def validate(self) -> None:
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"views.{name} must satisfy 0 < low <= high <= 1, not {list(getattr(self, name))}")
        if self.local_crops < 0 or self.local_size < 1:
            raise ValueError("views.local_crops must be >= 0 and views.local_size positive")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"views.jitter must lie in [0, 1), not {self.jitter}")


@dataclass
class ObjectiveConfig:
    """DINO (CLS) + iBOT (masked patches) with one shared projection head, as iBOT."""

    head_hidden: int = 256
    bottleneck: int = 64
    prototypes: int = 1024
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.99   # start of a cosine schedule to 1.0 at the last step
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # per-image fraction of masked patches, uniform in this range
    ibot_weight: float = 1.0         # 0 turns the masked-patch loss off (plain DINO)

    def validate(self) -> None:
        if not 0 <= self.mask_ratio[0] <= self.mask_ratio[1] < 1:
            raise ValueError(f"objective.mask_ratio must satisfy 0 <= low <= high < 1, not {list(self.mask_ratio)}")
        if not 0 <= self.teacher_momentum < 1 or not 0 <= self.center_momentum < 1:
            raise ValueError("objective.teacher_momentum and center_momentum must lie in [0, 1)")
        if min(self.student_temp, self.teacher_temp) <= 0 or self.ibot_weight < 0:
            raise ValueError("objective temperatures must be positive and ibot_weight >= 0")


@dataclass
class Config:
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="fashion_mnist", image_size=32))
    model: EncoderArchConfig = field(default_factory=EncoderArchConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.05, warmup_steps=30,
                                                                   min_lr=1e-5, grad_clip=3.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=128, ema_decay=0.0,
                                                                   checkpoint_every=100, log_every=20))

    def validate(self) -> None:
        if self.data.image_size % self.model.patch_size or self.views.local_size % self.model.patch_size:
            raise ValueError(f"data.image_size={self.data.image_size} and views.local_size={self.views.local_size} "
                             f"must be multiples of model.patch_size={self.model.patch_size}")


# ----------------------------------------------------------------------------------------------------------------
# data


def load_images(data: DataConfig) -> tuple[Tensor, dict[str, Any]]:
    """All training images of `data` as uint8 (N, C, H, W) (C=1 for grey sets, expanded to RGB per batch), plus
    the data set's identity for the cache key. Fashion-MNIST is converted in one batched call, checked against
    the data set's own per-item conversion; other sets go item by item."""
    dataset = build_dataset(dataclasses.replace(data, hflip=False), data.split)
    signature = dataset_signature(dataset)
    images = _batched_fashion_mnist(dataset)
    if images is None:
        images = torch.stack([_to_uint8(dataset[i]["image"]) for i in range(num_items(dataset))])
    if len(images) == 0:
        raise ValueError(f"the pretraining data set ({data.kind}, split {data.split!r}) is empty")
    return images, signature


def _to_uint8(image: Tensor) -> Tensor:
    # Not fae.grid.float_to_uint8 (round half up) on purpose: resized Fashion-MNIST holds exact halves (75,768 pixels
    # of the 32-px training split round differently), so switching would change what this stage trains and the shipped
    # demo-encoder's bytes; switch only together with a PRETRAIN_VERSION bump and a re-shipped asset.
    return image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _batched_fashion_mnist(dataset: Any) -> Tensor | None:
    from fae.data.idx import FashionMNIST

    if type(dataset) is not FashionMNIST or dataset.fit != "resize":
        return None
    s = dataset.image_size
    out = torch.empty(len(dataset), 1, s, s, dtype=torch.uint8)
    for i in range(0, len(dataset), 4096):  # chunks bound the float32 peak
        x = dataset.images[i:i + 4096, None].float().div_(255.0)
        if s != x.shape[-1]:
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False).clamp_(0.0, 1.0)
        out[i:i + 4096] = _to_uint8(x)
    # the data set's per-item path is the reference; fall back to it if the two ever disagree
    for i in (0, len(dataset) // 2, len(dataset) - 1):
        if not torch.equal(out[i].expand(3, s, s), _to_uint8(dataset[i]["image"])):
            return None
    return out


def augment(images: Tensor, size: int, scale: tuple[float, float], jitter: float, generator: torch.Generator,
            mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B,C,H,W) -> normalised float (B,3,size,size): random resized crop (aspect 3/4..4/3, bilinear),
    horizontal flip, brightness/contrast jitter, in one batched affine resampling."""
    b = images.shape[0]
    x = images.float().div_(255.0)
    u = lambda lo, hi: torch.empty(b).uniform_(lo, hi, generator=generator)  # noqa: E731
    area, aspect = u(*scale), u(math.log(3 / 4), math.log(4 / 3)).exp()
    w, h = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)  # fractions of the side
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
    theta[:, 0, 2], theta[:, 1, 2] = u(-1, 1) * (1 - w), u(-1, 1) * (1 - h)  # crop centre, inside the image
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter > 0:
        contrast, brightness = u(1 - jitter, 1 + jitter).view(b, 1, 1, 1), u(1 - jitter, 1 + jitter).view(b, 1, 1, 1)
        avg = x.mean((1, 2, 3), keepdim=True)
        x = ((x - avg) * contrast + avg) * brightness
    x = x.clamp_(0.0, 1.0).expand(b, 3, size, size)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# model


def dinov2_config(arch: EncoderArchConfig, image_size: int) -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                        num_attention_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, patch_size=arch.patch_size,
                        image_size=image_size, num_channels=3, use_mask_token=True)


def build_encoder(arch: EncoderArchConfig, image_size: int) -> nn.Module:
    """A fresh transformers Dinov2Model, initialised as `arch.init` says (from the global RNG: seed it first)."""
    from transformers import Dinov2Model

    # eager attention: on CPU, SDPA's backward is 2x slower at these head sizes (environment.md)
    model = Dinov2Model._from_config(dinov2_config(arch, image_size), attn_implementation="eager")
    if arch.init == "mimetic":
        mimetic_init_(model, arch.mimetic_qk, arch.mimetic_vo)
    return model


def _factor(target: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A, B of shape (d, rank) with A @ B.T the best rank-`rank` approximation of `target`."""
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


@torch.no_grad()
def mimetic_init_(model: Any, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4)) -> None:
    """Mimetic initialisation (Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers", 2023).

    Per head W_q^T W_k ~ a*Z + b*I (each token attends to tokens like itself: with the 2-D sine-cosine position
    table below this is a local, convolution-like average) and per layer W_v^T W_o^T ~ a*Z - b*I, Z ~ N(0, 1/d).
    Uses the global RNG (seed it first)."""
    from fae.nn import sincos_pos_embed_2d

    config: Any = model.config  # a transformers config: its fields are read by name
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = d // heads
    side = config.image_size // config.patch_size
    model.embeddings.position_embeddings[0, 1:] = sincos_pos_embed_2d(d, (side, side))
    eye = torch.eye(d)
    for layer in model.encoder.layer:
        attn = layer.attention
        for h in range(heads):
            q, k = _factor(qk[0] * torch.randn(d, d) / math.sqrt(d) + qk[1] * eye, head_dim)
            attn.q_proj.weight[h * head_dim:(h + 1) * head_dim] = q.T
            attn.k_proj.weight[h * head_dim:(h + 1) * head_dim] = k.T
        v, o = _factor(vo[0] * torch.randn(d, d) / math.sqrt(d) - vo[1] * eye, d)
        attn.v_proj.weight.copy_(v.T)
        attn.o_proj.weight.copy_(o)


# ----------------------------------------------------------------------------------------------------------------
# objective


class ProjectionHead(nn.Module):
    """DINO's head: MLP to a bottleneck, L2-normalised, then cosine similarity to learned prototypes
    (DINO's weight-normalised last layer with the norm fixed at 1)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


def teacher_momentum(base: float, step: int, total: int) -> float:
    """DINO's cosine schedule from `base` at step 0 to 1 at the last step."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1) / 2


def random_masks(batch: int, tokens: int, ratio: tuple[float, float], generator: torch.Generator) -> Tensor:
    """(batch, tokens) bool: each row masks round(r * tokens) random positions, r ~ U(ratio), at least one."""
    r = torch.empty(batch).uniform_(*ratio, generator=generator)
    count = (r * tokens).round().clamp(min=1).long()
    order = torch.rand(batch, tokens, generator=generator).argsort(dim=1)
    return order < count[:, None]


class UInt8Images(Dataset):
    """All images in memory as uint8, each item with the per-sample seed that drives its augmentation."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Any) -> dict[str, Tensor]:
        index, seed = key if isinstance(key, (tuple, list)) else (key, 0)
        return {"image": self.images[int(index)], "seed": torch.tensor(int(seed) % (2**62))}


class EncoderPretraining(TrainStage):
    """Student = encoder + head (trained); teacher = their EMA (held here, saved as extra state, exported)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.optim = cfg, cfg.optim
        arch, obj = cfg.model, cfg.objective
        encoder = build_encoder(arch, cfg.data.image_size)
        head = ProjectionHead(arch.hidden_size, obj.head_hidden, obj.bottleneck, obj.prototypes)
        self.modules = {"encoder": encoder, "head": head}
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "head": copy.deepcopy(head)}).requires_grad_(False)
        self.center_cls = torch.zeros(obj.prototypes)
        self.center_patch = torch.zeros(obj.prototypes)
        # augmentation runs on the CPU (seeded CPU generator), so the normalisation constants stay there
        self.mean, self.std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.teacher_step = 0  # optimizer steps folded into the teacher so far
        self._images: Tensor | None = None
        self.data_signature: dict[str, Any] = {}

    def ema_modules(self) -> list[str]:
        return []  # the teacher is this objective's EMA

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)
        self.center_cls, self.center_patch = self.center_cls.to(device), self.center_patch.to(device)

    def train_dataset(self) -> Dataset:
        if self._images is None:
            self._images, self.data_signature = load_images(self.cfg.data)
        return UInt8Images(self._images)

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        """Fold the student's weights after optimizer step `step` into the teacher (once per step)."""
        while self.teacher_step < step:
            m = teacher_momentum(self.cfg.objective.teacher_momentum, self.teacher_step, self.cfg.train.steps)
            for name in ("encoder", "head"):
                student = unwrap(self.modules[name]).state_dict()
                for key, value in self.teacher[name].state_dict().items():
                    if value.is_floating_point():
                        value.mul_(m).add_(student[key].detach().to(value.dtype), alpha=1 - m)
            self.teacher_step += 1

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        self.update_teacher(step)
        cfg, views, obj = self.cfg, self.cfg.views, self.cfg.objective
        images = batch["image"]
        b, size, p = images.shape[0], cfg.data.image_size, cfg.model.patch_size
        g = torch.Generator().manual_seed(int(batch["seed"][0]))
        cpu = images.cpu()
        globals_ = torch.cat([augment(cpu, size, views.global_scale, views.jitter, g, self.mean, self.std)
                              for _ in range(2)]).to(images.device)
        tokens = (size // p) ** 2
        masks = random_masks(2 * b, tokens, obj.mask_ratio, g).to(images.device)
        encoder, head = self.modules["encoder"], self.modules["head"]
        with torch.no_grad():
            t = self.teacher["encoder"](pixel_values=globals_).last_hidden_state
            t_logits = self.teacher["head"](t).float()
        s = encoder(pixel_values=globals_, bool_masked_pos=masks).last_hidden_state
        s_logits = head(s).float()
        # DINO on CLS: teacher global view i teaches every student view j != i (locals included)
        t_cls = F.softmax((t_logits[:, 0] - self.center_cls) / obj.teacher_temp, dim=-1).chunk(2)
        s_cls = list(F.log_softmax(s_logits[:, 0] / obj.student_temp, dim=-1).chunk(2))
        if views.local_crops:
            locals_ = torch.cat([augment(cpu, views.local_size, views.local_scale, views.jitter, g, self.mean, self.std)
                                 for _ in range(views.local_crops)]).to(images.device)
            local_logits = head(encoder(pixel_values=locals_).last_hidden_state[:, 0]).float()
            s_cls += list(F.log_softmax(local_logits / obj.student_temp, dim=-1).chunk(views.local_crops))
        terms = [-(t_cls[i] * s_cls[j]).sum(-1).mean() for i in range(2) for j in range(len(s_cls)) if i != j]
        dino = torch.stack(terms).mean()
        # iBOT on masked patches: the teacher's unmasked view teaches the student's masked one, position by position
        t_patch = F.softmax((t_logits[:, 1:] - self.center_patch) / obj.teacher_temp, dim=-1)
        s_patch = F.log_softmax(s_logits[:, 1:] / obj.student_temp, dim=-1)
        per_token = -(t_patch * s_patch).sum(-1)
        ibot = (per_token * masks).sum(1).div(masks.sum(1)).mean()
        with torch.no_grad():  # centres: EMA of the teacher's batch-mean logits
            m = obj.center_momentum
            self.center_cls.mul_(m).add_(D.all_reduce_mean(t_logits[:, 0].mean(0)), alpha=1 - m)
            self.center_patch.mul_(m).add_(D.all_reduce_mean(t_logits[:, 1:].mean((0, 1))), alpha=1 - m)
            entropy = -(t_cls[0] * t_cls[0].clamp_min(1e-12).log()).sum(-1).mean()
        loss = dino + obj.ibot_weight * ibot
        return loss, {"loss/dino": dino.item(), "loss/ibot": ibot.item(), "teacher_entropy": entropy.item()}

    def extra_state(self) -> dict[str, Any]:
        return {"teacher": {k: v.cpu() for k, v in self.teacher.state_dict().items()},
                "center_cls": self.center_cls.cpu(), "center_patch": self.center_patch.cpu(),
                "teacher_step": self.teacher_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        device = self.center_cls.device
        self.teacher.load_state_dict(state["teacher"])
        self.center_cls, self.center_patch = state["center_cls"].to(device), state["center_patch"].to(device)
        self.teacher_step = int(state["teacher_step"])

    def export(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        self.update_teacher(self.cfg.train.steps)
        save_encoder(self.teacher["encoder"], out_dir / "encoder", record={
            "config": to_dict(self.cfg), "data": self.data_signature, "version": PRETRAIN_VERSION})


def save_encoder(model: Any, folder: Path, record: dict[str, Any]) -> Path:
    """A Dinov2Model as a hub-style folder that FrozenEncoder loads, written atomically."""
    from fae.io import replace_dir

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = copy.deepcopy(model).float().cpu()
    model.save_pretrained(tmp)
    size = model.config.image_size
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_normalize": True,
        "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}}, indent=2))
    (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2))
    replace_dir(tmp, folder)
    return folder


def build(cfg: Config) -> EncoderPretraining:
    return EncoderPretraining(cfg)


def components(cfg: Config) -> dict[str, nn.Module]:
    arch, obj = cfg.model, cfg.objective
    return {"encoder": build_encoder(dataclasses.replace(arch, init="default"), cfg.data.image_size),
            "head": ProjectionHead(arch.hidden_size, obj.head_hidden, obj.bottleneck, obj.prototypes)}


# ----------------------------------------------------------------------------------------------------------------
# cache


def cache_key(cfg: Config) -> str:
    """Config (minus where it runs) + data content + code version."""
    config = to_dict(cfg)
    config["train"].pop("device", None)
    config["train"].pop("num_workers", None)
    dataset = build_dataset(dataclasses.replace(cfg.data, hflip=False), cfg.data.split)
    blob = json.dumps({"config": config, "data": dataset_signature(dataset), "version": PRETRAIN_VERSION},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def demo_encoder(cfg: Config, work_dir: Path, progress: bool = True) -> tuple[Path, bool]:
    """The pretrained encoder folder for `cfg`: from the cache when there, else trained in `work_dir` and cached.
    Returns (folder, came_from_cache)."""
    from fae.stages import train_stage

    key = cache_key(cfg)
    cached = cache_root() / "demo-encoder" / key
    if (cached / RECORD_NAME).is_file():
        return cached, True
    start = time.time()
    run = train_stage("encoder", cfg, work_dir, progress=progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / "encoder", tmp)
    shutil.copy(run / "metrics.jsonl", tmp / "metrics.jsonl")  # the loss curves travel with the weights
    record = json.loads((tmp / RECORD_NAME).read_text())
    (tmp / RECORD_NAME).write_text(json.dumps({**record, "seconds": round(time.time() - start, 1)}, indent=2))
    from fae.io import replace_dir

    replace_dir(tmp, cached)
    return cached, False
