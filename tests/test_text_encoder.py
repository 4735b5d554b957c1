"""LanguageEncoder: real MiniLM (BERT, no template) and a tiny random Qwen3 with a chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lens_model.text_encoder import LanguageEncoder, is_causal, pin_template_clock

SHORT = "a red circle"
LONG = "three green stars above a blue square and two red circles left of a black cross"

# A Qwen-style template with a dated system turn, like GPT-OSS's, so the clock pin is exercised.
TEMPLATE = ("<|im_start|>system\ntoday is {{ strftime_now('%Y-%m-%d') }}<|im_end|>\n"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("a red blue green black circle circles square star stars cross above left of and two "
         "three system user assistant today is").split()
SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def minilm() -> LanguageEncoder:
    torch.manual_seed(0)
    return LanguageEncoder.from_spec("minilm", layers=[2, 5], width=24, max_length=64)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block Qwen3 causal LM and a WordLevel tokenizer with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen3")
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=128)
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> LanguageEncoder:
    torch.manual_seed(0)
    return LanguageEncoder.from_spec(str(qwen_dir), layers=[1, 3], width=16, max_length=32)


def test_minilm_shapes_mask_and_selected_layers(minilm: LanguageEncoder) -> None:
    assert not minilm.use_template and not is_causal(minilm.lm.config)
    h, mask = minilm.hidden([SHORT, LONG])
    feats, mask2 = minilm([SHORT, LONG])
    lengths = [len(minilm.tokenize(p)[0]) for p in (SHORT, LONG)]
    assert h.shape == (2, max(lengths), 2 * 384) and h.dtype == torch.float32
    assert feats.shape == (2, max(lengths), 24)
    assert mask.tolist() == mask2.tolist()
    assert mask.sum(1).tolist() == lengths
    ids, n_prefix = minilm.tokenize(SHORT)
    assert n_prefix == 0 and ids[0] == minilm.tokenizer.cls_token_id
    # the two blocks of H are hidden_states[2] and hidden_states[5] of the LM itself
    with torch.no_grad():
        ref = minilm.lm(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    n = lengths[0]
    torch.testing.assert_close(h[0, :n, :384], ref[2][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(h[0, :n, 384:], ref[5][0], atol=1e-5, rtol=0)


def test_minilm_truncates_at_max_length(minilm: LanguageEncoder) -> None:
    short = LanguageEncoder(minilm.lm, minilm.tokenizer, [2, 5], 24, 8, minilm.source)
    ids, _ = short.tokenize(LONG)
    feats, mask = short([LONG])
    assert len(ids) == 8 and ids[-1] == minilm.tokenizer.sep_token_id
    assert feats.shape == (1, 8, 24) and bool(mask.all())


def test_truncates_says_whether_a_prompt_is_cut(minilm: LanguageEncoder,
                                                qwen: LanguageEncoder) -> None:
    """What the reasoner's rewrites are counted by: a prompt over max_length is cut short."""
    short = LanguageEncoder(minilm.lm, minilm.tokenizer, [2, 5], 24, 8, minilm.source)
    assert short.truncates(LONG) and not short.truncates("a red circle")
    assert not minilm.truncates(LONG)  # 64 tokens hold it
    # the template's end-of-turn and assistant header count towards max_length too
    assert qwen.truncates(" ".join(["red"] * 31)) and not qwen.truncates(" ".join(["red"] * 20))


def test_minilm_padding_does_not_change_a_prompt(minilm: LanguageEncoder) -> None:
    h_batch, m_batch = minilm.hidden([SHORT, LONG])
    h_alone, m_alone = minilm.hidden([SHORT])
    n = int(m_alone.sum())
    torch.testing.assert_close(h_batch[0, :n], h_alone[0, :n], atol=1e-5, rtol=0)
    f_batch = minilm.connect(h_batch, m_batch)
    f_alone = minilm.connect(h_alone, m_alone)
    torch.testing.assert_close(f_batch[0, :n], f_alone[0, :n], atol=1e-5, rtol=0)
    assert not m_batch[0, n:].any() and f_batch[0, n:].abs().max() == 0  # padding is zero


def test_empty_prompt_is_all_masked_zeros(minilm: LanguageEncoder) -> None:
    feats, mask = minilm(["", SHORT, "   "])
    assert not mask[0].any() and not mask[2].any() and mask[1].any()
    assert feats[0].abs().max() == 0 and feats[2].abs().max() == 0
    only_empty, only_mask = minilm([""])
    assert only_empty.shape == (1, 1, 24) and not only_mask.any()
    assert only_empty.abs().max() == 0


def test_identity_is_stable_and_tracks_settings(minilm: LanguageEncoder) -> None:
    same = LanguageEncoder(minilm.lm, minilm.tokenizer, [2, 5], 99, 64, minilm.source)
    assert same.identity() == minilm.identity()  # width is the connector's, not the cache's
    assert len(minilm.identity()) == 16
    other_layers = LanguageEncoder(minilm.lm, minilm.tokenizer, [2, 6], 24, 64, minilm.source)
    other_length = LanguageEncoder(minilm.lm, minilm.tokenizer, [2, 5], 24, 32, minilm.source)
    assert len({minilm.identity(), other_layers.identity(), other_length.identity()}) == 3


def test_bad_layers_and_lengths_are_rejected(minilm: LanguageEncoder) -> None:
    with pytest.raises(ValueError, match=r"0\.\.6"):
        LanguageEncoder(minilm.lm, minilm.tokenizer, [2, 7], 24, 64, minilm.source)
    with pytest.raises(ValueError, match="unique"):
        LanguageEncoder(minilm.lm, minilm.tokenizer, [2, 2], 24, 64, minilm.source)
    with pytest.raises(ValueError, match="512 positions"):
        LanguageEncoder(minilm.lm, minilm.tokenizer, [2], 24, 1024, minilm.source)
    with pytest.raises(TypeError, match="list of prompts"):
        minilm.hidden(SHORT)  # type: ignore[arg-type]


def test_lens_spec_needs_a_local_download() -> None:
    with pytest.raises(FileNotFoundError) as err:
        LanguageEncoder.from_spec("openai/gpt-oss-20b", layers=[5, 11, 17, 23], width=1536,
                                  max_length=512)
    assert "openai/gpt-oss-20b" in str(err.value) and "download" in str(err.value)
    assert "local folder" in str(err.value)


def test_template_clock_is_pinned() -> None:
    pinned = pin_template_clock("today {{ strftime_now('%Y-%m-%d') }}, {{ strftime_now(\"%d\") }}")
    assert pinned == 'today {{ "2025-08-05" }}, {{ "05" }}'


def test_chat_template_prefix_is_dropped(qwen: LanguageEncoder) -> None:
    assert qwen.use_template and is_causal(qwen.lm.config)
    ids, n_prefix = qwen.tokenize(SHORT)
    tokens = qwen.tokenizer.convert_ids_to_tokens(ids)
    # prefix: the dated system turn and the user header; the date is pinned, not today's
    assert "2025-08-05" in qwen._prefix
    assert tokens[:2] == ["<|im_start|>", "system"]
    assert tokens[n_prefix - 2:n_prefix] == ["<|im_start|>", "user"]
    assert tokens[n_prefix:] == ["a", "red", "circle", "<|im_end|>", "<|im_start|>", "assistant"]
    feats, mask = qwen([SHORT])
    assert feats.shape == (1, 6, 16) and int(mask.sum()) == 6


def test_causal_features_are_the_prompts_own_states(qwen: LanguageEncoder) -> None:
    h, mask = qwen.hidden([SHORT, LONG])
    assert h.shape[-1] == 2 * 64
    ids, n_prefix = qwen.tokenize(LONG)
    with torch.no_grad():
        ref = qwen.lm(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    n = len(ids) - n_prefix
    assert int(mask[1].sum()) == n
    torch.testing.assert_close(h[1, :n, :64], ref[1][0, n_prefix:], atol=1e-5, rtol=0)
    torch.testing.assert_close(h[1, :n, 64:], ref[3][0, n_prefix:], atol=1e-5, rtol=0)
    h_alone, m_alone = qwen.hidden([SHORT])  # right padding does not reach a causal prompt
    k = int(m_alone.sum())
    torch.testing.assert_close(h[0, :k], h_alone[0, :k], atol=1e-5, rtol=0)


def test_causal_truncation_keeps_the_prompt_start(qwen: LanguageEncoder) -> None:
    short = LanguageEncoder(qwen.lm, qwen.tokenizer, [1, 3], 16, 2, qwen.source)
    ids, n_prefix = short.tokenize(LONG)
    assert qwen.tokenizer.convert_ids_to_tokens(ids[n_prefix:]) == ["three", "green"]
    assert short([LONG])[0].shape == (1, 2, 16)


def test_gradient_reaches_only_the_connector(qwen: LanguageEncoder) -> None:
    qwen.train()
    qwen.zero_grad(set_to_none=True)
    feats, mask = qwen([SHORT, LONG, ""])
    feats.pow(2).mean().backward()
    assert not qwen.lm.training  # train() leaves the frozen LM in eval mode
    assert all(not p.requires_grad and p.grad is None for p in qwen.lm.parameters())
    grads = {n: p.grad for n, p in qwen.named_parameters()}
    assert set(grads) == {"connector.norms.0.weight", "connector.norms.1.weight",
                          "connector.proj.weight", "connector.proj.bias"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(k.startswith("connector.") for k in qwen.state_dict())


def test_to_moves_the_frozen_lm(qwen_dir: Path) -> None:
    enc = LanguageEncoder.from_spec(str(qwen_dir), layers=[1, 3], width=16, max_length=32)
    before = enc.identity()
    enc.to(torch.float64)
    assert next(enc.lm.parameters()).dtype == torch.float64
    assert enc.connector.proj.weight.dtype == torch.float64
    assert enc([SHORT])[0].dtype == torch.float64
    assert enc.identity() != before  # features in another dtype are another cache entry


def test_identity_follows_weight_contents(qwen_dir: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    shutil.copytree(qwen_dir, tuned)
    (weights,) = tuned.glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    key = sorted(state)[0]
    state[key] = state[key] + 1  # a "fine-tune": same names, shapes and file size
    save_file(state, str(weights), metadata=metadata)
    assert weights.stat().st_size == next(qwen_dir.glob("*.safetensors")).stat().st_size
    spec = {"layers": [1, 3], "width": 16, "max_length": 32}
    base = LanguageEncoder.from_spec(str(qwen_dir), **spec)
    assert LanguageEncoder.from_spec(str(tuned), **spec).identity() != base.identity()
