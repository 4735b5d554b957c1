"""Lens pretraining: rectified flow on packed mixed-resolution batches, through DeepSpeed.

The same program runs the tiny recipe on one CPU and the paper's recipe on GPU nodes::

    python lens_model/train/pretrain.py --params RUN/recipe.yaml --dataset D --vae V --run-dir RUN
    python -m torch.distributed.run --nproc_per_node 8 lens_model/train/pretrain.py ...  # a node
    python -m torch.distributed.run --nnodes 16 --node_rank R --nproc_per_node 8 \\
        --master_addr HOST --master_port 29500 lens_model/train/pretrain.py ...          # cluster

It resumes from the newest checkpoint in ``RUN/checkpoints`` by itself. Rank 0 appends
events (metrics, sample grids, checkpoints, the final model) to ``RUN/events.jsonl``; the
platform's Prefect task streams them to MLflow. Text features and VAE latents come from the
feature cache (``pretrain.features: cached``: built once per shard before training) or are
computed in the step (``online``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from lens_model import atomic
from lens_model.buckets import Bucket, buckets_for
from lens_model.config import get_preset
from lens_model.data import shards
from lens_model.data.captions import long_caption, short_caption
from lens_model.data.loader import (
    Batch,
    Manifest,
    PackedLoader,
    fitted_pixels,
    read_manifest,
    to_signed,
)
from lens_model.data.world import (
    COLORS,
    SHAPES,
    Scene,
    layout_objects,
    render,
    sample_background,
    sample_sizes,
)
from lens_model.denoiser import LensDenoiser, sample_latents
from lens_model.features import FeatureCache, Features
from lens_model.flops import train_step_flops
from lens_model.flow_matching import add_noise, per_token, sample_timesteps, shift_mu, velocity_loss
from lens_model.packing import pack_tokens
from lens_model.pipeline import parse_size
from lens_model.recipe import Recipe, load_recipe
from lens_model.text_encoder import DTYPES, LanguageEncoder
from lens_model.train.engine import TrainConfig, Trainer
from lens_model.train.ledger import ComputeLedger
from lens_model.transformer import LensTransformer2DModel, pack_text, patchify
from lens_model.vae import SemanticVAE

EVENTS = "events.jsonl"
TEXT_MULTIPLE = 16  # packed text length rounds up to this, so shapes repeat across steps
GRID_SEED = 1234
GRID_PROMPTS = len(SHAPES)  # one object of each shape: each column follows one shape


def start_program(params: str | Path) -> Recipe:
    """A training program's first step: read its recipe, refuse a DeepSpeed accelerator
    other than the recipe's device, and split the cores over the local ranks (unless
    OMP_NUM_THREADS says otherwise, for shared hosts)."""
    recipe = load_recipe(params)
    from deepspeed.accelerator import get_accelerator  # heavy: only in the programs

    if (accel := get_accelerator().device_name()) != recipe.launch.device:
        raise SystemExit(f"launch.device is {recipe.launch.device!r} but DeepSpeed's accelerator "
                         f"is {accel!r}; set DS_ACCELERATOR={recipe.launch.device} (the "
                         f"pipeline's tasks do) or change launch.device in the recipe")
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(omp) if omp.isdigit() else 0  # OpenMP's nested "4,2" form: the default split
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, _rank_world()[1])))
    return recipe


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Events:
    """Rank 0's event log (one JSON object per line, appended and flushed)."""

    def __init__(self, run: Path, rank: int) -> None:
        self.path, self.rank = run / EVENTS, rank

    def emit(self, **event: Any) -> None:
        if self.rank == 0:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(event, default=float) + "\n")


def feature_shards(dataset: Path, m: Manifest, long_captions: bool = True
                   ) -> dict[str, list[int]]:
    """Feature-cache name -> rows of ``dataset``'s manifest ``m``, one per data shard.

    The name is the shard's file name plus a digest of its rows (key, image sha256, captions,
    bucket), everything its features depend on besides the encoders: rebuilt data under the
    same shard names never reads another dataset's features. Without ``long_captions`` the
    name ends in ``-short`` (see ``build_feature_cache``)."""
    sha = pq.read_table(dataset / shards.MANIFEST, columns=["sha256"]).column(0).to_pylist()
    rows: dict[str, list[int]] = {}
    for i, shard in enumerate(m.shards):
        rows.setdefault(Path(shard).name, []).append(i)
    out = {}
    for name, idx in sorted(rows.items()):
        h = hashlib.sha256()
        for i in idx:
            h.update(json.dumps([m.keys[i], sha[i], m.captions[i], m.short_captions[i],
                                 m.buckets[i]]).encode())
        out[f"{name}-{h.hexdigest()[:12]}{'' if long_captions else '-short'}"] = idx
    return out


def build_feature_cache(cache: FeatureCache, dataset: Path, encoder: LanguageEncoder,
                        vae: SemanticVAE, batch: int = 32, long_captions: bool = True
                        ) -> list[str]:
    """Text hidden states and VAE latents of every manifest row, one file per shard; returns
    the cache names (``feature_shards``).

    Without ``long_captions`` (a recipe that trains on short captions only) a row with a
    short caption stores its short caption's states as its text too: encoding ~110-word
    captions nobody reads would be most of this stage's time.
    """
    m = read_manifest(dataset)
    names = feature_shards(dataset, m, long_captions)
    for name, idx in names.items():
        if cache.has(name):
            continue
        shard = m.shards[idx[0]]
        members = shards.index_shard(dataset / shard)
        samples = []
        with open(dataset / shard, "rb") as fh:
            for start in range(0, len(idx), batch):
                part = idx[start:start + batch]
                shorts = [m.short_captions[i] for i in part]
                texts = [m.captions[i] if long_captions or not shorts[j] else shorts[j]
                         for j, i in enumerate(part)]
                hidden, mask = encoder.hidden(texts)
                s_hidden, s_mask = (encoder.hidden([s or "" for s in shorts])
                                    if any(shorts) and long_captions else (hidden, mask))
                for j, i in enumerate(part):
                    key, (w, h) = m.keys[i], map(int, m.buckets[i].split("x"))
                    data = shards.read_member(fh, *members[key][shards.image_member(members[key])])
                    img = to_signed(fitted_pixels(data, Bucket(w, h, 0)))  # (3, h, w)
                    latent = vae.encode_latent(img[None])[0]  # (C, h, w)
                    n, ns = int(mask[j].sum()), int(s_mask[j].sum())
                    short = s_hidden[j, :ns].clone() if shorts[j] else None
                    samples.append((key, hidden[j, :n].clone(), mask[j, :n].clone(), latent,
                                    short))
        cache.build_shard(name, samples)
    return list(names)


def encode_by_shape(vae: SemanticVAE, images: list[Tensor]) -> list[Tensor]:
    """Normalised latents (C, h, w) of ``images`` (3, H, W), encoded in one VAE call per image
    shape, in the VAE's device and dtype; returned in fp32 on that device."""
    param = next(vae.parameters())
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(i)
    out: list[Tensor] = [torch.empty(0)] * len(images)
    for idx in by_shape.values():
        stack = torch.stack([images[i] for i in idx]).to(param.device, param.dtype)
        for i, z in zip(idx, vae.encode_latent(stack).float(), strict=True):
            out[i] = z
    return out


class LossFn:
    """Packs a loader batch into one row and returns the rectified-flow velocity loss."""

    def __init__(self, recipe: Recipe, features: dict[str, Features] | None,
                 encoder: LanguageEncoder, vae: SemanticVAE, patch: int) -> None:
        self.recipe, self.features, self.encoder, self.vae, self.patch = (
            recipe, features, encoder, vae, patch)
        self.mu = recipe.pretrain.mu_rule()
        # Tokens of every micro-batch since the last optimizer step (the ledger takes them).
        self.seen: dict[str, list[int]] = {"img": [], "txt": []}

    def _inputs(self, batch: Batch) -> tuple[list[Tensor], list[Tensor]]:
        """Latents (C, h, w) and unpadded text hidden states (T, L*D) per sample.

        Each sample with a short caption trains on it with ``short_caption_prob``; the draw uses
        torch's generator, whose state checkpoints carry, so a resumed run draws the same.
        """
        draws = torch.rand(len(batch.keys)) < self.recipe.pretrain.short_caption_prob
        short = [bool(d) and s is not None for d, s in zip(draws, batch.short_captions,
                                                            strict=True)]
        if self.features is not None:
            got = [self.features[k] for k in batch.keys]
            return [g[2] for g in got], [g[3] if s else g[0] for g, s in zip(got, short,
                                                                             strict=True)]
        captions = [c if not s else sc for c, sc, s in zip(batch.captions, batch.short_captions,
                                                           short, strict=True)]
        with torch.no_grad():  # on the training device, where packing and the step use them
            hidden, mask = self.encoder.hidden(captions)
            lengths = mask.sum(dim=1).tolist()
            latents = encode_by_shape(self.vae, batch.images)
        return latents, [hidden[i, :n] for i, n in enumerate(lengths)]

    def __call__(self, engine: Any, batch: Batch) -> Tensor:
        latents, texts = self._inputs(batch)
        device = engine.device if hasattr(engine, "device") else torch.device("cpu")
        latents, texts = [z.to(device) for z in latents], [h.to(device) for h in texts]
        tokens = [patchify(z[None], self.patch)[0] for z in latents]  # (N_i, 4C)
        grids = [(z.shape[1] // self.patch, z.shape[2] // self.patch) for z in latents]
        budget = self.recipe.loader.token_budget
        x0, seq = pack_tokens(tokens, grids, budget)  # (budget, 4C)
        # Dropped captions have no text tokens, exactly as an empty prompt at inference.
        drop = torch.rand(len(texts)) < self.recipe.pretrain.caption_dropout
        texts = [t[:0] if d else t for t, d in zip(texts, drop, strict=True)]
        lt = max(1, sum(len(t) for t in texts))
        txt, txt_seg, txt_pos = pack_text(texts, -(-lt // TEXT_MULTIPLE) * TEXT_MULTIPLE)
        counts = torch.tensor([len(t) for t in tokens])
        p = self.recipe.pretrain
        t = sample_timesteps(counts, mean=p.timestep_mean, std=p.timestep_std,
                             shift_rule=lambda n: shift_mu(n, **self.mu)).to(device)  # (S,)
        # Drawn by the CPU generator, whose state checkpoints carry, then moved.
        noise = torch.randn(x0.shape, dtype=x0.dtype).to(device)
        xt = add_noise(x0, noise, per_token(t, seq.segment_ids))
        self.seen["img"] += [len(x) for x in tokens]
        self.seen["txt"] += [len(x) for x in texts]
        # The ids are checked and the attention planned here, with the batch, so the step's
        # forward never waits on the host.
        plan = getattr(engine, "module", engine).transformer.plan(
            seq.segment_ids[None], txt_seg[None], t[None])
        pred = engine(xt[None], txt[None], t[None], seq.segment_ids[None], txt_seg[None],
                      seq.position_ids[None], txt_pos[None], plan)
        return velocity_loss(pred[0], noise - x0, segment_ids=seq.segment_ids)


def grid_prompts(recipe: Recipe) -> list[tuple[str, Image.Image]]:
    """Fixed prompts of one object each, one per shape in distinct colours, with their
    ground-truth renders at the recipe's evaluation size: short captions where the recipe
    trains mostly on them, long ones otherwise."""
    import random

    rng = random.Random(GRID_SEED)
    width, height = parse_size(recipe.eval.size)
    d = recipe.data
    short = recipe.pretrain.short_caption_prob >= 0.5
    out = []
    for shape, color in zip(SHAPES, rng.sample(tuple(COLORS), len(SHAPES)), strict=True):
        objects = layout_objects(rng, [(shape, color, sample_sizes(rng, 1)[0])])
        scene = Scene(objects, *sample_background(rng, objects, tuple(d.backgrounds),
                                                  tuple(d.patterns)))
        text = short_caption(scene, rng) if short else long_caption(scene, width, height, rng)
        out.append((text, render(scene, width, height)))
    return out


@torch.no_grad()
def sample_grid(denoiser: LensDenoiser, encoder: LanguageEncoder, vae: SemanticVAE,
                recipe: Recipe) -> Image.Image:
    """Ground truth (top) above samples (bottom) for the fixed prompts, fixed seed, drawn with
    the evaluation protocol's size, steps and CFG (Euler), so the grid shows what is scored."""
    prompts = grid_prompts(recipe)
    width, height = prompts[0][1].size
    cond = encoder.hidden([p for p, _ in prompts])
    uncond = encoder.hidden([""] * len(prompts))
    f, c = vae.downsample, vae.latent_channels
    was_training = denoiser.training
    denoiser.eval()
    z = sample_latents(denoiser, cond, uncond, (len(prompts), c, height // f, width // f),
                       recipe.eval.steps, recipe.eval.cfg,
                       torch.Generator().manual_seed(GRID_SEED), recipe.pretrain.mu_rule())
    denoiser.train(was_training)
    z = z.to(next(vae.parameters()).device, torch.float32)
    images = ((vae.decode_latent(z).clamp(-1, 1) + 1) * 127.5).round().byte()  # (B, 3, H, W)
    grid = Image.new("RGB", (width * len(prompts), height * 2), "white")
    for i, (_, truth) in enumerate(prompts):
        grid.paste(truth, (i * width, 0))
        grid.paste(Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy()), (i * width, height))
    return grid


def save_final(run: Path, denoiser: LensDenoiser, recipe: Recipe, vae_dir: str,
               step: int, name: str = "final") -> Path:
    """The EMA model as a folder ``run/name``: transformer (diffusers), connector
    (safetensors), lens.json; written beside it, then moved into place."""
    final = run / name
    with atomic.atomic_dir(final) as tmp:
        denoiser.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in denoiser.connector.state_dict().items()},
                  str(tmp / "connector.safetensors"))
        atomic.write_json(tmp / "lens.json", {
            "recipe": recipe.name, "recipe_hash": recipe.hash(), "step": step, "vae": vae_dir,
            "text_encoder": recipe.text_encoder.model_dump(mode="json"),
            "mu_rule": recipe.pretrain.mu_rule(),
            "trained_areas": sorted({b.width * b.height for b in buckets_for(recipe.buckets)})})
    return final


def load_init(denoiser: LensDenoiser, final: Path) -> None:
    """Copy a pretraining run's final/ weights (transformer and connector) into
    ``denoiser``, which must be built to the same shapes."""
    if not (final / "lens.json").is_file():
        raise FileNotFoundError(f"--init {final}: not a pretraining run's final/ folder (no "
                                f"lens.json); pass RUN/final of the recipe in init_from")
    loaded = LensTransformer2DModel.from_pretrained(str(final / "transformer"),
                                                    use_safetensors=True)
    parts = ((denoiser.transformer, loaded.state_dict(), "transformer"),
             (denoiser.connector, load_file(str(final / "connector.safetensors")), "connector"))
    for module, state, what in parts:
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"--init {final}: its {what} does not fit this recipe's model "
                             f"({str(exc).splitlines()[0]}); init_from must name a recipe of "
                             f"the same model preset, text encoder and VAE") from None


def train_config(recipe: Recipe, ckpt_dir: Path | None) -> TrainConfig:
    """The trainer's settings from the recipe's ``pretrain`` section (``ckpt_dir`` None: no
    checkpoints, as the GPU benchmark runs it)."""
    p = recipe.pretrain
    return TrainConfig(lr=p.lr, warmup_steps=p.warmup_steps, decay_steps=p.decay_steps,
                       total_steps=p.steps, weight_decay=p.weight_decay, betas=tuple(p.betas),
                       grad_clip=p.grad_clip, zero_stage=p.zero_stage, precision=p.precision,
                       grad_checkpointing=p.grad_checkpointing, ema_decay=p.ema_decay,
                       ema_device=p.ema_device, grad_accum=p.gradient_accumulation_steps,
                       ckpt_every=p.ckpt_every, keep_last=p.keep_last, ckpt_dir=ckpt_dir,
                       seed=recipe.seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True, help="the resolved recipe (YAML)")
    ap.add_argument("--dataset", required=True, help="dataset dir with manifest.parquet")
    ap.add_argument("--vae", required=True, help="SemanticVAE folder")
    # not --run: torchrun's parser takes it for an ambiguous prefix of its own --run-path
    ap.add_argument("--run-dir", dest="run", required=True,
                    help="run dir: checkpoints, events, final model")
    ap.add_argument("--features", default=None, help="feature cache root (default RUN/..)")
    ap.add_argument("--init", default=None, help="start from this final/ folder's weights "
                    "(pretrain.init_from: stage 2 after stage 1); a checkpoint still wins")
    args = ap.parse_args(argv)
    recipe, run, dataset = start_program(args.params), Path(args.run), Path(args.dataset)
    run.mkdir(parents=True, exist_ok=True)
    p, te = recipe.pretrain, recipe.text_encoder
    # A trained VAE stays fp32 (its stage trains it so); a pretrained one loads in vae.dtype.
    vae_dtype = DTYPES[recipe.vae.dtype if recipe.vae.source == "pretrained" else "fp32"]
    vae = SemanticVAE.from_pretrained(args.vae, dtype=vae_dtype).eval()
    if vae.token_px != recipe.buckets.token_px:
        raise ValueError(f"the VAE gives {vae.token_px} px per token but buckets.token_px is "
                         f"{recipe.buckets.token_px}; make them agree in the recipe")
    cfg = get_preset(recipe.model.preset, in_channels=vae.latent_channels,
                     pooled_text=recipe.model.pooled_text)
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank and every rerun
    encoder = LanguageEncoder.from_spec(te.path, list(te.layers), cfg.text_dim or cfg.width,
                                        te.max_length, dtype=DTYPES[te.dtype])
    transformer = LensTransformer2DModel(**cfg.to_dict())
    denoiser = LensDenoiser(transformer, encoder.connector)
    if args.init:  # before the trainer: the EMA starts from these weights too
        load_init(denoiser, Path(args.init))

    features = None
    rank, world = _rank_world()
    if p.features == "cached":
        cache = FeatureCache(Path(args.features or run.parent.parent / "features"),
                             encoder.identity(), vae.identity())
        long_captions = p.short_caption_prob < 1.0
        if rank == 0:
            build_feature_cache(cache, dataset, encoder, vae, long_captions=long_captions)
        if world > 1:
            if not dist.is_initialized():
                from lens_model.train.engine import init_distributed

                init_distributed()
            dist.barrier()
        features = {}
        for name in feature_shards(dataset, read_manifest(dataset), long_captions):
            features.update(cache.load(name))

    loss_fn = LossFn(recipe, features, encoder, vae, cfg.patch_size)
    trainer = Trainer(denoiser, loss_fn, train_config(recipe, run / "checkpoints"))
    # The frozen encoders run where the model trains: online features and the sample grids.
    vae.to(trainer.device)
    encoder.lm.to(trainer.device)
    cached = features is not None  # then images are not needed: no decoding, no workers
    loader = PackedLoader(dataset, buckets_for(recipe.buckets), recipe.buckets.token_px,
                          recipe.loader.token_budget, recipe.seed, trainer.rank,
                          trainer.world_size, 0 if cached else recipe.loader.num_workers,
                          recipe.loader.shuffle_buffer, decode=not cached)
    events = Events(run, trainer.rank)
    # The GPU actually running, not the recipe's gpu_type: MFU and A100-equivalents use its peak.
    device = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    ledger = ComputeLedger(device, trainer.world_size)
    trainer.stateful["ledger"] = ledger  # its totals ride in checkpoints, so resumes add up
    trainer.restore(loader)  # the newest checkpoint, if any: a killed or retried job resumes
    events.emit(step=trainer.step, metrics={"model/params": float(sum(
        x.numel() for x in denoiser.parameters())), "compute/deepspeed_init_s": trainer.init_s},
        resumed_from=str(trainer.resumed_from or ""))

    def on_step(step: int, metrics: dict[str, float]) -> None:
        seen = loss_fn.seen  # every micro-batch of the step, accumulated ones included
        flops = train_step_flops(cfg, seen["img"], seen["txt"], recompute=p.grad_checkpointing)
        counts = torch.tensor([flops, sum(seen["img"]), len(seen["img"])],
                              dtype=torch.float64, device=trainer.device)  # NCCL: on GPU
        loss_fn.seen = {"img": [], "txt": []}
        if trainer.world_size > 1:
            dist.all_reduce(counts)
        ledger.step(float(counts[0]), int(counts[1]), int(counts[2]), metrics["step_s"])
        if step % p.log_every == 0 or step % p.sample_every == 0 or step == p.steps:
            events.emit(step=step, metrics={**{f"train/{k}": v for k, v in metrics.items()},
                                            **ledger.metrics()})
        if step % p.sample_every == 0 or step == p.steps:
            _sample(step)

    def _sample(step: int) -> None:
        if trainer.rank != 0:
            return
        with trainer.ema.swap(trainer.module) if trainer.ema else nullcontext(), \
                trainer.autocast():
            grid = sample_grid(trainer.module, encoder, vae, recipe)
            if p.snapshots:  # the EMA model at this step, for learning curves
                save_final(run, trainer.module, recipe, args.vae, step,
                           f"snapshots/step-{step:08d}")
        rel = f"samples/step-{step:08d}.png"
        (run / "samples").mkdir(exist_ok=True)
        atomic.write_with(run / rel, lambda tmp: grid.save(tmp, format="PNG"))
        events.emit(step=step, artifact=rel)

    def on_save(step: int, path: Path) -> None:  # only once the checkpoint is whole on disk
        events.emit(step=step, checkpoint=str(path.relative_to(run)))

    start = time.perf_counter()
    step = trainer.fit(loader, p.steps, on_step, on_save)
    if trainer.rank == 0:
        with trainer.ema.swap(trainer.module) if trainer.ema else nullcontext():
            final = save_final(run, trainer.module, recipe, args.vae, step)
        events.emit(step=step, final={"model_dir": str(final), "steps": step,
                                      "train_seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
