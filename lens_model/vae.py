"""The semantic VAE: diffusers ``AutoencoderKLFlux2`` with its BatchNorm latent normalisation.

Latent spaces (f = the VAE's downsampling, C = its latent channels):
- raw latent ``(B, C, H/f, W/f)``: the posterior mode (mean), as the FLUX.2 pipeline encodes;
- patchified ``(B, 4C, H/2f, W/2f)``: each 2x2 latent patch stacked on channels, channel
  ``c * 4 + dy * 2 + dx`` holds raw channel ``c`` at offset ``(dy, dx)`` (FLUX.2's order);
- normalised: the patchified latent minus ``bn.running_mean``, divided by
  ``sqrt(bn.running_var + bn.eps)``. The VAE's ``bn`` has 4C channels, so its statistics are per
  patchified channel; this is the only space where they apply. They are the running statistics
  (never the batch's), so a sample's latent does not depend on its batch.

``encode_latent`` returns the normalised latent unpatchified back to ``(B, C, H/f, W/f)``: the
transformer does its own 2x2 patchify on it. ``encode`` returns the normalised patchified
latent as tokens ``(B, rows * cols, 4C)``, row-major over the token grid, like
``lens_model.packing``. ``decode_latent`` / ``decode`` are the exact inverses. Both need image
sides divisible by ``2f`` (one token per ``2f`` pixels).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2
from torch import Tensor, nn

from lens_model import safe_load

PATCH = 2  # the 2x2 patchify FLUX.2 normalises in


def patchify(z: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2), channel c * 4 + dy * 2 + dx."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH)  # (B, C, h2, dy, w2, dx)
    return z.permute(0, 1, 3, 5, 2, 4).reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatchify(zp: Tensor) -> Tensor:
    """(B, 4C, h2, w2) -> (B, C, 2 h2, 2 w2); the inverse of :func:`patchify`."""
    b, c4, h2, w2 = zp.shape
    z = zp.reshape(b, c4 // (PATCH * PATCH), PATCH, PATCH, h2, w2)  # (B, C, dy, dx, h2, w2)
    return z.permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // (PATCH * PATCH), h2 * PATCH, w2 * PATCH)


class SemanticVAE(nn.Module):
    """``AutoencoderKLFlux2`` plus BatchNorm-statistics normalisation and 2x2 patchify."""

    def __init__(self, model: AutoencoderKLFlux2) -> None:
        super().__init__()
        if tuple(model.config.patch_size) != (PATCH, PATCH):
            raise ValueError(f"VAE patch_size {tuple(model.config.patch_size)} is unsupported; "
                             f"SemanticVAE normalises in FLUX.2's {PATCH}x{PATCH} patches")
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> SemanticVAE:
        """Load an ``AutoencoderKLFlux2`` folder (``subfolder="vae"`` for a pipeline) offline,
        from safetensors only (a ``.bin`` beside them is never read; one alone is refused)."""
        what = f"the VAE {path}"
        safe_load.refuse_pickle_path(path, what)
        safe_load.require_safetensors(Path(path) / kwargs.get("subfolder", ""), what)
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"{what}: use_safetensors=False is refused; Lens loads weights "
                             "from safetensors only")
        kwargs["use_safetensors"] = True
        try:
            model = AutoencoderKLFlux2.from_pretrained(str(path), local_files_only=True,
                                                       **kwargs)
        except OSError as exc:
            raise FileNotFoundError(
                f"semantic VAE {str(path)!r} could not be loaded offline ({exc}); download it "
                f"into a local folder (e.g. `hf download black-forest-labs/FLUX.2-dev "
                f"--include 'vae/*' --local-dir DIR`) and pass DIR (with subfolder='vae')"
            ) from exc
        return cls(model)

    @classmethod
    def tiny(cls, latent_channels: int = 8, downsample: int = 4, width: int = 16,
             layers_per_block: int = 1, norm_num_groups: int = 8) -> SemanticVAE:
        """A small randomly initialised FLUX.2-shaped VAE for CPU tests and the tiny recipe."""
        levels = int(math.log2(downsample)) + 1  # every down block but the last halves the size
        if downsample < 1 or 2 ** (levels - 1) != downsample:
            raise ValueError(f"tiny VAE downsample={downsample} must be a power of two >= 1")
        # (w, 2w, 2w, ...): full resolution stays cheap, deeper levels get the channels
        channels = tuple(width * min(2, 2 ** i) for i in range(levels))
        if any(c % norm_num_groups for c in channels):
            raise ValueError(f"tiny VAE width={width} is not divisible by "
                             f"norm_num_groups={norm_num_groups}; pick a multiple")
        model = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=channels,
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=64,
        )
        return cls(model)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the diffusers folder (config + safetensors, BatchNorm statistics included)."""
        self.model.save_pretrained(str(path), safe_serialization=True)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Pixels per raw latent cell (f)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def token_px(self) -> int:
        """Pixels per token side after the 2x2 patchify (2f)."""
        return PATCH * self.downsample

    @property
    def token_dim(self) -> int:
        """Channels of one patchified token (4C)."""
        return PATCH * PATCH * self.latent_channels

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """BatchNorm running mean and std, shaped (1, 4C, 1, 1) like ``like``."""
        bn = self.model.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps).to(like.device, like.dtype)
        return mean, std

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images have shape {tuple(images.shape)}; expected (B, 3, H, W) "
                             "in [-1, 1]")
        h, w = images.shape[-2:]
        if h % self.token_px or w % self.token_px:
            raise ValueError(f"image size {w}x{h} is not divisible by {self.token_px} "
                             f"(VAE downsample {self.downsample} x patch {PATCH}); resize it to "
                             "a bucket of the recipe")

    def raw_latent(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> the unnormalised posterior mode (B, C, H/f, W/f)."""
        self._check_images(images)
        return self.model.encode(images).latent_dist.mode()

    def normalize(self, zp: Tensor) -> Tensor:
        """Patchified (B, 4C, h2, w2) -> normalised with the running statistics."""
        mean, std = self._stats(zp)
        return (zp - mean) / std

    def denormalize(self, zp: Tensor) -> Tensor:
        """The inverse of :meth:`normalize`."""
        mean, std = self._stats(zp)
        return zp * std + mean

    def encode_latent(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> normalised latent (B, C, H/f, W/f), for the transformer's patchify."""
        return unpatchify(self.normalize(patchify(self.raw_latent(images))))

    def decode_latent(self, z: Tensor) -> Tensor:
        """Normalised (B, C, h, w) -> images (B, 3, h f, w f), roughly in [-1, 1]."""
        raw = unpatchify(self.denormalize(patchify(z)))
        return self.model.decode(raw).sample

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> normalised tokens (B, H/2f * W/2f, 4C), row-major."""
        zp = self.normalize(patchify(self.raw_latent(images)))  # (B, 4C, rows, cols)
        return zp.flatten(2).transpose(1, 2)

    def decode(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Tokens (B, rows * cols, 4C) on a (rows, cols) grid -> images (B, 3, rows 2f, cols 2f)."""
        rows, cols = grid
        b, n, d = tokens.shape
        if n != rows * cols or d != self.token_dim:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit grid {grid} "
                             f"with {self.token_dim} channels; expected (B, {rows * cols}, "
                             f"{self.token_dim})")
        zp = tokens.transpose(1, 2).reshape(b, d, rows, cols)
        return self.model.decode(unpatchify(self.denormalize(zp))).sample

    def reconstruct(self, images: Tensor) -> Tensor:
        """Encode then decode (posterior mode), the round trip a generated latent takes."""
        return self.decode_latent(self.encode_latent(images))

    def identity(self) -> str:
        """A stable hash of the config and every weight and statistic, for latent-cache keys."""
        h = hashlib.sha256()
        config = {k: v for k, v in self.model.config.items() if not k.startswith("_")}
        h.update(json.dumps(config, sort_keys=True, default=list).encode())
        for name, t in sorted(self.model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
