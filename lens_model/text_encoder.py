"""The language encoder: hidden states of a frozen HF model at several layers -> connector.

Layer indices follow ``outputs.hidden_states`` of transformers (``output_hidden_states=True``):
index 0 is the embedding output and index i (1..n) the output of block i, so a 24-block model
accepts 0..24. Lens's GPT-OSS-20B indices 5, 11, 17, 23 are read this way (23 is the second to
last block; the last entry may carry the model's final norm).

Tokens. When the tokenizer has a chat template (causal LMs such as Qwen3 and GPT-OSS), each
prompt is put in one user message and rendered with ``add_generation_prompt=True``. The
template is made fixed first: every ``strftime_now("...")`` call (GPT-OSS writes today's date)
is replaced by the constant ``TEMPLATE_DATE``, so features and cache keys do not change by day.
The prompt's span is located by rendering the template around a sentinel: the text before the
sentinel is the prefix, and the prompt starts at that character. The rendered string is
tokenized once, with offsets, and the prefix tokens (those ending at or before the prompt's
first character) are dropped after the LM has read them; the prompt's tokens and the template
suffix (end of turn, assistant header) are kept. Kept tokens are truncated to ``max_length``
from the end, which the causal LM's earlier states do not depend on. Without a chat template
(BERT-like encoders such as MiniLM) the prompt is tokenized alone with the tokenizer's own
special tokens and truncated to ``max_length``.

An empty (or whitespace-only) prompt never reaches the LM: its row is all masked with zero
features, as CFG's empty negative prompt needs. Rows are right padded; padding positions hold
zeros. A batch of only empty prompts has length 1.

``hidden`` (frozen LM, cacheable, keyed by ``identity()``) and ``connect`` (trainable norms and
linear) split the work so training can read cached hidden states. The LM is kept outside the
module tree: ``parameters()`` and ``state_dict()`` hold the connector only, so checkpoints and
optimisers never see the frozen weights, while ``.to()`` still moves the LM.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import date
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from lens_model import safe_load
from lens_model.data.tokens import MINILM, minilm_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # recipe names: text_encoder/vae.dtype
TEMPLATE_DATE = date(2025, 8, 5)  # gpt-oss's release day: the fixed date its template shows
_SENTINEL = "\u2063LENS-PROMPT\u2063"  # a string no template writes on its own
_STRFTIME = re.compile(r"strftime_now\(\s*(['\"])(.*?)\1\s*\)")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "merges.txt", "tokenizer.model", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json")
_WEIGHT_SUFFIX = ".safetensors"  # the only weights read; .bin/.pt/.pth pickles are refused


def pin_template_clock(template: str) -> str:
    """Replace each ``strftime_now("fmt")`` in a chat template by ``TEMPLATE_DATE`` so formatted."""
    return _STRFTIME.sub(lambda m: json.dumps(TEMPLATE_DATE.strftime(m.group(2))), template)


def is_causal(config: Any) -> bool:
    """Whether a transformers config describes a decoder-only (causal) language model."""
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(
        a.endswith(_CAUSAL_SUFFIXES) for a in archs)


class TextConnector(ModelMixin, ConfigMixin):
    """The trainable part: one RMSNorm per selected layer, concatenated, then a linear map.

    A diffusers model so a pipeline can save and load it as a component; its state dict is
    the plain module's (``norms.i.weight``, ``proj.*``), so training checkpoints load as is.
    """

    # Keyword-only: diffusers records positional init args as defaults, which from_config
    # would then drop.
    @register_to_config
    def __init__(self, *, n_layers: int, hidden: int, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden = hidden
        self.norms = nn.ModuleList(nn.RMSNorm(hidden, eps=eps) for _ in range(n_layers))
        self.proj = nn.Linear(n_layers * hidden, width)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """h (B, T, L * D), mask (B, T) -> features (B, T, width), zero where masked."""
        if h.shape[-1] != len(self.norms) * self.hidden:
            raise ValueError(f"hidden states have {h.shape[-1]} channels; this connector takes "
                             f"{len(self.norms)} layers x {self.hidden}")
        h = h.to(self.proj.weight.dtype)
        parts = [norm(x) for norm, x in zip(self.norms, h.split(self.hidden, -1), strict=True)]
        out = self.proj(torch.cat(parts, dim=-1))  # (B, T, width)
        return out * mask.unsqueeze(-1).to(out.dtype)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class LanguageEncoder(nn.Module):
    """A frozen Hugging Face LM read at several layers, plus a trainable :class:`TextConnector`."""

    def __init__(self, lm: nn.Module, tokenizer: Any, layers: list[int], width: int,
                 max_length: int, source: Path, template: bool | None = None) -> None:
        super().__init__()
        config = lm.config.get_text_config()
        n_blocks = int(config.num_hidden_layers)
        if not layers:
            raise ValueError("language encoder needs at least one layer index")
        bad = [i for i in layers if not 0 <= i <= n_blocks]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"language encoder layers {layers} of {source}: each must be unique "
                             f"and in 0..{n_blocks} (hidden_states index: 0 = embeddings, "
                             f"i = output of block i)")
        if width < 1 or max_length < 1:
            raise ValueError(f"language encoder width={width} and max_length={max_length} must "
                             "both be >= 1")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if template and not has_template:
            raise ValueError(f"language encoder {source}: template=True but its tokenizer has no "
                             "chat template; add chat_template.jinja or pass template=None")
        self.use_template = has_template if template is None else template
        limit = getattr(config, "max_position_embeddings", None)
        if not self.use_template and limit is not None and max_length > limit:
            raise ValueError(f"language encoder max_length={max_length} exceeds {source}'s "
                             f"{limit} positions; lower max_length")
        lm.eval().requires_grad_(False)
        self._frozen = (lm,)  # a tuple keeps the LM out of parameters() and state_dict()
        self.tokenizer = tokenizer
        self.layers = list(layers)
        self.max_length = max_length
        self.source = Path(source)
        self.hidden_size = int(config.hidden_size)
        self.connector = TextConnector(n_layers=len(layers), hidden=self.hidden_size, width=width)
        self._template = pin_template_clock(tokenizer.chat_template) if self.use_template else ""
        self._prefix = self._render(_SENTINEL).split(_SENTINEL)[0] if self.use_template else ""

    @classmethod
    def from_spec(cls, path: str, layers: list[int], width: int, max_length: int,
                  dtype: torch.dtype | None = None,
                  template: bool | None = None) -> LanguageEncoder:
        """Load the LM and tokenizer from a local folder ("minilm" = all-MiniLM-L6-v2), offline;
        its weights from safetensors only (a pickle file, or a folder of only pickles, is
        refused before anything reads it)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer  # heavy; only when used

        what = f"language encoder {path!r}"
        if path != MINILM:
            safe_load.refuse_pickle_path(path, what)
        folder = minilm_dir() if path == MINILM else Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"language encoder {path!r} is not a local model folder (no config.json there); "
                f"download it into a local folder (e.g. `hf download {path} --local-dir DIR`) "
                f"and pass that folder's path instead")
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"language encoder {path!r} is an encoder-decoder model; use an "
                             "encoder-only or decoder-only (causal) model")
        safe_load.require_safetensors(folder, what)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        # AutoModel gives the base model (no LM head), which is all the hidden states need;
        # use_safetensors=True: a pytorch_model.bin beside the safetensors is never read.
        lm = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                       **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(lm, tokenizer, layers, width, max_length, folder, template)

    @property
    def lm(self) -> nn.Module:
        return self._frozen[0]

    def _apply(self, fn: Any, recurse: bool = True) -> LanguageEncoder:
        self.lm._apply(fn, recurse)  # .to() / .cuda() / .half() reach the out-of-tree LM too
        return super()._apply(fn, recurse)

    def _render(self, prompt: str) -> str:
        """The fixed chat template around one user message, with the assistant header."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], chat_template=self._template, tokenize=False,
            add_generation_prompt=True)

    def tokenize(self, prompt: str) -> tuple[list[int], int]:
        """``(ids the LM reads, n dropped prefix tokens)``; kept ids are ``ids[n:]``."""
        if not self.use_template:
            ids = self.tokenizer(prompt, add_special_tokens=True, truncation=True,
                                 max_length=self.max_length)["input_ids"]
            return list(ids), 0
        ids, n_prefix = self._templated(prompt)
        return ids[:n_prefix + self.max_length], n_prefix

    def _templated(self, prompt: str) -> tuple[list[int], int]:
        """The whole chat-templated prompt's ids, uncut, and its prefix token count."""
        text = self._render(prompt)
        start = len(self._prefix)
        if not text.startswith(self._prefix) or text[start:start + len(prompt)] != prompt:
            raise ValueError(f"the chat template of {self.source} changes the prompt or its "
                             "prefix, so the prefix tokens cannot be located; use template=False")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        n_prefix = sum(1 for _, end in offsets if end <= start)
        return list(ids), n_prefix

    def truncates(self, prompt: str) -> bool:
        """Whether :meth:`tokenize` cuts ``prompt`` short: it keeps ``max_length`` tokens."""
        if not self.use_template:
            return len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"]) \
                > self.max_length
        full, n_prefix = self._templated(prompt)  # one tokenization, not a second to compare
        return len(full) - n_prefix > self.max_length

    @torch.no_grad()
    def hidden(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Frozen LM only: H (B, T, L * D) float32 and mask (B, T) bool; cache these."""
        if isinstance(prompts, str):
            raise TypeError("hidden() takes a list of prompts, not one string; wrap it in [ ]")
        device = next(self.lm.parameters()).device
        rows = {i: self.tokenize(p) for i, p in enumerate(prompts) if p.strip()}
        kept = {i: len(ids) - n for i, (ids, n) in rows.items()}
        t = max([1, *kept.values()])
        h = torch.zeros(len(prompts), t, len(self.layers) * self.hidden_size, device=device)
        mask = torch.zeros(len(prompts), t, dtype=torch.bool, device=device)
        if not rows:
            return h, mask
        longest = max(len(ids) for ids, _ in rows.values())
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = list(rows)
        ids = torch.full((len(order), longest), pad, dtype=torch.long)
        attn = torch.zeros(len(order), longest, dtype=torch.long)
        for r, i in enumerate(order):  # right padding: real tokens keep positions 0..n-1
            seq = rows[i][0]
            ids[r, :len(seq)] = torch.tensor(seq)
            attn[r, :len(seq)] = 1
        out = self.lm(input_ids=ids.to(device), attention_mask=attn.to(device),
                      output_hidden_states=True)
        states = torch.cat([out.hidden_states[k] for k in self.layers], dim=-1)  # (B', S, L*D)
        for r, i in enumerate(order):
            n_prefix, n = rows[i][1], kept[i]
            h[i, :n] = states[r, n_prefix:n_prefix + n].float()
            mask[i, :n] = True
        return h, mask

    def connect(self, h: Tensor, mask: Tensor) -> Tensor:
        """Trainable: H (B, T, L * D), mask (B, T) -> features (B, T, width)."""
        return self.connector(h, mask)

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (features (B, T, width), mask (B, T))."""
        h, mask = self.hidden(prompts)
        return self.connect(h, mask), mask

    def identity(self) -> str:
        """A stable hash of what ``hidden`` depends on, for feature-cache keys.

        The tokenizer and weight files count by content, so a fine-tune of the same shape is
        another cache entry (hashing a 20B model's files takes tens of seconds, once a run)."""
        files = sorted((p.name, _file_sha256(p)) for p in self.source.iterdir()
                       if p.is_file() and (p.name in _TOKENIZER_FILES
                                           or p.name.endswith(_WEIGHT_SUFFIX)
                                           or p.name.endswith(_WEIGHT_SUFFIX + ".index.json")))
        config = json.loads((self.source / "config.json").read_text())
        key = {"format": 2, "config": config, "files": files, "layers": self.layers,
               "max_length": self.max_length, "template": self._template,
               "use_template": self.use_template,
               "dtype": str(next(self.lm.parameters()).dtype)}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
