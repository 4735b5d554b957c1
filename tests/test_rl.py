"""RL post-training pieces on real tiny components: the group reward normalisation, the
DiffusionNFT loss's direction, LoRA merging, the shapes judge, and the RL program resuming
exactly from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageFilter
from safetensors.torch import load_file

from lens_model.data.captions import prompt_set
from lens_model.data.world import SHAPES, Obj, Scene, render
from lens_model.denoiser import LensDenoiser
from lens_model.eval.verifier import read_scene
from lens_model.flow_matching import velocity_loss
from lens_model.recipe import EndpointSection, Recipe, load_recipe
from lens_model.rl.judge import ShapesJudge, Verdict, answer
from lens_model.rl.nft import NFTPolicy, adapters_off, merged, nft_loss, normalise_rewards
from lens_model.rl.prompts import RLPrompt, build_prompts, write_prompts
from lens_model.rl.rubrics import INTEGRITY, RubricError, check_rubrics
from lens_model.text_encoder import LanguageEncoder
from lens_model.train.pretrain import save_final
from lens_model.transformer import LensTransformer2DModel
from lens_model.vae import SemanticVAE
from tests.conftest import BRIEF, BriefTeacher, program_events, straight_and_resumed

RL_SHORT = ["rl.num_prompts=24", "rl.groups=2", "rl.group_size=2", "rl.sample_steps=2",
            "rl.steps=4", "rl.ckpt_every=2", "rl.keep_last=3", "rl.gold_every=2",
            "rl.gold_prompts=2", "rl.lora_rank=4", "rl.lora_alpha=8", "rl.sizes=[32x32,40x24]"]


def tiny_denoiser(seed: int = 0) -> LensDenoiser:
    """A tiny denoiser with small random weights everywhere (off adaLN-zero, so LoRA's
    gradients reach the output)."""
    torch.manual_seed(seed)
    recipe = load_recipe("tiny")
    te = recipe.text_encoder
    encoder = LanguageEncoder.from_spec(te.path, list(te.layers), 128, te.max_length)
    transformer = LensTransformer2DModel.from_preset("tiny", in_channels=8, pooled_text=True)
    for p in transformer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return LensDenoiser(transformer, encoder.connector)


def packed_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Two samples packed in one row: 16 and 8 image tokens, 5 and 3 text tokens."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 24, 32, generator=g)
    seg = torch.tensor([[0] * 16 + [1] * 8])
    pos = torch.stack([torch.zeros(24), torch.cat([torch.arange(4).repeat_interleave(4),
                                                   torch.arange(2).repeat_interleave(4)]),
                       torch.cat([torch.arange(4).repeat(4), torch.arange(4).repeat(2)])],
                      dim=-1)[None].long()
    txt = torch.randn(1, 8, 768, generator=g)
    txt_seg = torch.tensor([[0] * 5 + [1] * 3])
    txt_pos = torch.stack([torch.tensor([1, 2, 3, 4, 5, 1, 2, 3]), torch.zeros(8),
                           torch.zeros(8)], dim=-1)[None].long()
    t = torch.tensor([[0.3, 0.8]])
    return img, txt, t, seg, txt_seg, pos, txt_pos


def test_rewards_are_normalised_per_group_into_zero_one() -> None:
    raw = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [1.0, float("nan"), 0.0, 0.5]])
    r = normalise_rewards(raw, adv_clip=1.0)
    # group 0: mean 0.25, std 0.433: (1 - 0.25) / 0.433 = 1.73 -> clipped to 1 -> r = 1
    assert r[0, 0] == 1.0 and r[0, 1] == pytest.approx(0.5 + 0.5 * (-0.25 / 0.4330127))
    assert torch.equal(r[1], torch.full((4,), 0.5))  # all alike: no signal
    assert r[2, 1].isnan() and r[2, 0] == 1.0 and r[2, 2] == 0.0 and r[2, 3] == 0.5
    wide = normalise_rewards(raw[:1], adv_clip=4.0)  # Z = 4 std: nothing saturates
    assert 0.5 < wide[0, 0] < 1.0


def test_the_nft_loss_pulls_toward_good_samples_and_away_from_bad_ones() -> None:
    """At v = v_old (beta 1) the gradient is (2r - 1) times the plain flow-matching loss's:
    r = 1 descends the error, r = 0 ascends it, r = 1/2 leaves it."""
    target = torch.randn(24, 32)
    seg = torch.tensor([0] * 16 + [1] * 8)
    v_old = torch.randn(24, 32)
    plain = v_old.clone().requires_grad_(True)
    velocity_loss(plain, target, segment_ids=seg).backward()
    for r in (1.0, 0.0, 0.5, 0.8):
        v = v_old.clone().requires_grad_(True)
        loss, parts = nft_loss(v, v_old, v_old, target, torch.full((2,), r), seg, 1.0, 0.0)
        loss.backward()
        torch.testing.assert_close(v.grad, (2 * r - 1) * plain.grad)
        assert set(parts) == {"loss/positive", "loss/negative", "loss/kl"}


def test_lora_policy_merges_into_the_plain_model_and_switches_off() -> None:
    policy = NFTPolicy(tiny_denoiser(), rank=4, alpha=8, targets=["qkv", "out", "gate_up",
                                                                  "down"])
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    args = packed_inputs()
    base = policy(*args).detach()
    with torch.no_grad():
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    adapted = policy(*args).detach()
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(policy.base(*args), base)  # LoRA off: the base model
    torch.testing.assert_close(policy.old(*args), base)  # the old copy is still B = 0
    plain = merged(policy.denoiser)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(*args), adapted, atol=1e-5, rtol=1e-5)
    policy.update_old(0.0)
    torch.testing.assert_close(policy.old(*args), adapted, atol=1e-6, rtol=1e-6)
    with adapters_off(policy.denoiser):
        torch.testing.assert_close(policy(*args), base)


def test_lora_targets_that_match_nothing_are_named() -> None:
    with pytest.raises(ValueError, match="rl.lora_targets"):
        NFTPolicy(tiny_denoiser(), rank=4, alpha=8, targets=["no_such_layer"])


def test_the_shapes_judge_answers_each_rubric_and_integrity() -> None:
    scene = Scene((Obj("circle", "red", "small", 0.25, 0.5), Obj("star", "blue", "medium", 0.75,
                                                                 0.5)), "light grey", "plain")
    image = render(scene, 64, 64)
    rubrics = {"red_circle": {"kind": "count", "shape": "circle", "color": "red", "count": 1},
               "circle_left": {"kind": "relation", "a": {"shape": "circle", "color": None},
                               "type": "left of", "b": {"shape": "star", "color": "blue"}},
               "two": {"kind": "total", "count": 2},
               "green_star": {"kind": "color", "shape": "star", "color": "green"},
               "big_star": {"kind": "size", "shape": "star", "size": "large"},
               "red": {"kind": "present", "shape": None, "color": "red"}}
    check_rubrics(rubrics, "p0")
    spec = {"objects": [{"shape": "circle", "color": "red", "count": 1},
                        {"shape": "star", "color": None, "count": 1}], "relation": None}
    verdict = ShapesJudge().judge([image], [rubrics], [spec])[0]
    assert verdict.passed == {"red_circle": True, "circle_left": True, "two": True,
                              "green_star": False, "big_star": False, "red": True,
                              INTEGRITY: True}
    assert verdict.reward == pytest.approx(5 / 7)
    only_circle = {"objects": [{"shape": "circle", "color": None, "count": 1}],
                   "relation": None}
    stray = ShapesJudge().judge([image], [rubrics], [only_circle])[0]
    assert not stray.passed[INTEGRITY] and "stray blue star" in stray.reasons[INTEGRITY]
    smeared = image.filter(ImageFilter.GaussianBlur(3))
    assert not ShapesJudge().judge([smeared], [rubrics], [spec])[0].passed[INTEGRITY]


def test_ground_truth_renders_pass_integrity_and_a_blank_frame_has_nothing() -> None:
    judge = ShapesJudge()
    prompts = prompt_set(4, 0)
    images = [render(p.scene, 32, 32) for p in prompts]
    verdicts = judge.judge(images, [{"any": {"kind": "total", "count": 1}}] * len(prompts),
                           [p.spec for p in prompts])
    assert all(v.passed[INTEGRITY] for v in verdicts)
    blank = Image.new("RGB", (32, 32), (214, 214, 214))
    assert answer({"kind": "total", "count": 1}, ()) is False
    assert not judge.judge([blank], [{"red": {"kind": "present", "shape": None,
                                              "color": "red"}}], [None])[0].passed["red"]


def test_reward_hacking_is_flagged_when_gold_falls_as_the_reward_rises() -> None:
    from lens_model.train.rl import GoldLog

    log = GoldLog()
    log.train = [0.2, 0.2, 0.3, 0.5, 0.6, 0.7]
    log.gold = [(0, 0.40), (3, 0.38), (6, 0.30)]
    assert log.hacking(window=2)  # reward 0.2 -> 0.65, gold 0.40 -> 0.30
    assert log.mean_reward(2, last=False) == pytest.approx(0.2)
    log.gold[-1] = (6, 0.45)  # gold rose with the reward: learning, not hacking
    assert not log.hacking(window=2)
    log.gold[-1], log.train = (6, 0.30), [0.5] * 6  # both fell or stayed: no flag
    assert not log.hacking(window=2)
    restored = GoldLog()
    restored.load_state_dict(json.loads(json.dumps(log.state_dict())))  # through meta.json
    assert restored.gold == log.gold and restored.train == log.train


def test_bad_rubrics_are_named() -> None:
    with pytest.raises(RubricError, match="prompt 'p1' has no rubric"):
        check_rubrics({}, "p1")
    with pytest.raises(RubricError, match="rubric 'c'.*colour 'teal' is not in the shapes world"):
        check_rubrics({"c": {"kind": "color", "shape": "circle", "color": "teal"}}, "p2")
    with pytest.raises(RubricError, match="shape 'hexagon'"):
        check_rubrics({"n": {"kind": "count", "shape": "hexagon", "color": None, "count": 2}},
                      "p3")
    with pytest.raises(RubricError, match="at most 10"):
        check_rubrics({f"r{i}": {"kind": "total", "count": 1} for i in range(11)}, "p4")


# --- the whole program: N steps straight == resumed from the checkpoint at N/2 ---------------

def random_final(root: Path, recipe: Recipe, name: str) -> Path:
    """A random tiny model (seed 0) and VAE saved as a training final/ under ``root/name``."""
    torch.manual_seed(0)
    vae = SemanticVAE.tiny(latent_channels=8, downsample=4).eval()
    vae.save_pretrained(root / "vae")
    return save_final(root / name, tiny_denoiser(), recipe, str(root / "vae"), 0)


@pytest.fixture(scope="module")
def rl_inputs(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A random tiny model saved as a training final/, and a small RL prompt set."""
    root = tmp_path_factory.mktemp("rl")
    recipe = load_recipe("tiny", RL_SHORT)
    final = random_final(root, recipe, "pretrain")
    prompts = write_prompts(build_prompts(recipe), root / "prompts" / "prompts.parquet")
    return final, prompts, RL_SHORT


def _events(inputs, run: Path, nproc: int, more: tuple[str, ...] = ()) -> list[dict]:
    """The RL program on the fixture's model and prompts: one process, or ``nproc`` through
    torchrun (each rank rolls out its share of the prompt groups)."""
    final, prompts, short = inputs
    recipe = load_recipe("tiny", [*short, f"launch.nproc_per_node={nproc}", *more])
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    args = ["--params", str(run / "recipe.yaml"), "--model", str(final), "--prompts",
            str(prompts), "--run-dir", str(run)]
    return program_events("rl", args, run, nproc)


# one process: two updates on each rollout batch; two processes (slow): one
@pytest.mark.parametrize(("nproc", "k"), [(1, 2), pytest.param(2, 1, marks=pytest.mark.slow)])
def test_the_rl_program_resumed_at_half_matches_the_straight_run(rl_inputs, tmp_path,
                                                                 nproc, k) -> None:
    more = (f"rl.updates_per_rollout={k}",)
    straight, resumed = straight_and_resumed(lambda run: _events(rl_inputs, run, nproc, more),
                                             tmp_path)

    def weights(run: Path, name: str) -> dict[str, torch.Tensor]:
        return load_file(run / name)

    for name in ("final/transformer/diffusion_pytorch_model.safetensors",
                 "adapter/adapter.safetensors"):
        a, b = weights(tmp_path / "straight", name), weights(tmp_path / "resumed", name)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    def metrics(events: list[dict], step: int) -> dict:
        return [e["metrics"] for e in events if e.get("step") == step and "train/loss"
                in e.get("metrics", {})][-1]

    for step in (3, 4):  # the same prompts, rollouts, rewards, noise and timesteps
        for key in ("train/loss", "rl/reward", "rl/diversity"):
            assert metrics(resumed, step)[key] == pytest.approx(metrics(straight, step)[key],
                                                                abs=1e-6)
    assert metrics(resumed, 4)["compute/flops_total"] == metrics(straight, 4)["compute/flops_total"]
    if k == 2:  # step 2 updates again on step 1's rollouts, with no sampling booked
        first, again = metrics(straight, 1), metrics(straight, 2)
        assert again["rl/reward"] == first["rl/reward"] and first["rl/rollout_s"] > 0
        assert again["rl/rollout_s"] == 0 and again["train/loss"] != first["train/loss"]
    final = [e["final"] for e in straight if "final" in e][0]
    assert [g[0] for g in final["gold"]] == [0, 2, 4]  # the gold set before, during and after
    lens = json.loads((Path(final["model_dir"]) / "lens.json").read_text())
    assert lens["rl"]["rollout_cfg"] is None and lens["rl"]["steps"] == 4
    grids = sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir())
    assert grids == ["gold-step-00000000.png", "gold-step-00000002.png", "gold-step-00000004.png"]


def test_failed_judgements_are_counted_and_left_out_of_the_update(rl_inputs) -> None:
    """A VLM judge behind a (fake, real-HTTP) endpoint that answers two requests with broken
    JSON: those rollouts are counted as failed and left out, never scored 0."""
    import threading
    from contextlib import nullcontext

    from lens_model.rl.prompts import read_prompts
    from lens_model.rl.vlm_judge import OpenAIJudge
    from lens_model.train.rl import Rollouts, encode_prompts, load_parts
    from tests.fake_openai import FakeOpenAI

    final, prompts_path, short = rl_inputs
    lock, calls = threading.Lock(), []

    def handler(req: dict) -> str:
        with lock:
            calls.append(1)
            broken = len(calls) <= 2
        text = req["messages"][1]["content"][0]["text"]
        names = json.loads(text.split("\n", 1)[1].rsplit("\nAnswer", 1)[0])
        return "not json" if broken else json.dumps({n: 1 for n in names})

    recipe = load_recipe("tiny", short)
    denoiser, encoder, vae, _ = load_parts(final)
    prompts = [p for p in read_prompts(prompts_path) if p.split == "train"]
    policy = NFTPolicy(denoiser, 4, 8, ["qkv"])
    with FakeOpenAI(handler) as api:
        judge = OpenAIJudge(EndpointSection(base_url=api.base_url, model="fake", max_retries=0))
        source = Rollouts(policy, recipe, prompts, encode_prompts(encoder, prompts), vae, judge,
                          0, 1, 1, nullcontext)
        batch = next(iter(source))
    assert source.stats.metrics["rl/failed_judgements"] == 2.0
    assert len(batch.latents) == len(batch.rewards) == 2  # 2 groups x 2 images, 2 failed
    assert not batch.rewards.isnan().any()


# --- the mechanism: RL on one easy rubric moves its pass rate, either way -------------------

ONE = {"one": {"kind": "total", "count": 1}}  # the prompts below ask for one object each


class OneJudge:
    """One rubric, "exactly one object is drawn", or (``flip``) its negation."""

    def __init__(self, flip: bool = False) -> None:
        self.flip = flip

    def judge(self, images, rubrics, specs):
        out = []
        for image in images:
            one = answer(ONE["one"], read_scene(image)[1].objects)
            out.append(Verdict({"one": one != self.flip}, {"one": "judged"}))
        return out


def _pass_rate(policy, prompts, hidden, vae, recipe) -> float:
    """Share of held-out seeds' images (no CFG, 32x32) that pass the rubric."""
    from contextlib import nullcontext

    from lens_model.train.rl import sample_and_judge

    draws = [p for p in prompts for _ in range(8)]
    _, verdicts, _ = sample_and_judge(policy, draws, [hidden[p.prompt_id] for p in draws],
                                      [(32, 32)] * len(draws), [90_000 + i for i in
                                                                range(len(draws))],
                                      vae, OneJudge(), recipe, nullcontext)
    return sum(v.passed["one"] for v in verdicts) / len(verdicts)


# Rewarded: 100 steps at lr 1e-3. At lr 2e-3 one seed in four collapsed (the pass rate fell to
# 0 by step 100; a CI run fell from 0.13 to 0.04 at 60), and the gain at 60 steps spread from
# +0.22 to +0.51 over the RL seed alone. At 1e-3 over 100 steps four seeds gained +0.28 to
# +0.51 (from 0.18), so the test asks +0.2. Flipped, 15 steps at 2e-3 drop it to 0 - 0.06.
# The brief teacher's setup counts against the first test that uses it: the long timeout.
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("flip", "steps", "lr"), [(False, 100, 1e-3), (True, 15, 2e-3)])
def test_rl_on_one_rubric_moves_its_pass_rate(brief_teacher: BriefTeacher, tmp_path, flip,
                                               steps, lr) -> None:
    """RL on "exactly one object" (the prompts ask for one) raises its pass rate by at least
    0.2 on the prompts' held-out seeds; with the reward flipped it lowers it, at least by half
    (drawing nothing or clutter is easy)."""
    from lens_model.train.rl import encode_prompts, load_parts, train_rl

    recipe = load_recipe("tiny", [*BRIEF, f"rl.steps={steps}", f"rl.lr={lr}", "rl.sampler=euler",
                                  "rl.gold_every=1000", "rl.ckpt_every=1000",
                                  "rl.sizes=[32x32]"])
    texts = [f"a photo of {a} {s}" for s in SHAPES for a in ("a", "a red", "a big", "a blue")]
    prompts = [RLPrompt(f"p{i}", "train", "objects", "single", f"objects/single/{i}", text,
                        ("count",), ONE, None) for i, text in enumerate(texts)]
    brief_model = brief_teacher.model
    denoiser, encoder, vae, meta = load_parts(brief_model)
    hidden = encode_prompts(encoder, prompts)
    holder = torch.nn.Module()
    holder.denoiser = denoiser
    before = _pass_rate(holder, prompts, hidden, vae, recipe)
    policy = train_rl(recipe, tmp_path / "rl", denoiser, encoder, vae, prompts,
                      OneJudge(flip), meta["vae"], brief_model)
    after = _pass_rate(policy, prompts, hidden, vae, recipe)
    print(f"one-object share {before:.3f} -> {after:.3f} (flip={flip})")
    if flip:
        assert after <= before / 2 and after < before - 0.05, (before, after)
    else:
        assert after >= before + 0.2, (before, after)
