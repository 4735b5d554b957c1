"""LensPipeline: a tiny random model around the real MiniLM encoder, on CPU.

Sizes: the tiny VAE downsamples 2x, so one token is 4 px and 32x16 is 8 x 4 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from lens import cli
from lens_model.denoiser import LensDenoiser, sample_latents
from lens_model.flow_matching import cfg_velocity, euler_sigmas, shift_mu
from lens_model.pipeline import DEFAULT_MU_RULE, LensPipeline, make_scheduler
from lens_model.text_encoder import LanguageEncoder, TextConnector
from lens_model.transformer import LensTransformer2DModel
from lens_model.vae import SemanticVAE
from tests.test_text_encoder import qwen_dir  # noqa: F401  (fixture: tiny Qwen3, chat template)

PROMPTS = ["a red circle", "two blue squares above a green star"]
WIDTH = 32  # transformer width = connector width
TOKEN_PX = 4
TRAINED = [24 * 24, 20 * 20]  # pixel areas: default size 24x24, anything above 576 px flagged
MU_RULE = {"base_tokens": 16, "base_mu": 0.5, "max_tokens": 64, "max_mu": 1.0}
STEPS = 3


def _tiny_transformer() -> LensTransformer2DModel:
    torch.manual_seed(0)
    model = LensTransformer2DModel(depth=2, width=WIDTH, heads=2, mlp_hidden=64, in_channels=4,
                                   axes_dims=(4, 6, 6))
    with torch.no_grad():  # adaLN-zero starts at output 0: give every zeroed weight a value
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.2)
    return model


@pytest.fixture(scope="module")
def encoder() -> LanguageEncoder:
    torch.manual_seed(1)
    return LanguageEncoder.from_spec("minilm", [3, 6], WIDTH, 32)


@pytest.fixture(scope="module")
def vae() -> SemanticVAE:
    torch.manual_seed(2)
    sv = SemanticVAE.tiny(latent_channels=4, downsample=2, width=8)
    sv.model.bn.running_mean.normal_(std=0.1)  # non-trivial statistics: denormalise matters
    sv.model.bn.running_var.uniform_(0.5, 2.0)
    return sv.eval()


@pytest.fixture(scope="module")
def pipe(encoder: LanguageEncoder, vae: SemanticVAE) -> LensPipeline:
    return LensPipeline(transformer=_tiny_transformer(), vae=vae.model, text_encoder=encoder.lm,
                        tokenizer=encoder.tokenizer, connector=encoder.connector,
                        scheduler=make_scheduler(MU_RULE), layers=[3, 6], max_length=32,
                        trained_areas=TRAINED)


@pytest.fixture(scope="module")
def saved(pipe: LensPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lens-pipeline")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def final_dir(pipe: LensPipeline, vae: SemanticVAE,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run's final/ as pretraining's own save_final writes it, plus the lead's two keys."""
    from lens_model.recipe import load_recipe
    from lens_model.train.pretrain import save_final

    root = tmp_path_factory.mktemp("run")
    vae.save_pretrained(root / "vae")
    recipe = load_recipe("tiny")
    final = save_final(root / "run", LensDenoiser(pipe.transformer, pipe.connector), recipe,
                       str(root / "vae"), step=7)
    meta = json.loads((final / "lens.json").read_text())
    meta |= {"mu_rule": MU_RULE, "trained_areas": TRAINED}
    meta["text_encoder"]["layers"] = [3, 6]  # what the fixture's connector was built for
    (final / "lens.json").write_text(json.dumps(meta))
    return final


def _latents(pipe: LensPipeline, prompts: list[str], **kw) -> torch.Tensor:
    kw = {"size": "32x16", "num_inference_steps": STEPS, "output_type": "latent", **kw}
    return pipe(prompts, **kw).images


# --- sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["32x16", "16x32", "24x24", "20x28"])
def test_output_sizes_for_aspect_ratios(pipe: LensPipeline, size: str) -> None:
    w, h = map(int, size.split("x"))
    out = pipe(PROMPTS, size=size, num_inference_steps=2, seed=0)
    assert [im.size for im in out.images] == [(w, h)] * 2 and out.flags == {}
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in out.images)


def test_default_size_and_output_types(pipe: LensPipeline) -> None:
    assert pipe.size_multiple == TOKEN_PX and pipe.default_size() == (24, 24)
    assert pipe(PROMPTS[:1], num_inference_steps=1, seed=0).images[0].size == (24, 24)
    pt = pipe(PROMPTS, width=16, height=24, num_inference_steps=1, seed=0, output_type="pt")
    assert pt.images.shape == (2, 3, 24, 16) and 0 <= pt.images.min() <= pt.images.max() <= 1
    z = pipe(PROMPTS, width=16, height=24, num_inference_steps=1, seed=0, output_type="latent")
    assert z.images.shape == (2, 4, 12, 8)


@pytest.mark.parametrize(("kw", "match"), [
    ({"size": "64x16"}, r"64x16 has aspect ratio 4.*1:2 to 2:1"),
    ({"size": "16x40"}, r"1:2 to 2:1"),
    ({"size": "30x16"}, r"30x16.*multiple of 4 px.*nearest valid sizes: 28x16, 32x16"),
    ({"size": None, "width": 33, "height": 18}, r"nearest valid sizes: 32x16, 32x20"),
    ({"size": "32by16"}, r"WIDTHxHEIGHT"),
    ({"size": "32x16", "width": 16}, r"disagrees"),
    ({"sampler": "ddim"}, r"sampler"),
    ({"seed": [1, 2, 3]}, r"3 seeds/generators for 2 prompts"),
    ({"latents": torch.zeros(1, 4, 8, 16)}, r"latents of shape \(1, 4, 8, 16\).*2 prompts"),
])
def test_bad_requests_raise(pipe: LensPipeline, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pipe(PROMPTS, **{"size": "32x16", "num_inference_steps": 1, **kw})


def test_oversize_area_is_flagged(pipe: LensPipeline) -> None:
    with pytest.warns(UserWarning, match=r"area 1024 px \(32x32\).*largest trained area 576"):
        out = pipe(PROMPTS[:1], size="32x32", num_inference_steps=1, seed=0)
    assert out.images[0].size == (32, 32)
    assert "1024 px" in out.flags["oversize"] and "576 px" in out.flags["oversize"]
    with pytest.warns(UserWarning, match=r"area 128 px \(16x8\).*smallest trained area 400"):
        small = pipe(PROMPTS[:1], size="16x8", num_inference_steps=1, seed=0)
    assert set(small.flags) == {"undersize"}
    assert pipe(PROMPTS[:1], size="24x24", num_inference_steps=1, seed=0).flags == {}


def test_prompts_the_text_encoder_cuts_short_are_flagged(pipe: LensPipeline) -> None:
    long = " ".join(["a red circle left of a blue star"] * 8)  # past the fixture's 32 tokens
    with pytest.warns(UserWarning, match=r"1 of 2 prompts \(index 1\).*32 tokens"):
        out = pipe([PROMPTS[0], long], size="24x24", num_inference_steps=1, seed=0)
    assert set(out.flags) == {"truncated"}
    assert pipe(PROMPTS[:1], size="24x24", num_inference_steps=1, seed=0).flags == {}


# --- seeds and batches -------------------------------------------------------------------

def test_same_seed_same_image_different_seed_different(pipe: LensPipeline) -> None:
    a = pipe(PROMPTS, size="32x16", num_inference_steps=STEPS, seed=3)
    b = pipe(PROMPTS, size="32x16", num_inference_steps=STEPS, seed=3)
    c = pipe(PROMPTS, size="32x16", num_inference_steps=STEPS, seed=4)
    for x, y, z in zip(a.images, b.images, c.images, strict=True):
        assert x.tobytes() == y.tobytes() and x.tobytes() != z.tobytes()


def test_an_image_does_not_depend_on_its_batch(pipe: LensPipeline) -> None:
    both = _latents(pipe, PROMPTS, seed=[11, 5])
    alone = _latents(pipe, PROMPTS[1:], seed=[5])
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    # an int seed gives image i the seed seed + i
    torch.testing.assert_close(_latents(pipe, PROMPTS, seed=4)[1:], alone, atol=1e-5,
                               rtol=1e-5)


# --- CFG and the sampler -----------------------------------------------------------------

def test_cfg_batch_of_two_equals_separate_passes(pipe: LensPipeline) -> None:
    scale, seeds = 4.0, [1, 2]
    out = _latents(pipe, PROMPTS, seed=seeds, guidance_scale=scale)
    cond, c_mask = pipe.encode_prompt(PROMPTS)
    uncond, u_mask = pipe.encode_prompt(["", ""])
    x = pipe.prepare_latents(2, 32, 16, seed=seeds)
    sigmas = euler_sigmas(STEPS, shift_mu(pipe.image_tokens(32, 16), **MU_RULE))
    with torch.no_grad():
        for i in range(STEPS):
            t = sigmas[i].expand(2)
            v_c = pipe.transformer.forward_unpacked(x, cond, c_mask, t)
            v_u = pipe.transformer.forward_unpacked(x, uncond, u_mask, t)
            x = x + (sigmas[i + 1] - sigmas[i]) * cfg_velocity(v_c, v_u, scale, token_dim=1)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_empty_negative_is_masked_zeros_and_cfg_off_at_one(pipe: LensPipeline,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    feats, mask = pipe.encode_prompt(["", PROMPTS[0]])
    assert not mask[0].any() and mask[1].any() and not feats[0].any()
    # the encoder's own output for "" would not be zero: the empty row never reaches the LM
    assert pipe.encoder.tokenize("")[0]
    seen: list[int] = []
    forward = pipe.transformer.forward_unpacked

    def spy(latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
            t: torch.Tensor, layout: Any = None) -> torch.Tensor:
        seen.append(len(latents))
        if len(latents) == 4:  # CFG: rows 2, 3 are the empty negative prompt
            assert not text[2:].any() and not text_mask[2:].any()
            assert (layout.txt_seg[2:] == -1).all()  # the shared layout masks them too
        return forward(latents, text, text_mask, t, layout)

    monkeypatch.setattr(pipe.transformer, "forward_unpacked", spy)
    _latents(pipe, PROMPTS, seed=0, guidance_scale=5.0)
    _latents(pipe, PROMPTS, seed=0, guidance_scale=1.0)
    assert seen == [4] * STEPS + [2] * STEPS
    seen.clear()
    _latents(pipe, PROMPTS, seed=0, sampler="heun")
    assert seen == [4] * (2 * STEPS - 1)  # Heun: two calls per step, the last step Euler


def test_heun_sampler_runs_and_differs(pipe: LensPipeline) -> None:
    heun = _latents(pipe, PROMPTS, seed=0, sampler="heun")
    euler = _latents(pipe, PROMPTS, seed=0)
    assert heun.shape == euler.shape and torch.isfinite(heun).all()
    assert not torch.allclose(heun, euler)
    assert pipe(PROMPTS, size="32x16", num_inference_steps=2, seed=0,
                sampler="heun").images[0].size == (32, 16)


def test_schedule_comes_from_the_scheduler_and_equals_euler_sigmas(pipe: LensPipeline) -> None:
    sc = pipe.scheduler.config
    assert (sc.base_shift, sc.max_shift, sc.base_image_seq_len, sc.max_image_seq_len) == (
        0.5, 1.0, 16, 64) and sc.use_dynamic_shifting
    for steps, (w, h) in [(1, (32, 16)), (4, (24, 24)), (20, (64, 32)), (50, (8, 16))]:
        mu = shift_mu(pipe.image_tokens(w, h), **MU_RULE)
        torch.testing.assert_close(pipe.sigmas(steps, w, h), euler_sigmas(steps, mu))
    rule = make_scheduler().config
    assert (rule.base_image_seq_len, rule.base_shift, rule.max_image_seq_len,
            rule.max_shift) == tuple(DEFAULT_MU_RULE.values())


def test_pipeline_sampling_equals_training_sample_latents(pipe: LensPipeline) -> None:
    """The pipeline's Euler + CFG path and the training grids' ``sample_latents`` agree."""
    shape = (2, 4, 8, 16)  # 32x16 px
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    ref = sample_latents(LensDenoiser(pipe.transformer, pipe.connector),
                         pipe.encoder.hidden(PROMPTS), pipe.encoder.hidden(["", ""]), shape,
                         STEPS, 4.0, torch.Generator().manual_seed(9), MU_RULE)
    out = _latents(pipe, PROMPTS, latents=noise, guidance_scale=4.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- save / load -------------------------------------------------------------------------

def test_save_load_round_trip_is_exact_and_safetensors_only(pipe: LensPipeline,
                                                            saved: Path) -> None:
    files = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".pkl",
                                               ".ckpt", ".msgpack", ".h5"))]
    assert all(f.endswith(".safetensors") for f in weights) and len(weights) == 4, files
    assert {"scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"} <= set(files)
    index = json.loads((saved / "model_index.json").read_text())
    assert index["transformer"] == ["lens_model.transformer", "LensTransformer2DModel"]
    assert index["connector"] == ["lens_model.text_encoder", "TextConnector"]
    assert (index["layers"], index["max_length"], index["trained_areas"]) == ([3, 6], 32,
                                                                             sorted(TRAINED))
    loaded = LensPipeline.from_pretrained(str(saved), local_files_only=True)
    assert isinstance(loaded.transformer, LensTransformer2DModel)
    assert isinstance(loaded.connector, TextConnector)
    assert {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")} == {
        k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    kw = {"size": "32x16", "num_inference_steps": STEPS, "seed": 0, "output_type": "pt",
          "negative_prompt": "blurry"}
    assert torch.equal(loaded(PROMPTS, **kw).images, pipe(PROMPTS, **kw).images)


@pytest.fixture(scope="module")
def with_reasoner(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The saved pipeline with a small random reasoner LM and a system prompt attached."""
    import shutil

    from lens_model.reasoner.attached import attach
    from lens_model.reasoner.lm import build_model, build_tokenizer
    from lens_model.recipe import ReasonerSection

    root = tmp_path_factory.mktemp("with-reasoner")
    folder = root / "pipeline"
    shutil.copytree(saved, folder)
    tok = build_tokenizer([*PROMPTS, SYSTEM] * 5, vocab_size=300)
    model = build_model(tok, 32, 2, 4, 64, 128, seed=0)
    with torch.no_grad():  # sharper than the usual init, so answers differ from one another
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(std=0.3)
    model.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    attach(folder, ReasonerSection(max_new_tokens=6), str(root / "lm"), SYSTEM)
    return folder


SYSTEM = "You rewrite requests.\nTranslate the request into English."


def test_a_saved_reasoner_rewrites_before_drawing(with_reasoner: Path) -> None:
    loaded = LensPipeline.from_pretrained(str(with_reasoner), local_files_only=True)
    assert loaded.rewriter is not None and loaded.rewriter.system_prompt == SYSTEM
    kw = {"size": "32x16", "num_inference_steps": STEPS, "seed": 0, "output_type": "pt"}
    out = loaded(PROMPTS, **kw)
    rewrites = loaded.rewriter(PROMPTS)
    assert out.prompts == rewrites != PROMPTS
    assert loaded(PROMPTS, reasoner=False, **kw).prompts == PROMPTS
    assert torch.equal(out.images, loaded(rewrites, reasoner=False, **kw).images)
    files = [p.name for p in (with_reasoner / "reasoner").iterdir()]
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)


def test_reasoner_true_without_one_is_refused(saved: Path) -> None:
    loaded = LensPipeline.from_pretrained(str(saved), local_files_only=True)
    assert loaded.rewriter is None
    with pytest.raises(ValueError, match="saved without a reasoner: pass reasoner=False"):
        loaded(PROMPTS, reasoner=True, num_inference_steps=1)
    assert loaded(PROMPTS, num_inference_steps=1, size="32x16").prompts == PROMPTS


def test_an_edited_system_prompt_is_refused(with_reasoner: Path, tmp_path: Path) -> None:
    import shutil

    from lens_model.reasoner.attached import SPEC, load_attached

    folder = tmp_path / "edited"
    shutil.copytree(with_reasoner, folder)
    spec = json.loads((folder / SPEC).read_text())
    (folder / SPEC).write_text(json.dumps(spec | {"system_prompt": "Say anything."}))
    with pytest.raises(ValueError, match="does not match its hash"):
        load_attached(folder)


def test_causal_lm_chat_template_survives_save_load(qwen_dir: Path,  # noqa: F811
                                                   vae: SemanticVAE, tmp_path: Path) -> None:
    torch.manual_seed(3)
    enc = LanguageEncoder.from_spec(str(qwen_dir), [1, 3], WIDTH, 16)
    original = LensPipeline(transformer=_tiny_transformer(), vae=vae.model,
                            text_encoder=enc.lm, tokenizer=enc.tokenizer, connector=enc.connector,
                            scheduler=make_scheduler(MU_RULE), layers=[1, 3], max_length=16)
    original.save_pretrained(tmp_path)
    loaded = LensPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.encoder.use_template and loaded.encoder.layers == [1, 3]
    prompt = "a red circle above two blue stars"
    ids, n_prefix = loaded.encoder.tokenize(prompt)
    assert (ids, n_prefix) == enc.tokenize(prompt) and n_prefix > 0  # template prefix dropped
    for got, want in zip(loaded.encode_prompt([prompt, ""]), original.encode_prompt([prompt, ""]),
                         strict=True):
        assert torch.equal(got, want)


def test_connector_state_dict_keys_unchanged(pipe: LensPipeline) -> None:
    assert sorted(pipe.connector.state_dict()) == ["norms.0.weight", "norms.1.weight",
                                                   "proj.bias", "proj.weight"]


def test_from_training_final_folder(pipe: LensPipeline, final_dir: Path) -> None:
    loaded = LensPipeline.from_training(final_dir)
    assert loaded.mu_rule == MU_RULE and loaded.config.trained_areas == sorted(TRAINED)
    assert loaded.config.max_length == 256  # the tiny recipe's text_encoder.max_length
    kw = {"size": "32x16", "num_inference_steps": STEPS, "seed": 0, "output_type": "pt"}
    torch.testing.assert_close(loaded(PROMPTS, **kw).images, pipe(PROMPTS, **kw).images,
                               atol=1e-6, rtol=0)


def test_from_training_defaults_without_new_keys(final_dir: Path, tmp_path: Path) -> None:
    old = tmp_path / "final"
    old.mkdir()
    for item in final_dir.iterdir():
        (old / item.name).symlink_to(item)
    meta = json.loads((final_dir / "lens.json").read_text())
    (old / "lens.json").unlink()
    (old / "lens.json").write_text(json.dumps({k: v for k, v in meta.items()
                                               if k not in ("mu_rule", "trained_areas")}))
    loaded = LensPipeline.from_training(old)
    assert loaded.mu_rule == DEFAULT_MU_RULE and loaded.config.trained_areas == []
    with pytest.raises(FileNotFoundError, match="no lens.json"):
        LensPipeline.from_training(tmp_path)


# --- CLI ---------------------------------------------------------------------------------

def test_cli_generate_writes_pngs(saved: Path, final_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    # a run dir resolves to its final/; bfloat16 loads every part in that dtype
    for model, dtype in ((saved, "float32"), (final_dir.parent, "bfloat16")):
        out = tmp_path / model.name
        rc = cli.main(["generate", *PROMPTS, "--model", str(model), "--size", "32x16",
                       "--steps", "2", "--cfg", "3", "--seed", "1", "--sampler", "heun",
                       "--out", str(out), "--batch", "1", "--dtype", dtype])
        printed = capsys.readouterr().out.split()
        assert rc == 0
        assert printed == [str(out / "00-a-red-circle.png"),
                           str(out / "01-two-blue-squares-above-a-green-star.png")]
        assert [Image.open(p).size for p in printed] == [(32, 16)] * 2


@pytest.mark.parametrize(("args", "match"), [
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--size", "32by16"], "WIDTHxHEIGHT"),
    (["--size", "64x16"], "1:2 to 2:1"),
    (["--size", "30x16"], "multiple of 4"),
    (["--model", "models:/no-such-model@champion"], "no-such-model"),
])
def test_cli_generate_bad_input_exits_2(saved: Path, tmp_path: Path, args: list[str],
                                        match: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "a red circle", "--model", str(saved), "--size", "32x16", "--steps", "1",
            "--out", str(tmp_path), *args]
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_cli_generate_from_mlflow_registry(saved: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A registered model holding the pipeline under artifacts/pipeline (pyfunc's layout)."""
    import mlflow
    from lens_model import defaults
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(defaults.mlflow_uri())
    exp = mlflow.create_experiment("lens-generate-test",
                                   artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(saved), artifact_path="lens/artifacts/pipeline")
    client = MlflowClient()
    client.create_registered_model("lens-tiny")
    version = client.create_model_version("lens-tiny", f"{run.info.artifact_uri}/lens",
                                          run_id=run.info.run_id)
    client.set_registered_model_alias("lens-tiny", "champion", version.version)
    for uri in ("models:/lens-tiny@champion", f"models:/lens-tiny/{version.version}"):
        out = tmp_path / "out" / uri.split("/")[-1]
        rc = cli.main(["generate", PROMPTS[0], "--model", uri, "--size", "32x16", "--steps",
                       "1", "--out", str(out)])
        assert rc == 0 and capsys.readouterr().out.split() == [str(out / "00-a-red-circle.png")]
