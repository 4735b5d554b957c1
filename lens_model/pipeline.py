"""``LensPipeline``: text-to-image inference with a trained Lens model, as a diffusers pipeline.

Components: ``transformer`` (:class:`LensTransformer2DModel`), ``vae`` (``AutoencoderKLFlux2``
with its BatchNorm statistics), ``text_encoder`` and ``tokenizer`` (the frozen Hugging Face LM),
``connector`` (:class:`TextConnector`) and ``scheduler`` (``FlowMatchEulerDiscreteScheduler``).
Config values: the LM ``layers`` read and ``max_length``, and ``trained_areas`` (the pixel
areas w * h of the trained base sizes). The language-encoder logic (layer selection, chat
template for causal LMs, empty prompt = masked zeros) is :class:`LanguageEncoder`'s, rebuilt
around the loaded components, so a saved pipeline needs no path to the original LM.

Sampling is what training's sample grids run (``denoiser.sample_latents``): sigmas
linspace(1, 1/N, N) shifted by mu = ``shift_mu(image tokens)``, then 0. The mu rule lives in the
scheduler's config (``base_shift``/``max_shift`` at ``base_image_seq_len``/``max_image_seq_len``
tokens, exponential dynamic shifting), and the schedule comes from ``scheduler.set_timesteps``,
which gives the same sigmas as ``flow_matching.euler_sigmas``. The integration itself is
``flow_matching.flow_sample`` (Euler or Heun), not ``scheduler.step``, so both samplers and CFG
match the training code. CFG runs cond and uncond as one batch of 2B and rescales each latent
cell to the conditional velocity's norm; ``guidance_scale <= 1`` skips it. (Rescaling whole 2x2
transformer tokens instead scored lower on the tiny and small models, so the finer rescale
stays: docs/experiments.md, "CFG rescale: per latent cell".)

A distilled (turbo) model carries its fixed noise levels in the config (``turbo_sigmas``, from
``lens.json["turbo"]``): it draws in exactly that many steps, without CFG by default.

Each image's noise comes from its own generator (``seed[i]``), so an image does not depend on
the batch it was generated in.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLFlux2, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from safetensors.torch import load_file
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens_model import safe_load
from lens_model.denoiser import _pad  # the padding sample_latents applies
from lens_model.flow_matching import VelocityFn, flow_sample, shift_mu
from lens_model.recipe import PretrainSection, parse_pair
from lens_model.text_encoder import DTYPES, LanguageEncoder, TextConnector
from lens_model.transformer import LensTransformer2DModel, UnpackedLayout
from lens_model.vae import SemanticVAE

DEFAULT_MU_RULE = PretrainSection().mu_rule()  # the recipe's default rule
MAX_ASPECT = 2.0  # trained aspect ratios span 1:2 to 2:1
SAMPLERS = {"euler": 1, "heun": 2}
OUTPUT_TYPES = ("pil", "pt", "latent")


@dataclass
class LensPipelineOutput(BaseOutput):
    """``images``: PIL images, a (B, 3, H, W) tensor in [0, 1] ("pt"), or normalised latents
    (B, C, h, w) ("latent"). ``flags``: warnings about the request by name, e.g. "oversize"
    or "truncated".
    ``prompts``: what was drawn, the reasoner's rewrites when one was used."""

    images: list[PIL.Image.Image] | Tensor
    flags: dict[str, str]
    prompts: list[str]


def parse_size(size: str) -> tuple[int, int]:
    """"96x48" -> (96, 48): width x height."""
    return parse_pair(size, "size", "WIDTHxHEIGHT in pixels, e.g. 96x48")


def check_aspect(width: int, height: int) -> None:
    """Reject sizes outside the trained aspect range, 1:2 to 2:1."""
    if width <= 0 or height <= 0:
        raise ValueError(f"size {width}x{height}: both sides must be positive")
    ratio = width / height
    if ratio > MAX_ASPECT or ratio < 1 / MAX_ASPECT:
        short = min(width, height)
        hint = f"{2 * short}x{short}" if ratio > 1 else f"{short}x{2 * short}"
        raise ValueError(f"size {width}x{height} has aspect ratio {ratio:.3g}; Lens supports "
                         f"aspect ratios from 1:2 to 2:1 (e.g. {hint})")


def check_size(width: int, height: int, multiple: int) -> None:
    """Sides must be multiples of ``multiple`` px (one token) and the aspect in 1:2..2:1."""
    check_aspect(width, height)
    if width % multiple or height % multiple:
        raise ValueError(f"size {width}x{height}: each side must be a multiple of {multiple} px "
                         f"(one latent token); nearest valid sizes: "
                         f"{', '.join(_nearest_sizes(width, height, multiple))}")


def _nearest_sizes(width: int, height: int, multiple: int) -> list[str]:
    """The valid sizes with each side rounded down or up to ``multiple``, nearest first."""
    def near(x: int) -> list[int]:
        return sorted({max(multiple, x // multiple * multiple), -(-x // multiple) * multiple})

    sizes = [(w, h) for w in near(width) for h in near(height)
             if 1 / MAX_ASPECT <= w / h <= MAX_ASPECT]
    sizes.sort(key=lambda s: abs(s[0] - width) + abs(s[1] - height))
    return [f"{w}x{h}" for w, h in sizes] or [f"{multiple}x{multiple}"]


def make_scheduler(mu_rule: dict[str, float] | None = None) -> FlowMatchEulerDiscreteScheduler:
    """A scheduler whose dynamic (exponential) shift is the recipe's mu rule, as ``shift_mu``
    keyword arguments (``PretrainSection.mu_rule``); None: the recipe defaults."""
    rule = {**DEFAULT_MU_RULE, **(mu_rule or {})}
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, time_shift_type="exponential",
        base_shift=float(rule["base_mu"]), max_shift=float(rule["max_mu"]),
        base_image_seq_len=int(rule["base_tokens"]), max_image_seq_len=int(rule["max_tokens"]))


class LensPipeline(DiffusionPipeline):
    """Prompts -> images with a Lens MMDiT, its text connector and the semantic VAE."""

    model_cpu_offload_seq = "text_encoder->connector->transformer->vae"

    def __init__(self, transformer: LensTransformer2DModel, vae: AutoencoderKLFlux2,
                 text_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 connector: TextConnector, scheduler: FlowMatchEulerDiscreteScheduler,
                 layers: list[int] | None = None, max_length: int = 512,
                 trained_areas: list[int] | None = None,
                 turbo_sigmas: list[float] | None = None) -> None:
        super().__init__()
        if not layers:
            raise ValueError("LensPipeline needs layers: the LM hidden_states indices the "
                             "connector was trained on (lens.json text_encoder.layers)")
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, connector=connector, scheduler=scheduler)
        self.register_to_config(layers=[int(i) for i in layers], max_length=int(max_length),
                                trained_areas=sorted(int(a) for a in trained_areas or []),
                                turbo_sigmas=[float(s) for s in turbo_sigmas or []] or None)
        self._check_components()
        self._encoder: LanguageEncoder | None = None
        self.rewriter: Any = None  # a reasoner.attached.PromptRewriter saved with the model

    # --- construction ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path,
                        **kwargs: Any) -> LensPipeline:
        """diffusers' loader, safetensors only: a saved pipeline folder holding any pickle file
        (which Lens never writes) is refused, and no component may fall back to pickles."""
        what = "LensPipeline"
        safe_load.refuse_pickle_path(pretrained_model_name_or_path, what)
        safe_load.refuse_pickles(pretrained_model_name_or_path, what)
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"{what}.from_pretrained(use_safetensors=False): Lens loads "
                             "weights from safetensors only; drop the argument")
        kwargs["use_safetensors"] = True
        pipe = super().from_pretrained(str(pretrained_model_name_or_path), **kwargs)
        if Path(pretrained_model_name_or_path).is_dir():
            from lens_model.reasoner.attached import load_attached  # heavy; only when saved

            pipe.rewriter = load_attached(pretrained_model_name_or_path)
        return pipe

    @classmethod
    def from_training(cls, final_dir: str | Path,
                      dtype: torch.dtype | None = None) -> LensPipeline:
        """A pipeline from a pretraining run's ``final/`` folder (``pretrain.save_final``)."""
        final = Path(final_dir).expanduser()
        meta_path = final / "lens.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{final} has no lens.json; pass a pretraining run's final/ "
                                    "folder (RUN/final, written by save_final)")
        safe_load.refuse_pickles(final, "training final/ folder")
        meta = json.loads(meta_path.read_text())
        transformer = LensTransformer2DModel.from_pretrained(
            str(final / "transformer"), dtype=dtype, use_safetensors=True)
        vae_path = _locate(meta["vae"], final)
        vae = SemanticVAE.from_pretrained(vae_path, dtype=dtype).model  # safetensors only
        spec = meta["text_encoder"]
        cfg = transformer.config
        # the LM as its recipe loaded it (bf16 for a 20B encoder) unless a dtype is asked for
        encoder = LanguageEncoder.from_spec(spec["path"], list(spec["layers"]),
                                            cfg.text_dim or cfg.width, int(spec["max_length"]),
                                            dtype=dtype or DTYPES.get(spec.get("dtype", "")))
        connector = encoder.connector
        connector.load_state_dict(load_file(str(final / "connector.safetensors")))
        if dtype is not None:  # nn.Module.to: ModelMixin.to warns on every dtype cast
            torch.nn.Module.to(connector, dtype)
        return cls(transformer=transformer, vae=vae, text_encoder=encoder.lm,
                   tokenizer=encoder.tokenizer, connector=connector,
                   scheduler=make_scheduler(meta.get("mu_rule")), layers=list(spec["layers"]),
                   max_length=int(spec["max_length"]), trained_areas=meta.get("trained_areas"),
                   turbo_sigmas=(meta.get("turbo") or {}).get("sigmas"))

    def _check_components(self) -> None:
        """Catch mismatched parts at load time, not mid-sampling."""
        hidden = int(self.text_encoder.config.get_text_config().hidden_size)
        cc, tc = self.connector.config, self.transformer.config
        if cc.n_layers != len(self.config.layers) or cc.hidden != hidden:
            raise ValueError(f"connector takes {cc.n_layers} layers x {cc.hidden}, but the "
                             f"pipeline reads layers {self.config.layers} of a {hidden}-wide LM")
        if cc.width != (tc.text_dim or tc.width):
            raise ValueError(f"connector width {cc.width} != transformer text_dim "
                             f"{tc.text_dim or tc.width}")
        if self.vae.config.latent_channels != tc.in_channels:
            raise ValueError(f"VAE has {self.vae.config.latent_channels} latent channels, the "
                             f"transformer takes {tc.in_channels}")
        sc = self.scheduler.config
        if not sc.use_dynamic_shifting or sc.time_shift_type != "exponential" or any(
                sc.get(k) for k in ("shift_terminal", "use_karras_sigmas",
                                    "use_exponential_sigmas", "use_beta_sigmas",
                                    "invert_sigmas")):
            raise ValueError("the scheduler must use exponential dynamic shifting and no other "
                             "sigma transform (build it with lens_model.pipeline.make_scheduler)")

    # --- parts ---------------------------------------------------------------------------

    @property
    def encoder(self) -> LanguageEncoder:
        """:class:`LanguageEncoder` around this pipeline's LM, tokenizer and connector."""
        enc = self._encoder
        if enc is None or enc.lm is not self.text_encoder or enc.tokenizer is not self.tokenizer \
                or enc.connector is not self.connector:
            source = Path(getattr(self.text_encoder, "name_or_path", "") or ".")
            with torch.device("meta"):  # its own fresh connector is replaced: don't init one
                enc = LanguageEncoder(self.text_encoder, self.tokenizer, list(self.config.layers),
                                      self.connector.config.width, self.config.max_length, source)
            enc.connector = self.connector
            self._encoder = enc
        return enc

    @property
    def semantic_vae(self) -> SemanticVAE:
        return SemanticVAE(self.vae)

    @property
    def size_multiple(self) -> int:
        """Pixels per token side: every image side must be a multiple of this."""
        sv = self.semantic_vae
        return math.lcm(sv.token_px, sv.downsample * self.transformer.config.patch_size)

    @property
    def mu_rule(self) -> dict[str, float]:
        """The scheduler's shift rule as ``shift_mu`` keyword arguments."""
        sc = self.scheduler.config
        return {"base_tokens": sc.base_image_seq_len, "base_mu": sc.base_shift,
                "max_tokens": sc.max_image_seq_len, "max_mu": sc.max_shift}

    def default_size(self) -> tuple[int, int]:
        """A square of the largest trained area (else of the mu rule's max tokens)."""
        m = self.size_multiple
        area = max(self.config.trained_areas or [self.mu_rule["max_tokens"] * m * m])
        side = max(m, round(math.sqrt(area) / m) * m)
        return side, side

    def image_tokens(self, width: int, height: int) -> int:
        f, p = self.semantic_vae.downsample, self.transformer.config.patch_size
        return (height // (f * p)) * (width // (f * p))

    @property
    def turbo_steps(self) -> int | None:
        """A distilled (turbo) model's step count: it draws on its own fixed schedule, without
        CFG; None for a model sampled on the shifted schedule at any step count."""
        sigmas = self.config.get("turbo_sigmas")
        return len(sigmas) if sigmas else None

    def sigmas(self, steps: int, width: int, height: int) -> Tensor:
        """(N + 1,) ending in 0: a turbo model's fixed schedule, else the scheduler's shifted
        linspace(1, 1/N, N)."""
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        if self.turbo_steps is not None:
            if steps != self.turbo_steps:
                raise ValueError(f"num_inference_steps={steps}: this distilled model draws in "
                                 f"the {self.turbo_steps} steps it was distilled for; pass "
                                 f"{self.turbo_steps} or leave it unset")
            return torch.tensor([*self.config.turbo_sigmas, 0.0], dtype=torch.float32)
        mu = float(shift_mu(self.image_tokens(width, height), **self.mu_rule))
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
        return self.scheduler.sigmas.float()

    # --- inputs --------------------------------------------------------------------------

    def resolve_size(self, width: int | None, height: int | None,
                     size: str | None) -> tuple[int, int]:
        if size is not None:
            w, h = parse_size(size)
            if (width or w) != w or (height or h) != h:
                raise ValueError(f"size {size!r} disagrees with width={width}, height={height}; "
                                 "pass one or the other")
            width, height = w, h
        dw, dh = self.default_size()
        width, height = width or dw, height or dh
        check_size(width, height, self.size_multiple)
        return width, height

    def size_flags(self, width: int, height: int) -> dict[str, str]:
        """Flag (and warn about) an area outside the trained range: allowed, but untested."""
        trained, area = self.config.trained_areas, width * height
        if not trained or min(trained) <= area <= max(trained):
            return {}
        flag, where, edge = (("oversize", "above the largest", max(trained)) if area > max(trained)
                             else ("undersize", "below the smallest", min(trained)))
        msg = (f"area {area} px ({width}x{height}) is {where} trained area {edge} px; "
               f"quality may drop")
        warnings.warn(msg, UserWarning, stacklevel=2)
        return {flag: msg}

    def truncation_flags(self, prompts: list[str]) -> dict[str, str]:
        """Flag (and warn about) prompts, rewrites included, that the text encoder cuts short:
        the words past its limit never reach the model."""
        cut = [i for i, p in enumerate(prompts) if self.encoder.truncates(p)]
        if not cut:
            return {}
        msg = (f"{len(cut)} of {len(prompts)} prompts (index {', '.join(map(str, cut))}) are "
               f"over the text encoder's {self.config.max_length} tokens and were cut short")
        warnings.warn(msg, UserWarning, stacklevel=2)
        return {"truncated": msg}

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> connector features (B, T, width) and mask (B, T); "" -> masked zeros."""
        device = self._execution_device
        hidden, mask = self.encoder.hidden(list(prompts))
        feats = self.connector(hidden.to(self.connector.device), mask.to(self.connector.device))
        return feats.to(device, self.transformer.dtype), mask.to(device)

    def prepare_latents(self, batch: int, width: int, height: int,
                        seed: int | list[int] | None = None,
                        generator: torch.Generator | list[torch.Generator] | None = None
                        ) -> Tensor:
        """Noise (B, C, h, w) float32; with seeds, image i's from a generator seeded seed[i]."""
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        f = self.semantic_vae.downsample
        shape = (self.vae.config.latent_channels, height // f, width // f)
        if seed is not None:
            seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
            generator = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} seeds/generators for {batch} prompts; pass "
                                 "one per prompt")
            noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device)
                               for g in generator])
        else:
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn((batch, *shape), generator=generator, device=device)
        return noise.float().to(self._execution_device)

    # --- sampling ------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], width: int | None = None,
                 height: int | None = None, size: str | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | list[str] = "", seed: int | list[int] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: Tensor | None = None, sampler: str = "euler",
                 output_type: str = "pil", reasoner: bool | None = None) -> LensPipelineOutput:
        """Generate one image per prompt.

        ``size`` "WxH" or ``width``/``height`` (default: a square of the largest trained area);
        sides must be multiples of :attr:`size_multiple`, aspect 1:2 to 2:1. An int ``seed``
        gives image i the seed ``seed + i``; a list gives one per image. ``latents``: your
        own starting noise (B, C, h, w). ``num_inference_steps`` and ``guidance_scale``
        default to 20 and 5.0, or for a distilled model to its step count and 1.0 (no CFG).
        ``sampler``: "euler" or "heun". ``output_type``:
        "pil", "pt" (B, 3, H, W) in [0, 1] or "latent". ``reasoner``: rewrite the prompts
        with the reasoner saved with the model first (default: when it has one).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty; pass a string or a list of strings")
        if reasoner and self.rewriter is None:
            raise ValueError("reasoner=True, but this model was saved without a reasoner: "
                             "pass reasoner=False, or register it from a pipeline run with "
                             "its reasoner and search stages")
        if self.rewriter is not None and reasoner is not False:
            prompts = self.rewriter(prompts)
        if sampler not in SAMPLERS or output_type not in OUTPUT_TYPES:
            raise ValueError(f"sampler {sampler!r} / output_type {output_type!r}: choose a "
                             f"sampler from {list(SAMPLERS)} and an output_type from "
                             f"{list(OUTPUT_TYPES)}")
        width, height = self.resolve_size(width, height, size)
        flags = self.size_flags(width, height) | self.truncation_flags(prompts)
        turbo = self.turbo_steps
        steps = num_inference_steps if num_inference_steps is not None else turbo or 20
        if guidance_scale is None:
            guidance_scale = 1.0 if turbo else 5.0
        sigmas = self.sigmas(steps, width, height)
        if latents is None:
            latents = self.prepare_latents(len(prompts), width, height, seed, generator)
        f, c = self.semantic_vae.downsample, self.vae.config.latent_channels
        if tuple(latents.shape) != (len(prompts), c, height // f, width // f):
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit "
                             f"{len(prompts)} prompts at {width}x{height}; expected "
                             f"{(len(prompts), c, height // f, width // f)}")
        guided = guidance_scale > 1
        with self._eval_mode():
            feats, mask = self._text(prompts, negative_prompt if guided else None)
            velocity = self._velocity_fn(feats, mask)
            z = flow_sample(velocity, latents.float().to(self._execution_device), sigmas,
                            guidance_scale if guided else None, token_dim=1,
                            order=SAMPLERS[sampler])
            images = self._postprocess(z, output_type)
        return LensPipelineOutput(images=images, flags=flags, prompts=prompts)

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode while sampling (train-mode modules can compute differently), restored
        after, so a pipeline built around a model in training leaves it as it was."""
        modules = [m for m in self.components.values() if isinstance(m, torch.nn.Module)]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)

    def _text(self, prompts: list[str],
              negative: str | list[str] | None) -> tuple[Tensor, Tensor]:
        """Features and mask for [cond] or, with a negative prompt, [cond; uncond] (2B)."""
        feats, mask = self.encode_prompt(prompts)
        if negative is None:
            return feats, mask
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; "
                             "pass one string or one per prompt")
        n_feats, n_mask = self.encode_prompt(negatives)
        t = max(feats.shape[1], n_feats.shape[1])
        return (torch.cat([_pad(feats, t), _pad(n_feats, t)]),
                torch.cat([_pad(mask, t), _pad(n_mask, t)]))

    def _velocity_fn(self, feats: Tensor, mask: Tensor) -> VelocityFn:
        dtype = self.transformer.dtype
        layouts: dict[tuple[int, ...], UnpackedLayout] = {}  # one a latent shape: every step

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            shape = tuple(x.shape)
            if shape not in layouts:
                layouts[shape] = self.transformer.unpacked_layout(shape, mask)
            return self.transformer.forward_unpacked(x.to(dtype), feats, mask, t,
                                                     layouts[shape]).float()

        return velocity

    def _postprocess(self, z: Tensor, output_type: str) -> list[PIL.Image.Image] | Tensor:
        if output_type == "latent":
            return z
        images = self.semantic_vae.decode_latent(z.to(self.vae.dtype)).float().clamp(-1, 1)
        if output_type == "pt":
            return ((images + 1) / 2).cpu()
        # the byte conversion of training's sample grids, so both show the same pixels
        pixels = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [PIL.Image.fromarray(p) for p in pixels]


def _locate(path: str, final: Path) -> str:
    """lens.json's VAE path as written, else relative to the run folder."""
    tried = [Path(path).expanduser(), final / path, final.parent / path]
    for candidate in tried:
        if (candidate / "config.json").is_file():
            return str(candidate)
    raise FileNotFoundError(f"the VAE folder {path!r} named in {final / 'lens.json'} was not "
                            f"found (tried {', '.join(map(str, tried))}); copy the VAE there")


def load_pipeline(model: str | Path, dtype: torch.dtype | None = None) -> LensPipeline:
    """A saved LensPipeline folder (model_index.json), a training final/ (lens.json) or
    the run folder above it, offline."""
    path = Path(model).expanduser()
    safe_load.refuse_pickle_path(path, "model")
    if not path.exists():
        raise FileNotFoundError(f"model {str(model)!r} does not exist; pass a saved LensPipeline "
                                "folder, a training run's final/ folder or models:/NAME@ALIAS")
    if (path / "model_index.json").is_file():
        return LensPipeline.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    for final in (path, path / "final"):
        if (final / "lens.json").is_file():
            return LensPipeline.from_training(final, dtype=dtype)
    raise FileNotFoundError(f"model {str(path)!r} is neither a saved LensPipeline (no "
                            "model_index.json) nor a training final/ folder (no lens.json)")
