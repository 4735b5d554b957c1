"""The VAE stage: train the recipe's small semantic VAE on the dataset, or use a pretrained one."""

from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task

import mlflow
from lens_model import atomic, defaults
from lens_model.buckets import buckets_for
from lens_model.data.loader import PackedLoader
from lens_model.recipe import Recipe
from lens_model.train.vae_train import held_out_images, reconstruction_grid, train_vae
from lens_model.vae import SemanticVAE
from tasks import tracking
from tasks.cache import keyed_by
from tasks.results import TrainedVae

HELD_OUT = 32
VAE_CODE = ("lens_model/vae.py", "lens_model/train/vae_train.py", "tasks/vae_stage.py")


def _vae_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """What decides the trained VAE: its section, the data and how batches are drawn."""
    recipe: Recipe = params["recipe"]
    return {"seed": recipe.seed, "vae": recipe.vae, "buckets": recipe.buckets,
            "shuffle_buffer": recipe.loader.shuffle_buffer,
            "token_budget": recipe.vae.token_budget or recipe.loader.token_budget,
            "dataset": params["dataset"], "dvc_hash": params["dvc_hash"]}


def vae_dir(recipe: Recipe, dvc_hash: str) -> Path:
    """Where this recipe's VAE trained on this data lives (the pipeline checks it exists)."""
    key = hashlib.sha256(recipe.vae.model_dump_json().encode()).hexdigest()[:8]
    return defaults.lens_home() / "vae" / f"{recipe.name}-{dvc_hash[:8]}-{key}"


@task(name="vae", persist_result=True, cache_policy=keyed_by(_vae_inputs, VAE_CODE))
def vae_stage(recipe: Recipe, dataset: str, dvc_hash: str,
              parent_run_id: str = "") -> TrainedVae:
    """The VAE folder to use: the recipe's pretrained path, or one trained here (cached);
    ``compute_s`` is the training loop's time."""
    v = recipe.vae
    if v.source == "pretrained":
        if not Path(str(v.path)).is_dir():
            raise FileNotFoundError(f"vae.path {v.path!r} is not a local folder; download the "
                                    f"AutoencoderKLFlux2 there or set vae.source=train")
        return TrainedVae(str(v.path))  # no run: nothing trained
    logger = get_run_logger()
    out = vae_dir(recipe, dvc_hash)
    with torch.random.fork_rng():  # seeded init, so a rerun trains the same VAE
        torch.manual_seed(recipe.seed)
        vae = SemanticVAE.tiny(latent_channels=v.latent_channels, downsample=v.downsample)
    loader = PackedLoader(dataset, buckets_for(recipe.buckets), recipe.buckets.token_px,
                          v.token_budget or recipe.loader.token_budget, recipe.seed, num_workers=0,
                          shuffle_buffer=recipe.loader.shuffle_buffer)
    held_out = held_out_images(dataset, HELD_OUT, max(recipe.buckets.base_sizes))
    exp = tracking.experiment(recipe.tracking.experiment)
    tags = tracking.lineage(recipe, dvc_hash, parent_run_id) | {"lens.stage": "vae"}
    with mlflow.start_run(experiment_id=exp, run_name=f"vae-{recipe.name}", tags=tags) as run:
        mlflow.log_params({f"vae.{k}": val for k, val in v.model_dump(mode="json").items()})

        def log(step: int, metrics: dict) -> None:
            mlflow.log_metrics({f"vae/{k}": float(x) for k, x in metrics.items()}, step=step)
            logger.info(f"vae step {step}: {metrics}")

        metrics = train_vae(lambda: islice(iter(loader), v.steps), vae, v.steps, lr=v.lr,
                            kl_weight=v.kl_weight, loss=v.loss, log=log, held_out=held_out,
                            seed=recipe.seed, crop=v.crop,
                            decay_frac=v.decay_frac)
        mlflow.log_metrics({"vae/psnr": metrics["psnr"], "vae/psnr_before":
                            metrics["psnr_before"], "vae/seconds": metrics["seconds"]})
        mlflow.log_image(reconstruction_grid(vae, held_out), "vae/reconstructions.png")
        with atomic.atomic_dir(out) as tmp:  # a killed stage leaves no half-written VAE
            vae.save_pretrained(tmp)
        mlflow.set_tag("lens.vae_dir", str(out))
    logger.info(f"VAE: PSNR {metrics['psnr_before']:.2f} -> {metrics['psnr']:.2f} dB, {out}")
    return TrainedVae(str(out), run.info.run_id, metrics["seconds"])

