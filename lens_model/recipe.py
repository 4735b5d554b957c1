"""Recipes: one typed schema with a section per stage, loaded from ``configs/*.yaml``.

A recipe is refused, with the key and the allowed values named, when it carries an unknown
key or a bad value. ``--set section.key=value`` overrides apply before validation, and every
recipe has a stable hash (of its resolved, canonical JSON) that runs log as lineage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lens_model.buckets import buckets_for
from lens_model.data import world

CONFIG_DIR = Path(os.environ.get("LENS_CONFIG_DIR")
                  or Path(__file__).resolve().parents[1] / "configs")
ASPECT_RATIOS_1_2_TO_2_1 = ["1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1"]


# data-section keys that say how a dataset is built, not what it holds
EXECUTION_KEYS = ("task_runner", "workers", "dask_address")


def _digest(tree: Any) -> str:
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def parse_pair(text: str, what: str, form: str) -> tuple[int, int]:
    """"96x48" -> (96, 48); the one parser of every AxB argument (sizes, NODESxGPUS)."""
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected {form}") from None
    return a, b


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContractSection(Section):
    """The data contract's thresholds (checked by the Great Expectations suite)."""

    min_area: int = Field(384 * 384, ge=1, description="minimum width*height in pixels")
    aspect_min: float = Field(0.5, gt=0)
    aspect_max: float = Field(2.0, gt=0)
    caption_words_min: int = Field(30, ge=1)
    caption_words_max: int = Field(400, ge=1)
    caption_mean_min: float = Field(90.0, ge=0)
    caption_mean_max: float = Field(130.0, ge=0)
    blur_min: float = Field(30.0, ge=0, description="Laplacian variance of the grey image")
    entropy_min: float = Field(3.0, ge=0, description="grey-histogram entropy, bits")
    luminance_min: float = Field(0.04, ge=0, le=1)
    luminance_max: float = Field(0.96, ge=0, le=1)
    tokenizer: str = Field("minilm", description="tokenizer counting caption tokens")
    max_tokens: int = Field(512, ge=1, description="the text encoder's maximum length")
    max_truncation_rate: float = Field(0.01, ge=0, le=1)
    max_rejection_rate: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> ContractSection:
        for lo, hi in [("aspect_min", "aspect_max"),
                       ("caption_words_min", "caption_words_max"),
                       ("caption_mean_min", "caption_mean_max"),
                       ("luminance_min", "luminance_max")]:
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} must be <= {hi}")
        return self


class DataSection(Section):
    """Where samples come from, how they are sharded, and which task runner maps over shards."""

    source: Literal["shapes", "ingest"] = "shapes"
    ingest_paths: list[str] = Field(default_factory=list)
    num_samples: int = Field(512, ge=1)
    samples_per_shard: int = Field(128, ge=1)
    min_objects: int = Field(1, ge=1, le=4)
    max_objects: int = Field(4, ge=1, le=4)
    # The shapes world's backgrounds and patterns to draw from (all by default). Tiny models
    # narrow them: short captions never name the background, so a model asked for "a red
    # circle" averages every background it has seen into a blur with stray colour.
    backgrounds: list[str] = Field(default_factory=lambda: list(world.BACKGROUNDS),
                                   min_length=1)
    patterns: list[str] = Field(default_factory=lambda: list(world.PATTERNS), min_length=1)
    task_runner: Literal["threads", "dask"] = "threads"
    workers: int = Field(2, ge=1)
    dask_address: str | None = Field(None, description="tcp://host:8786 of a running scheduler")
    contract: ContractSection = Field(default_factory=ContractSection)

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        world.check_world(self.backgrounds, self.patterns)
        if self.source == "ingest" and not self.ingest_paths:
            raise ValueError("source 'ingest' needs ingest_paths (folders, .tar or .parquet)")
        return self


class BucketsSection(Section):
    """Resolution buckets: base areas (as sides) x aspect ratios, snapped to a size multiple."""

    base_sizes: list[int] = Field(default_factory=lambda: [512, 768, 1024], min_length=1)
    aspect_ratios: list[str] = Field(default_factory=lambda: list(ASPECT_RATIOS_1_2_TO_2_1))
    multiple: int = Field(32, ge=1)
    token_px: int = Field(16, ge=1, description="pixels per token side: VAE factor x patch")

    @model_validator(mode="after")
    def _check(self) -> BucketsSection:
        for ratio in self.aspect_ratios:
            parts = ratio.split(":")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"aspect ratio {ratio!r} must look like 'W:H', e.g. '16:9'")
        return self


class LoaderSection(Section):
    """Packed mixed-resolution batches."""

    token_budget: int = Field(24576, ge=1, description="image tokens per packed batch")
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1024, ge=1, description="samples packed together")


class ModelSection(Section):
    """The backbone: a preset of lens_model/config.py."""

    preset: str = Field("tiny", description="tiny | toy | lens-3.8b (lens_model.config)")
    pooled_text: bool = Field(False, description="add each sample's mean text token to the "
                              "adaLN input (not in the paper; see lens_model/transformer.py)")


class TextEncoderSection(Section):
    """A frozen language model: hidden states of chosen layers -> RMSNorm -> concat -> linear."""

    path: str = Field("minilm", description="'minilm' (shipped) or a local HF model folder")
    layers: list[int] = Field(default_factory=lambda: [5, 11, 17, 23], min_length=1)
    max_length: int = Field(512, ge=1)
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="the frozen LM's weights as "
                                           "loaded: bf16 halves a 20B encoder's memory")


class VaeSection(Section):
    """The semantic VAE: a pretrained one by path, or a small one trained as a stage."""

    source: Literal["pretrained", "train"] = "pretrained"
    path: str | None = Field(None, description="folder of a pretrained AutoencoderKLFlux2")
    latent_channels: int = Field(32, ge=1)
    downsample: int = Field(8, ge=1, description="pixels per latent cell")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="a pretrained VAE's weights "
                                           "when pretraining encodes online (trained: fp32)")
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    decay_frac: float = Field(0.0, ge=0, lt=1, description="linear LR cooldown to 0 over this "
                              "share of the steps; 0: constant")
    kl_weight: float = Field(1e-6, ge=0)
    # MSE, not L1: on the flat-coloured shapes world L1 settles on washed-out colours (the
    # tiny VAE's eval ceiling was 0.13 overall with L1, about 0.6 with MSE at 450 steps).
    loss: Literal["l1", "mse"] = "mse"
    token_budget: int | None = Field(None, ge=1, description="tokens per VAE training batch "
                                     "(images x token_px^2 px); default loader.token_budget")
    crop: int | None = Field(None, ge=1, description="train on random crop x crop windows, one "
                             "stack a step; none: whole images, one pass per bucket size")

    @model_validator(mode="after")
    def _check(self) -> VaeSection:
        if self.source == "pretrained" and not self.path:
            raise ValueError("source 'pretrained' needs path (a local AutoencoderKLFlux2 folder)")
        if self.crop is not None and self.crop % self.downsample:
            raise ValueError(f"crop {self.crop} must be a multiple of downsample "
                             f"{self.downsample}; use "
                             f"{max(self.downsample, self.crop - self.crop % self.downsample)}")
        return self


class PretrainSection(Section):
    """Rectified-flow pretraining through DeepSpeed."""

    steps: int = Field(1000, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    decay_frac: float = Field(0.0, ge=0, lt=1, description="linear LR cooldown to 0 over "
                              "this share of the steps (warmup-stable-decay); 0: constant")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_device: Literal["same", "cpu"] = Field("same", description="where the fp32 EMA "
                                               "shadow lives: beside the weights, or in host "
                                               "memory (4 bytes a parameter off each GPU)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches a step: "
                                             "global batch = micro-batch x this x ranks")
    init_from: str | None = Field(None, description="a recipe whose pretraining this one "
                                  "continues from its final weights (the paper's stage 2 "
                                  "after stage 1); trained first if it has not been")
    # Not 3: rank 0 reads whole weights for EMA, sample grids and the saved model. The
    # engine itself trains ZeRO-3 (infra/deepspeed/zero3.json, tests/test_engine.py).
    zero_stage: Literal[0, 1, 2] = 2
    precision: Literal["fp32", "bf16"] = "bf16"
    grad_checkpointing: bool = True
    ckpt_every: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    sample_every: int = Field(1000, ge=1, description="steps between fixed-prompt sample grids")
    snapshots: bool = Field(False, description="also save the EMA model at every sample_every "
                            "step (RUN/snapshots/), for learning curves")
    log_every: int = Field(10, ge=1)
    features: Literal["cached", "online"] = Field("cached", description="precomputed or live")
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="chance a sample trains with no text at all, what an "
        "empty (negative) prompt gives at inference: the unconditional branch of CFG")
    short_caption_prob: float = Field(
        0.0, ge=0, le=1, description="chance a sample trains on its short caption, where it has "
        "one (caption mixing); 0 trains on long captions only, as the paper does; 1 never "
        "reads long captions, so the feature cache does not encode them")
    timestep_mean: float = 0.0
    timestep_std: float = Field(1.0, gt=0)
    mu_base_tokens: int = Field(256, ge=1, description="mu rule: mu_base at this token count")
    mu_base: float = 1.0
    mu_max_tokens: int = Field(4096, ge=1)
    mu_max: float = 1.3

    @property
    def decay_steps(self) -> int:
        """Cooldown steps: a share of ``steps``, never eating into warmup (so a short run from
        ``--set pretrain.steps=6`` just trains without one)."""
        return min(round(self.decay_frac * self.steps), max(0, self.steps - self.warmup_steps))

    def mu_rule(self) -> dict[str, float]:
        """The resolution-shift rule, as keyword arguments of ``flow_matching.shift_mu``."""
        return {"base_tokens": self.mu_base_tokens, "base_mu": self.mu_base,
                "max_tokens": self.mu_max_tokens, "max_mu": self.mu_max}


class EndpointSection(Section):
    """An OpenAI-compatible chat endpoint (vLLM, Ollama, a hosted model). The key is read from
    the environment variable ``key_variable``, never from the recipe."""

    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1; default "
                                 "$LENS_LLM_BASE_URL")
    model: str | None = Field(None, description="model name; default $LENS_LLM_MODEL")
    key_variable: str = "LENS_LLM_API_KEY"
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(2, ge=0, description="retries after the first try, then fail")


class RLSection(Section):
    """RL post-training: DiffusionNFT (arXiv 2509.16117) on a LoRA adapter, rubric rewards."""

    taxonomy: str = Field("shapes", description="configs/taxonomy/NAME.yaml or a path")
    prompt_backend: Literal["grammar", "openai"] = "grammar"
    judge: Literal["verifier", "openai"] = "verifier"
    endpoint: EndpointSection = Field(default_factory=EndpointSection)
    num_prompts: int = Field(512, ge=2, description="prompts written, train and gold together")
    gold_frac: float = Field(0.2, gt=0, lt=1, description="share of taxonomy items held out "
                             "as the gold set (never trained on)")
    min_dimensions: int = Field(1, ge=1, le=5)
    max_dimensions: int = Field(4, ge=1, le=5)
    steps: int = Field(180, ge=1, description="RL updates (optimizer steps); a rollout batch is "
                       "drawn every updates_per_rollout of them")
    updates_per_rollout: int = Field(1, ge=1, description="updates on each rollout batch, each "
                                     "with fresh noise and timesteps, all against the old "
                                     "policy that drew it")
    groups: int = Field(48, ge=1, description="prompt groups per step")
    group_size: int = Field(24, ge=2, description="images per prompt (one group)")
    sample_steps: int = Field(10, ge=1, description="rollout sampler steps")
    sampler: Literal["euler", "heun"] = "heun"
    sizes: list[str] = Field(default_factory=list, description="rollout sizes WxH; empty: "
                             "the recipe's buckets")
    lora_rank: int = Field(64, ge=1)
    lora_alpha: int = Field(128, ge=1)
    lora_targets: list[str] = Field(default_factory=lambda: ["qkv", "out", "gate_up", "down"],
                                    min_length=1, description="Linear layers that get LoRA")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    beta: float = Field(1.0, gt=0, description="NFT: implicit policies (1 -+ beta) v_old "
                        "+- beta v")
    adv_clip: float = Field(2.0, gt=0, description="Z = adv_clip * group std: advantages beyond "
                            "adv_clip standard deviations saturate")
    kl_weight: float = Field(1e-4, ge=0, description="velocity MSE to the frozen base model")
    old_decay: float = Field(0.0, ge=0, lt=1, description="old <- d old + (1 - d) policy after "
                             "each step; 0: the old policy is the rollout policy (on-policy)")
    zero_stage: Literal[0, 1, 2] = 0
    precision: Literal["fp32", "bf16"] = "bf16"
    nnodes: int | None = Field(None, ge=1, description="nodes of a rendered cluster job; none: "
                               "launch.nnodes")
    ckpt_every: int = Field(20, ge=1)
    keep_last: int = Field(2, ge=1)
    gold_every: int = Field(20, ge=1, description="steps between gold-set evaluations")
    gold_prompts: int = Field(64, ge=1, description="gold prompts drawn at each evaluation")
    log_every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> RLSection:
        if self.min_dimensions > self.max_dimensions:
            raise ValueError("min_dimensions must be <= max_dimensions")
        k = self.updates_per_rollout
        for name in ("steps", "ckpt_every"):  # a resume must start a rollout batch afresh
            if getattr(self, name) % k:
                raise ValueError(f"rl.{name}={getattr(self, name)} is not a multiple of "
                                 f"rl.updates_per_rollout={k}; make it one, so that every "
                                 f"checkpoint falls between two rollout batches")
        for size in self.sizes:
            w, h = parse_pair(size, "rl.sizes entry", "WxH, e.g. 32x32")
            if w <= 0 or h <= 0:
                raise ValueError(f"rl.sizes entry {size!r}: both sides must be positive")
        return self


class SearchSection(Section):
    """The training-free search over the reasoner's system prompt (flows/reasoner_search.py)."""

    optimiser: Literal["edit", "openai"] = Field("edit", description="edit: add, drop, swap "
                                                 "and reword the rule library's sentences; "
                                                 "openai: an LLM at reasoner.endpoint")
    seed_prompt: str = Field(
        "You rewrite requests for a picture of simple shapes into a prompt for the image model."
        "\nUse the plain names of the colours and shapes.", min_length=1)
    candidates_per_round: int = Field(4, ge=1)
    patience: int = Field(2, ge=1, description="rounds without a better candidate, then stop")
    max_rounds: int = Field(6, ge=1)
    dev_per_category: int = Field(4, ge=1, description="dev prompts per category, from "
                                  "shapes-GenEval and shapes-GenEval-R each")
    dev_seed: int = Field(1, description="the dev prompts' seed; prompts that the evaluation's "
                          "test split holds are dropped from dev")
    test_per_category: int = Field(20, ge=1, description="test-split prompts per category "
                                   "the winner is reported on (the first of eval's, at most "
                                   "eval.prompts_per_category)")


class ReasonerSection(Section):
    """The prompt rewriter: a chat LM whose system prompt is searched (lens_model/reasoner)."""

    backend: Literal["train", "hf", "openai"] = Field(
        "train", description="train: a small causal LM the pipeline trains on the world's "
        "rules; hf: any Hugging Face causal LM at reasoner.path; openai: reasoner.endpoint")
    path: str | None = Field(None, description="the model folder (backend hf)")
    endpoint: EndpointSection = Field(default_factory=EndpointSection)
    max_new_tokens: int = Field(64, ge=1)
    max_system_chars: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1, description="prompts rewritten at once")
    vocab_size: int = Field(1000, ge=261, description="the trained LM's byte-level BPE")
    hidden_size: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    steps: int = Field(1500, ge=1)
    train_batch: int = Field(32, ge=1, description="chats per step")
    turns: int = Field(4, ge=1, description="user prompts per chat under one system prompt")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    heldout_examples: int = Field(256, ge=1, description="held-out chats scored for "
                                  "rule following (unseen prompts under unseen rule sets)")
    log_every: int = Field(25, ge=1)
    search: SearchSection = Field(default_factory=SearchSection)


class DistillSection(Section):
    """Lens-Turbo: the teacher distilled into a few-step, CFG-free student (lens_model/distill):
    Decoupled-DMD (arXiv 2511.22677) with a GAN branch, TTUR and IDA. Defaults are the Lens
    paper's."""

    steps: int = Field(1000, ge=1, description="student updates")
    student_steps: int = Field(4, ge=1, description="sampler steps the student draws in")
    sigmas: list[float] = Field(default_factory=list, description="the student's fixed noise "
                                "levels, first 1.0, decreasing, one per step; empty: the "
                                "teacher's Euler schedule at eval.size, fixed at distill time")
    guidance: float = Field(5.0, ge=1, description="the CFG scale the CA term bakes in")
    ca_weight: float = Field(1.0, ge=0)
    dm_weight: float = Field(1.0, ge=0)
    ca_t_range: tuple[float, float] = Field((0.02, 0.98), description="the CA term's "
                                            "re-noising timesteps: uniform in this range")
    ca_above_step: bool = Field(True, description="CA re-noises above the student step's own "
                                "noise level (within ca_t_range), as Decoupled DMD motivates")
    ttur: int = Field(4, ge=1, description="fake-score and discriminator updates per "
                      "student update")
    ida_mu: float = Field(0.03, ge=0, le=1, description="fake <- (1 - mu) fake + mu student "
                          "after each student update")
    lr: float = Field(5e-7, gt=0, description="student and fake-score learning rate")
    disc_lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.0, 0.9)
    grad_clip: float = Field(1.0, gt=0)
    lambda_d: float = Field(0.1, ge=0, description="the discriminator loss's weight in the "
                            "critic update")
    lambda_g: float = Field(0.001, ge=0, description="the adversarial loss's weight in the "
                            "student update")
    r1_gamma: float = Field(1.0, ge=0)
    r1_perturb: float = Field(0.1, ge=0, description="std of the approximate R1 perturbation")
    disc_block: int = Field(-1, description="the teacher block whose image tokens the "
                            "discriminator reads; negative counts from the last")
    num_samples: int = Field(100_000, ge=1, description="the balanced subset's size: "
                             "dataset rows, spread evenly over the buckets")
    batch: int = Field(4, ge=1, description="samples per student update and rank")
    zero_stage: Literal[0, 1, 2] = 0
    precision: Literal["fp32", "bf16"] = "bf16"
    ckpt_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DistillSection:
        lo, hi = self.ca_t_range
        if not 0 < lo < hi < 1:
            raise ValueError(f"distill.ca_t_range {list(self.ca_t_range)}: give [low, high] "
                             f"with 0 < low < high < 1")
        s = self.sigmas
        if s and (len(s) != self.student_steps or s[0] != 1.0
                  or any(b >= a for a, b in zip(s, s[1:], strict=False)) or s[-1] <= 0):
            raise ValueError(f"distill.sigmas {s}: give {self.student_steps} noise levels "
                             f"(distill.student_steps), the first 1.0, strictly decreasing and "
                             f"above 0; or leave it empty for the teacher's Euler schedule")
        return self


class LaunchSection(Section):
    """Where pretraining runs: one process, torchrun on N processes, or several nodes."""

    device: Literal["cpu", "cuda"] = "cuda"
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, ge=1, le=65535)
    image: str = Field("lens-platform:0.1.0", description="container image for k8s/slurm "
                       "(the one lens/services.py ServiceSettings names)")
    gpu_type: Literal["A100", "H100", "H800", "none"] = "H100"


class TrackingSection(Section):
    experiment: str = "lens"
    model_name: str = Field("lens", description="registered model name in the MLflow registry")


class EvalSection(Section):
    """Shapes-GenEval's fixed protocol (lens_model.eval.geneval): prompts, seeds, sampling."""

    prompts_per_category: int = Field(20, ge=1)
    prompt_seed: int = 0
    size: str = Field("32x32", pattern=r"^[1-9][0-9]*x[1-9][0-9]*$", description="WxH")
    steps: int = Field(20, ge=1)
    cfg: float = Field(4.0, ge=0)
    sampler: Literal["euler", "heun"] = "euler"
    seed: int = 0


class GatesSection(Section):
    """What a candidate must show before it takes the champion alias."""

    min_overall: float = Field(0.0, ge=0, le=1, description="minimum overall eval score")
    max_regression: float = Field(0.05, ge=0, le=1,
                                  description="largest drop in any category vs the champion")
    max_latency_s: float = Field(10.0, gt=0, description="seconds per image at eval settings")
    min_teacher_share: float = Field(0.95, ge=0, le=1, description="a distilled model's overall "
                                     "score as a share of its teacher's, at least")


class Recipe(Section):
    name: str
    seed: int = 0
    data: DataSection = Field(default_factory=DataSection)
    buckets: BucketsSection = Field(default_factory=BucketsSection)
    loader: LoaderSection = Field(default_factory=LoaderSection)
    model: ModelSection = Field(default_factory=ModelSection)
    text_encoder: TextEncoderSection = Field(default_factory=TextEncoderSection)
    vae: VaeSection = Field(default_factory=lambda: VaeSection(source="train"))
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    rl: RLSection = Field(default_factory=RLSection)
    reasoner: ReasonerSection = Field(default_factory=ReasonerSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    gates: GatesSection = Field(default_factory=GatesSection)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.vae.source == "train" and self.vae.crop is not None:
            side = min(min(b.width, b.height) for b in buckets_for(self.buckets))
            if self.vae.crop > side:
                raise ValueError(f"vae.crop {self.vae.crop} is larger than the smallest bucket "
                                 f"side, {side} px; set vae.crop to at most {side}")
        return self

    def hash(self) -> str:
        """Stable 12-hex hash of the resolved recipe."""
        return _digest(self.model_dump(mode="json"))

    def train_hash(self) -> str:
        """Hash of what decides the pretrained weights: all but evaluation, gates, tracking and
        the post-training stages, so changing those reuses the trained stages."""
        return _digest(self.model_dump(mode="json", exclude={"eval", "gates", "tracking", "rl",
                                                            "reasoner", "distill"}))

    def rl_hash(self) -> str:
        """Hash of what decides the RL model: the pretrained weights' inputs and the rl section."""
        return _digest({"train": self.train_hash(), "rl": self.rl.model_dump(mode="json")})

    def distill_hash(self) -> str:
        """Hash of what decides the turbo model: the teacher's inputs and the distill section."""
        return _digest({"rl": self.rl_hash(), "distill": self.distill.model_dump(mode="json")})

    def data_hash(self) -> str:
        """Hash of what decides the dataset's content: not how many workers build it."""
        data = self.data.model_dump(mode="json")
        for key in EXECUTION_KEYS:
            data.pop(key)
        return _digest({"seed": self.seed, "data": data,
                        "buckets": self.buckets.model_dump(mode="json")})

    def to_yaml(self) -> str:
        """The resolved recipe as YAML: what a trainer process and DVC's params.yaml read."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``section.key -> value`` for logging as params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model that owns the field at ``loc`` (for listing allowed keys)."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _explain(err: ValidationError, source: str) -> RecipeError:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int))
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            allowed = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"unknown key '{key}'; allowed keys here: {allowed}")
        elif e["type"] == "literal_error":
            lines.append(f"{key}: got {e['input']!r}; allowed values: {e['ctx']['expected']}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return RecipeError(f"recipe {source} is invalid:\n  " + "\n  ".join(lines))


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected section.key=value, "
                          "e.g. data.num_samples=64")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {assignment!r}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw)


def resolve_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise RecipeError(f"unknown recipe {str(name_or_path)!r}; known recipes: {', '.join(known)} "
                      f"(or pass a path to a .yaml file)")


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``, nested dicts merged key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's mapping; ``extends: NAME`` merges it over that recipe's."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(tree).__name__}")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    base_path = resolve_path(base)
    if base_path in (*chain, path):
        names = " -> ".join(p.stem for p in (*chain, path, base_path))
        raise RecipeError(f"recipe {path}: 'extends' loops ({names}); make one of them stand "
                          f"alone")
    inherited = _read_tree(base_path, (*chain, path))
    inherited.pop("name", None)  # a recipe is named for its own file unless it says otherwise
    return merged(inherited, tree)


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe by name (``configs/NAME.yaml``) or path, apply overrides, validate."""
    path = resolve_path(name_or_path)
    tree = _read_tree(path)
    tree.setdefault("name", path.stem)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc, str(path)) from None
