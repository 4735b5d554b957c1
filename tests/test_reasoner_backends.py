"""The reasoner backends: the small causal LM's tokenizer and training examples, the local
Hugging Face reasoner on tiny real models, and the endpoint reasoner against a real local
HTTP server."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lens_model.reasoner.base import Reasoner, check_system_prompt, finish_rewrites
from lens_model.reasoner.endpoint import FORMAT_LINE, OpenAIReasoner
from lens_model.reasoner.lm import (
    HFReasoner,
    build_model,
    build_tokenizer,
    collate,
    encode_chat,
)
from lens_model.recipe import EndpointSection
from lens_model.rl.llm import LLMError
from tests.fake_openai import FakeOpenAI

SYSTEM = "You rewrite requests.\nCopy the request."
WORDS = ["red", "blue", "green", "circle", "square", "star", "two", "three"]
CORPUS = [
    SYSTEM,
    "a red circle left of two blue squares",
    "un cercle rouge et une étoile",
    "ein grüner Würfel",
    "un círculo azul",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread than fighting other work for two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return build_tokenizer(CORPUS * 5, vocab_size=320)


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- the base helpers


def test_check_system_prompt_strips_and_names_the_limit() -> None:
    assert check_system_prompt("  Keep colours.\n", 100) == "Keep colours."
    for empty in ("", "  \n\t"):
        with pytest.raises(ValueError, match="system prompt is empty"):
            check_system_prompt(empty, 100)
    limit = r"12 characters, over the limit of 10 \(reasoner\.max_system_chars\)"
    with pytest.raises(ValueError, match=limit):
        check_system_prompt("twelve chars", 10)


def test_empty_answers_fall_back_to_the_prompt_and_are_counted(caplog) -> None:
    stats = {"rewrites": 0, "empty": 0}
    with caplog.at_level(logging.WARNING, logger="lens_model.reasoner.base"):
        out = finish_rewrites(["a red star", "two circles"], ["  A red star. ", " \n"], stats)
    assert out == ["A red star.", "two circles"]
    assert stats == {"rewrites": 2, "empty": 1}
    assert "'two circles'" in caplog.text and "'a red star'" not in caplog.text
    with pytest.raises(ValueError, match="1 answers for 2 prompts"):
        finish_rewrites(["a", "b"], ["x"], stats)


# ---------------------------------------------------------------- tokenizer and examples


@pytest.mark.parametrize(
    "text",
    [
        "un cercle rouge et une étoile",
        "ein grüner Würfel über dem Kreis",
        "un círculo azul",
        "never seen: 日本語, emoji 🟥 , tabs\tand\nnewlines  double  spaces ",
        " ,.;:!? ' \"",
    ],
)
def test_tokenizer_round_trips_any_text(tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_chat_template_renders_the_chat_exactly(tok: PreTrainedTokenizerBase) -> None:
    rendered = tok.apply_chat_template(
        chat("a red star"), add_generation_prompt=True, tokenize=False
    )
    assert rendered == f"<|system|>{SYSTEM}<|end|><|user|>a red star<|end|><|assistant|>"
    full = tok.apply_chat_template(
        [*chat("a red star"), {"role": "assistant", "content": "A red star."}], tokenize=False
    )
    assert full == rendered + "A red star.<|end|>"
    with pytest.raises(TemplateError, match="no role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tokenizer_save_load_keeps_template_and_special_tokens(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tok.chat_template
    assert loaded.pad_token == "<|pad|>" and loaded.eos_token == "<|end|>"
    assert loaded.padding_side == "left" and loaded.get_vocab() == tok.get_vocab()
    ids = [t.apply_chat_template(chat("ein Würfel"), return_dict=False) for t in (tok, loaded)]
    assert ids[0] == ids[1]
    role_ids = loaded.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"])
    assert loaded.decode([*role_ids, *loaded.encode("x")], skip_special_tokens=True) == "x"


def test_encode_chat_labels_only_the_answer_and_its_end(tok: PreTrainedTokenizerBase) -> None:
    ids, labels = encode_chat(tok, SYSTEM, [("un círculo", "a blue circle")], max_len=200)
    prompt = tok.apply_chat_template(
        chat("un círculo"), add_generation_prompt=True, return_dict=False
    )
    answer = tok.encode("a blue circle", add_special_tokens=False) + [tok.eos_token_id]
    assert ids == prompt + answer and len(labels) == len(ids)
    assert labels == [-100] * len(prompt) + answer
    assert tok.decode([t for t in labels if t != -100]) == "a blue circle<|end|>"


def test_encode_chat_labels_every_turn_under_one_system_prompt(
    tok: PreTrainedTokenizerBase,
) -> None:
    turns = [("un círculo", "a blue circle"), ("zwei Sterne", "two stars")]
    ids, labels = encode_chat(tok, SYSTEM, turns, max_len=400)
    messages = [{"role": "system", "content": SYSTEM}]
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    assert ids == tok.apply_chat_template(messages, return_dict=False)
    answers = tok.decode([t for t in labels if t != -100])
    assert answers == "a blue circle<|end|>two stars<|end|>"
    with pytest.raises(ValueError, match="no turns"):
        encode_chat(tok, SYSTEM, [], max_len=400)


def test_encode_chat_refuses_a_chat_over_max_len(tok: PreTrainedTokenizerBase) -> None:
    turn = [("a red star", "a red star")]
    ids, _ = encode_chat(tok, SYSTEM, turn, max_len=200)
    encode_chat(tok, SYSTEM, turn, max_len=len(ids))
    with pytest.raises(ValueError, match=rf"'a red star'.*{len(ids)} tokens, over max_len="):
        encode_chat(tok, SYSTEM, turn, max_len=len(ids) - 1)


def test_collate_pads_on_the_right_without_loss() -> None:
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_build_model_is_deterministic(tok: PreTrainedTokenizerBase) -> None:
    before = torch.random.get_rng_state()
    a, b = (build_model(tok, 32, 2, 4, 64, 128, seed=3) for _ in range(2))
    c = build_model(tok, 32, 2, 4, 64, 128, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    weights = a.get_input_embeddings().weight
    assert torch.equal(weights, b.get_input_embeddings().weight)
    assert not torch.equal(weights, c.get_input_embeddings().weight)
    assert a.config.tie_word_embeddings and a.config.vocab_size == len(tok)
    assert (a.config.pad_token_id, a.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


# ---------------------------------------------------------------- the local reasoner


@pytest.fixture(scope="module")
def random_dir(tok: PreTrainedTokenizerBase, tmp_path_factory) -> Path:
    """A random tiny model and its tokenizer, saved as any Hugging Face model would be. Its
    weights are scaled up from the usual init, which answers every prompt alike (or with
    nothing), so that each prompt gets its own answer and a padding error shows."""
    folder = tmp_path_factory.mktemp("random-lm")
    model = build_model(tok, 32, 2, 4, 64, 128, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def copier() -> tuple[torch.nn.Module, PreTrainedTokenizerBase, list[str]]:
    """A tiny model trained to answer with the user's text (about 2 s on one thread)."""
    rng = random.Random(0)
    prompts = sorted(
        {" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(40)}
    )
    copy_tok = build_tokenizer([SYSTEM, *prompts], vocab_size=300)
    model = build_model(copy_tok, 32, 2, 4, 64, 64, seed=0)
    pairs = [encode_chat(copy_tok, SYSTEM, [(p, p)], max_len=64) for p in prompts]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        picks = torch.randint(len(pairs), (16,), generator=gen).tolist()
        loss = model(**collate([pairs[i] for i in picks], copy_tok.pad_token_id)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, copy_tok, prompts


def test_hf_reasoner_satisfies_the_protocol(random_dir: Path) -> None:
    assert isinstance(HFReasoner(random_dir), Reasoner)


def test_batched_rewrites_equal_one_at_a_time(random_dir: Path) -> None:
    """Left padding must not change what a prompt gets: batches of mixed lengths give each
    prompt the same greedy answer as alone."""
    prompts = [
        "a",
        "un cercle rouge et une étoile verte",
        "two",
        "ein grüner Würfel",
        "red circle left of a blue square above three stars",
        "un círculo",
    ]
    batched = HFReasoner(random_dir, max_new_tokens=8, batch_size=4)
    out = batched.rewrite(SYSTEM, prompts)
    alone = HFReasoner(random_dir, max_new_tokens=8, batch_size=1)
    assert out == [alone.rewrite(SYSTEM, [p])[0] for p in prompts]
    assert len(set(out)) == len(prompts) and not set(out) & set(prompts)  # real answers
    assert batched.stats == {"rewrites": 6, "empty": 0, "truncated_outputs": 6}
    assert not batched.model.training
    assert batched.rewrite(SYSTEM, []) == []


def test_trained_copy_model_copies_held_in_prompts(copier) -> None:
    model, copy_tok, prompts = copier
    reasoner = HFReasoner(model, copy_tok, max_new_tokens=12)
    held_in = prompts[::4]
    assert reasoner.rewrite(SYSTEM, held_in) == held_in
    assert reasoner.stats == {"rewrites": len(held_in), "empty": 0, "truncated_outputs": 0}


def test_max_new_tokens_cuts_answers_and_counts_them(copier) -> None:
    model, copy_tok, prompts = copier
    reasoner = HFReasoner(model, copy_tok, max_new_tokens=2)
    lengths = {p: len(copy_tok.encode(p, add_special_tokens=False)) for p in prompts}
    one, long = min(prompts, key=lengths.get), max(prompts, key=lengths.get)
    assert lengths[one] == 1 and lengths[long] >= 3
    out = reasoner.rewrite(SYSTEM, [one, long])
    first_two = copy_tok.decode(copy_tok.encode(long, add_special_tokens=False)[:2])
    assert out == [one, first_two]  # the one-token copy still ends with <|end|> in time
    assert reasoner.stats["truncated_outputs"] == 1


def test_hf_reasoner_checks_the_system_prompt(random_dir: Path) -> None:
    reasoner = HFReasoner(random_dir, max_system_chars=20)
    with pytest.raises(ValueError, match="empty"):
        reasoner.rewrite("   ", ["a red star"])
    with pytest.raises(ValueError, match=r"over the limit of 20 \(reasoner\.max_system_chars\)"):
        reasoner.rewrite("x" * 21, ["a red star"])


def test_tokenizer_without_chat_template_is_refused(random_dir: Path, tmp_path: Path) -> None:
    loaded = AutoTokenizer.from_pretrained(random_dir)
    loaded.chat_template = None
    loaded.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((random_dir / name).read_bytes())
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))} has no chat template"):
        HFReasoner(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model folder"):
        HFReasoner(tmp_path / "missing")
    with pytest.raises(ValueError, match="without its tokenizer"):
        HFReasoner(build_model(loaded, 32, 1, 4, 64, 128, seed=0))


def test_hf_reasoner_refuses_chats_past_the_model_positions(random_dir: Path) -> None:
    reasoner = HFReasoner(random_dir, max_new_tokens=120)  # the model has 128 positions
    with pytest.raises(ValueError, match=r"'a red star' is \d+ tokens.*128 positions"):
        reasoner.rewrite(SYSTEM, ["a red star"])


# ---------------------------------------------------------------- the endpoint reasoner


def endpoint(api: FakeOpenAI, **kw: object) -> EndpointSection:
    return EndpointSection(
        base_url=api.base_url, model="fake-model", **{"timeout_s": 5.0, "max_retries": 2, **kw}
    )


def user_of(request: dict) -> str:
    return request["messages"][-1]["content"]


def test_openai_rewrites_in_order_with_the_searched_system_prompt() -> None:
    prompts = [f"prompt {i}: a red star" for i in range(6)]
    reply = lambda req: json.dumps({"prompt": user_of(req).upper()})  # noqa: E731
    with FakeOpenAI(reply) as api:
        reasoner = OpenAIReasoner(endpoint(api), workers=3)
        assert reasoner.rewrite(f"  {SYSTEM}  ", prompts) == [p.upper() for p in prompts]
    assert isinstance(reasoner, Reasoner)
    assert sorted(user_of(r) for r in api.requests) == sorted(prompts)
    for request in api.requests:
        system, user = request["messages"]
        assert system == {"role": "system", "content": f"{SYSTEM}\n{FORMAT_LINE}"}
        assert user["role"] == "user" and request["model"] == "fake-model"
    assert reasoner.stats == {"rewrites": 6, "empty": 0}


def test_openai_malformed_answers_are_retried() -> None:
    replies = iter(["no JSON here", '{"prompt": 5}', '{"text": "a"}', '{"prompt": "A red star."}'])
    lock = threading.Lock()

    def reply(req: dict) -> str:
        with lock:
            return next(replies)

    with FakeOpenAI(reply) as api:
        reasoner = OpenAIReasoner(endpoint(api, max_retries=3))
        assert reasoner.rewrite(SYSTEM, ["a red star"]) == ["A red star."]
    assert len(api.requests) == 4


def test_openai_always_malformed_raises_naming_the_endpoint() -> None:
    with FakeOpenAI(lambda req: '{"prompt": null}') as api:
        with pytest.raises(LLMError) as err:
            OpenAIReasoner(endpoint(api, max_retries=1)).rewrite(SYSTEM, ["a red star"])
    msg = str(err.value)
    assert "rewrite prompt 0 ('a red star')" in msg and "fake-model at http://127.0.0.1" in msg
    assert "after 2 tries" in msg and '"prompt"' in msg
    assert len(api.requests) == 2


def test_openai_empty_answer_keeps_the_prompt(caplog) -> None:
    answers = {"a red star": '{"prompt": ""}', "two circles": '{"prompt": "Two circles."}'}
    with FakeOpenAI(lambda req: answers[user_of(req)]) as api:
        reasoner = OpenAIReasoner(endpoint(api))
        with caplog.at_level(logging.WARNING):
            out = reasoner.rewrite(SYSTEM, ["a red star", "two circles"])
    assert out == ["a red star", "Two circles."]
    assert reasoner.stats == {"rewrites": 2, "empty": 1}
    assert "'a red star'" in caplog.text
    with pytest.raises(ValueError, match="reasoner.max_system_chars"):
        OpenAIReasoner(endpoint(api), max_system_chars=5).rewrite(SYSTEM, ["x"])
    assert len(api.requests) == 2  # a refused system prompt is never sent
