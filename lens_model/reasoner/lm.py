"""A small causal language model as a reasoner: its tokenizer, its model, its training
examples, and :class:`HFReasoner`, which rewrites prompts with any Hugging Face causal LM that
has a chat template (ours, or one downloaded beforehand; loading is offline).

The chat format of our own tokenizer is one control token per role and one end token::

    <|system|>SYSTEM<|end|><|user|>USER<|end|><|assistant|>ANSWER<|end|>

so the generation prompt is ``<|assistant|>`` and the model learns to stop at ``<|end|>``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lens_model.reasoner.base import check_system_prompt, finish_rewrites, new_stats

log = logging.getLogger(__name__)
PAD, SYSTEM, USER, ASSISTANT, END = "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, SYSTEM, USER, ASSISTANT, END]
IGNORE = -100  # the label torch's cross-entropy skips
# Each role token is a literal (not built from the role's name), so an unknown role fails
# loudly instead of becoming plain text, and transformers can tell the template's control
# tokens apart.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>' }}"
    "{%- else -%}{{ raise_exception('the reasoner chat has no role ' + message['role']) }}"
    "{%- endif -%}"
    "{{ message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


# ---------------------------------------------------------------- tokenizer and model


def build_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``: every string encodes and decodes exactly
    (bytes, not characters, are the alphabet), so no prompt is ever out of vocabulary."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 "
            f"byte tokens and {len(SPECIAL_TOKENS)} special tokens; use at least "
            f"{256 + len(SPECIAL_TOKENS)}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        eos_token=END,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # it rewrites " ," and would break round trips
    )


def build_model(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int,
    layers: int,
    heads: int,
    intermediate_size: int,
    max_positions: int,
    seed: int,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 decoder sized for ``tokenizer``; the same ``seed`` gives
    the same weights, without touching the caller's random state."""
    if hidden_size % heads:
        raise ValueError(
            f"hidden_size={hidden_size} is not a multiple of heads={heads}: each "
            "head gets hidden_size / heads dimensions"
        )
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,  # most of a tiny model's weights are its embeddings
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)


# ---------------------------------------------------------------- training examples


def _chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    )


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    system: str,
    turns: Sequence[tuple[str, str]],
    max_len: int,
) -> tuple[list[int], list[int]]:
    """Token ids of a chat of one system prompt and ``(user, answer)`` turns, and labels for
    training on the answers only (each answer's tokens and its end token; the rest ``-100``).

    Each turn's prompt part is what :class:`HFReasoner` feeds the model at inference
    (``apply_chat_template(..., add_generation_prompt=True)``), so training and use agree.
    Several turns under one system prompt spread the cost of reading it over more answers.
    """
    if not turns:
        raise ValueError("encode_chat got no turns: give at least one (user, answer) pair")
    messages = [{"role": "system", "content": system}]
    ids: list[int] = []
    labels: list[int] = []
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        prompt = _chat_ids(tokenizer, messages, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": answer})
        full = _chat_ids(tokenizer, messages)
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise ValueError(
                f"the chat template does not extend its generation prompt with the "
                f"answer for user {_short(user)}: the answer's tokens cannot be told "
                "apart; use a template whose assistant turn follows the prompt as is"
            )
        labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt) :]
        ids = full
    if len(ids) > max_len:
        raise ValueError(
            f"the chat (last user {_short(turns[-1][0])}, answer {_short(turns[-1][1])}) is "
            f"{len(ids)} tokens, over max_len={max_len}: shorten it or raise the limit"
        )
    return ids, labels


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """A right-padded training batch of ``(ids, labels)`` pairs; pads get no loss."""
    if not pairs:
        raise ValueError("collate got no pairs")
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for row, (ids, labs) in enumerate(pairs):
        if len(ids) != len(labs):
            raise ValueError(f"pair {row} has {len(ids)} ids but {len(labs)} labels")
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(labs, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------- the reasoner


def _as_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


class HFReasoner:
    """Rewrites prompts with a Hugging Face causal LM: greedy, batched, left-padded.

    ``path_or_model`` is a folder holding the model and its tokenizer (loaded offline), or a
    model object given with its ``tokenizer``. ``device`` only applies to a folder (default:
    CUDA when there is one); a model object stays where it is.
    """

    def __init__(
        self,
        path_or_model: str | os.PathLike[str] | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 32,
        max_system_chars: int = 2000,
        device: str | None = None,
    ) -> None:
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must "
                "both be at least 1"
            )
        if isinstance(path_or_model, (str, os.PathLike)):
            folder = Path(path_or_model)
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"no model folder at {folder}: give the folder that "
                    "save_pretrained wrote (model and tokenizer)"
                )
            where = f"the tokenizer at {folder}"
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
            model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        elif tokenizer is None:
            raise ValueError(
                "HFReasoner got a model object without its tokenizer: pass "
                "tokenizer=..., or give the folder both were saved to"
            )
        else:
            model, where = path_or_model, "the given tokenizer"
        if not tokenizer.chat_template:
            raise ValueError(
                f"{where} has no chat template, so the reasoner cannot build its "
                "prompts: use a chat (instruct) model, or set "
                "tokenizer.chat_template and save it with save_pretrained"
            )
        if tokenizer.pad_token is None:  # many chat models ship without one; any id will do
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_system_chars = max_system_chars
        # Chat models often end a turn with a token other than the tokenizer's eos (and list
        # both in their generation config): stop at any of them.
        self.eos_ids = _as_ids(model.generation_config.eos_token_id) | _as_ids(
            tokenizer.eos_token_id
        )
        if not self.eos_ids:
            raise ValueError(
                f"{where} and the model's generation config name no end token, so "
                "generation could never stop: set tokenizer.eos_token"
            )
        self.stats = new_stats("truncated_outputs")

    def rewrite(self, system_prompt: str, prompts: list[str]) -> list[str]:
        """One rewrite per prompt, in order; empty answers fall back to the prompt."""
        system = check_system_prompt(system_prompt, self.max_system_chars)
        answers = [""] * len(prompts)
        # Prompts of similar length share a batch, so less compute goes to padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for i, answer in zip(
                    batch, self._generate(system, [prompts[i] for i in batch]), strict=True
                ):
                    answers[i] = answer
        return finish_rewrites(prompts, answers, self.stats)

    def _limit(self) -> int | None:
        config = self.model.config.get_text_config()
        return getattr(config, "max_position_embeddings", None)

    def _generate(self, system: str, prompts: list[str]) -> list[str]:
        batch = self.tokenizer.apply_chat_template(
            [_chat(system, p) for p in prompts],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            padding=True,
            return_tensors="pt",
            tokenizer_kwargs={"padding_side": "left"},  # generation appends on the right
        )
        width = batch["input_ids"].shape[1]
        limit = self._limit()
        if limit is not None and width + self.max_new_tokens > limit:
            longest = max(prompts, key=len)
            raise ValueError(
                f"the chat for prompt {_short(longest)} is {width} tokens; with "
                f"max_new_tokens={self.max_new_tokens} it passes the model's "
                f"{limit} positions: shorten the system prompt or the prompt"
            )
        out = self.model.generate(
            input_ids=batch["input_ids"].to(self.model.device),
            attention_mask=batch["attention_mask"].to(self.model.device),
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        answers, truncated = [], 0
        for row in out[:, width:].tolist():
            ends = [k for k, token in enumerate(row) if token in self.eos_ids]
            if not ends and len(row) >= self.max_new_tokens:
                truncated += 1
            answers.append(row[: ends[0]] if ends else row)
        if truncated:
            self.stats["truncated_outputs"] += truncated
            log.warning(
                "%d of %d rewrites hit max_new_tokens=%d before the end token: they "
                "are cut short; raise max_new_tokens if this persists",
                truncated,
                len(prompts),
                self.max_new_tokens,
            )
        return self.tokenizer.batch_decode(answers, skip_special_tokens=True)
