"""Word-level tokenizer and a tiny text encoder that stand in for FLUX's T5 + CLIP pair.

The encoder returns per-token states (FLUX's `encoder_hidden_states`, from T5) and a pooled vector
(FLUX's `pooled_projections`, from CLIP), so the transformer sees the same two inputs as FLUX.1-dev.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from budcache_pipeline.models.digits.captions import NUMBER_WORDS, all_captions

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
_WORD_RE = re.compile(r"[a-z]+|[0-9]+")
VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def split_words(text: str) -> list[str]:
    """Lower-case words and numerals of `text`; punctuation separates words and is dropped."""
    return _WORD_RE.findall(text.lower())


def build_vocab() -> list[str]:
    """The vocabulary: padding, unknown, then every word the caption templates can produce, sorted."""
    words = {w for label in range(10) for text in all_captions(label) for w in split_words(text)}
    words.update(NUMBER_WORDS)
    words.update(str(d) for d in range(10))
    return [PAD_TOKEN, UNK_TOKEN, *sorted(words)]


class DigitsTokenizer:
    """Maps prompts to fixed-length id rows; unknown words become `<unk>`, long prompts are truncated."""

    def __init__(self, vocab: list[str], max_length: int = 10) -> None:
        if vocab[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError(f"vocab must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}")
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.vocab = list(vocab)
        self.max_length = max_length
        self._ids = {word: i for i, word in enumerate(self.vocab)}

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, unpadded and truncated to `max_length`."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty: describe the digit to draw, e.g. 'a handwritten seven'")
        words = split_words(prompt)
        if not words:
            raise ValueError(f"prompt {prompt!r} has no words or numerals: describe the digit to draw")
        return [self._ids.get(word, self.unk_id) for word in words[: self.max_length]]

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """A (B, max_length) LongTensor of ids, right-padded with `<pad>`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.encode(prompt)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / VOCAB_FILE).write_text("\n".join(self.vocab) + "\n", encoding="utf-8")
        config = {"max_length": self.max_length}
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> DigitsTokenizer:
        folder = Path(folder)
        vocab = (folder / VOCAB_FILE).read_text(encoding="utf-8").splitlines()
        config = json.loads((folder / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
        return cls(vocab, max_length=int(config["max_length"]))


class DigitsTextEncoder(ModelMixin, ConfigMixin):
    """Token embeddings + one self-attention block; pooled output is a masked mean, projected."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        max_length: int = 10,
        hidden_dim: int = 32,
        num_heads: int = 2,
        pooled_projection_dim: int = 32,
    ) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError("hidden_dim must be divisible by num_heads")
        self.token_embedding = nn.Embedding(vocab_size, hidden_dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, hidden_dim))
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.attn_out = nn.Linear(hidden_dim, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, 2 * hidden_dim), nn.GELU(), nn.Linear(2 * hidden_dim, hidden_dim)
        )
        self.final_norm = nn.LayerNorm(hidden_dim)
        self.pooled_proj = nn.Linear(hidden_dim, pooled_projection_dim)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> (hidden states (B, L, hidden_dim), pooled (B, pooled_projection_dim))."""
        batch, length = input_ids.shape
        keep = input_ids != 0
        h = self.token_embedding(input_ids) + self.position_embedding[:length]
        heads = self.config.num_heads
        q, k, v = self.qkv(self.norm1(h)).view(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn_mask = keep[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        h = h + self.attn_out(a.transpose(1, 2).reshape(batch, length, -1))
        h = self.final_norm(h + self.mlp(self.norm2(h)))
        weights = keep.to(h.dtype).unsqueeze(-1)
        pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return h, self.pooled_proj(pooled)
