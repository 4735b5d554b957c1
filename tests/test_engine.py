"""DeepSpeed trainer, EMA and checkpoints: exact resume in one and two processes and two nodes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lens_model.train import checkpoint
from lens_model.train.checkpoint import RngState
from lens_model.train.ema import EMA
from lens_model.train.engine import (
    TrainConfig,
    Trainer,
    build_ds_config,
    lr_multiplier,
)
from lens_model.train.launch import torchrun_cmd
from tests.conftest import free_port, trainer_env
from tests.ds_worker import RandomBatches, TinyNet, config, final_state, mse_loss, run

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ds_worker.py"
STEPS = 8


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


# --- configuration (no DeepSpeed engine) ----------------------------------------------------

def test_ds_config_fills_the_stage_template_then_overrides() -> None:
    cfg = TrainConfig(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1, grad_clip=0.7,
                      zero_stage=2, precision="bf16")
    ds = build_ds_config(cfg, {"zero_optimization": {"reduce_bucket_size": 1000}})
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["overlap_comm"] is True  # kept from zero2.json
    assert ds["optimizer"] == {"type": "AdamW", "params": {
        "lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-8, "weight_decay": 0.1,
        "torch_adam": True, "adam_w_mode": True}}
    assert ds["gradient_clipping"] == 0.7 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_accumulation_steps"] == 1 and "scheduler" not in ds
    assert build_ds_config(TrainConfig(grad_accum=4))["gradient_accumulation_steps"] == 4
    for stage in range(4):
        got = build_ds_config(TrainConfig(zero_stage=stage, ema_decay=None))
        assert got["zero_optimization"]["stage"] == stage
        assert got["bf16"] == {"enabled": False} and got["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("zero_stage", 4), ("precision", "fp16"),
                                         ("ema_decay", 1.0), ("betas", (0.9, 1.2)),
                                         ("keep_last", 0), ("ckpt_every", 0),
                                         ("grad_accum", 0), ("ema_device", "gpu")])
def test_train_config_names_the_bad_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_zero3_with_ema_is_refused() -> None:
    with pytest.raises(ValueError, match="ZeRO-3"):
        TrainConfig(zero_stage=3, ema_decay=0.99)


def test_contradicting_ds_config_and_missing_method_are_refused() -> None:
    cfg = TrainConfig(lr=1e-3)
    with pytest.raises(ValueError, match="optimizer.params.lr"):
        Trainer(TinyNet(), mse_loss, cfg, build_ds_config(TrainConfig(lr=5e-4)))
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        Trainer(TinyNet(), mse_loss, cfg, build_ds_config(cfg, {"zero_optimization": {
            "stage": 1}}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        Trainer(TinyNet(), mse_loss, cfg, build_ds_config(cfg, {
            "gradient_accumulation_steps": 2}))
    with pytest.raises(ValueError, match="scheduler"):
        Trainer(TinyNet(), mse_loss, cfg, build_ds_config(cfg, {"scheduler": {
            "type": "WarmupLR"}}))
    with pytest.raises(ValueError, match="enable_gradient_checkpointing"):
        Trainer(nn.Linear(2, 2), mse_loss, TrainConfig(grad_checkpointing=True))


def test_warmup_is_linear_from_the_first_step_then_constant() -> None:
    f = lr_multiplier(4)
    assert [f(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(0)(0) == 1.0


def test_cooldown_decays_linearly_to_zero_at_the_last_step() -> None:
    f = lr_multiplier(2, total_steps=8, decay_steps=4)
    assert [f(k) for k in range(9)] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig(warmup_steps=2, decay_steps=7, total_steps=8)


# --- EMA -------------------------------------------------------------------------------------

def test_ema_follows_the_closed_form_and_skips_frozen_params() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    model[1].weight.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema = EMA(model, decay=0.75)
    assert "1.weight" not in ema.shadow and ema.shadow["0.weight"].dtype == torch.float32
    for value in (3.0, 5.0):
        with torch.no_grad():
            model[0].weight.fill_(value)
        ema.update(model)
    # warm-up decays min(0.75, 1/10) = 0.1, then min(0.75, 2/11):
    # 1 -> 0.1 * 1 + 0.9 * 3 = 2.8 -> 2/11 * 2.8 + 9/11 * 5 = 4.6
    assert torch.allclose(ema.shadow["0.weight"], torch.tensor(4.6)) and ema.updates == 2
    ema.updates = 10_000
    assert ema.current_decay == 0.75  # warmed up: the configured decay


def test_ema_swap_restores_and_file_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet().to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    with ema.swap(model) as swapped:
        for name, p in swapped.named_parameters():
            assert torch.equal(p, ema.shadow[name].to(torch.bfloat16))
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name] + 1.0)
    ema.save(tmp_path / "ema.safetensors")
    other = EMA(TinyNet(), decay=0.1)
    other.load(tmp_path / "ema.safetensors")
    assert other.decay == 0.5 and other.updates == 1
    _same(other.shadow, ema.shadow)
    with pytest.raises(ValueError, match="missing"):
        EMA(nn.Linear(8, 1), 0.5).load(tmp_path / "ema.safetensors")


def test_ema_on_the_host_follows_a_bf16_model_tensor_by_tensor() -> None:
    """A shadow on ``device`` (the CPU beside a GPU model) matches the one beside the weights,
    and a bf16 model's update casts one parameter at a time: no second full fp32 copy of the
    model is ever alive."""
    import weakref

    torch.manual_seed(0)
    model = TinyNet().to(torch.bfloat16)
    here, host = EMA(model, decay=0.5), EMA(model, decay=0.5, device="cpu")
    casts: list[weakref.ref] = []
    most_alive = 0
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        nonlocal most_alive
        out = real_to(self, *args, **kwargs)
        if out.dtype == torch.float32 and self.dtype == torch.bfloat16:
            casts.append(weakref.ref(out))
            most_alive = max(most_alive, sum(r() is not None for r in casts))
        return out

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.Tensor.to = counting_to  # type: ignore[method-assign]
    try:
        host.update(model)
    finally:
        torch.Tensor.to = real_to  # type: ignore[method-assign]
    here.update(model)
    _same(here.shadow, host.shadow)
    assert all(t.device.type == "cpu" for t in host.shadow.values())
    assert len(casts) == len(list(model.parameters())) > 1 and most_alive == 1


# --- checkpoint folders and RNG (no DeepSpeed engine) -----------------------------------------

def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = checkpoint.step_dir(root, step)
    path.mkdir(parents=True)
    if complete:
        (path / checkpoint.META).write_text(json.dumps({"step": step}))
    return path


def test_latest_skips_incomplete_and_prune_keeps_the_newest(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path / "none") is None
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 40, complete=False)  # a partial copy: no meta.json
    (tmp_path / ".tmp-step-00000050").mkdir()  # a crashed save
    assert checkpoint.latest(tmp_path) == checkpoint.step_dir(tmp_path, 30)
    checkpoint.prune(tmp_path, keep_last=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step-00000020", "step-00000030", "step-00000040"]
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        checkpoint.step_of(tmp_path / "weights")


def test_rng_state_round_trips_through_json_and_tensors() -> None:
    import random

    import numpy as np

    state = RngState.capture()
    first = (random.random(), np.random.rand(), torch.rand(3))
    js = json.loads(json.dumps(state.to_json()))
    RngState.from_saved(js, state.tensors("train"), "train").restore()
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


# --- one process, in this process -------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """STEPS steps in one go, checkpointing every 2 and keeping 2."""
    ckpt = tmp_path_factory.mktemp("straight")
    trainer, batches, log = run(str(ckpt), STEPS)
    return {"trainer": trainer, "batches": batches, "log": log, "ckpt": ckpt,
            "state": final_state(trainer)}


def test_resume_after_a_kill_matches_the_straight_run(straight: dict[str, Any],
                                                      tmp_path: Path) -> None:
    trainer, _, first = run(str(tmp_path), STEPS // 2)
    del trainer  # the "kill": nothing of this trainer survives but its checkpoints
    # another model init proves the weights come from the checkpoint
    trainer, batches, rest = run(str(tmp_path), STEPS, model_seed=123)
    assert trainer.resumed_from == checkpoint.step_dir(tmp_path, STEPS // 2)
    assert [m["step"] for m in first + rest] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in first + rest] == [m["loss"] for m in straight["log"]]
    _same(final_state(trainer), straight["state"])
    assert batches.state_dict() == straight["batches"].state_dict() == {
        "index": STEPS, "seed": 3, "rank": 0}
    assert trainer.ema is not None and trainer.ema.updates == STEPS


class _Counter:
    """Stands in for the compute ledger: JSON state that must survive a resume."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def test_stateful_extras_are_checkpointed_and_restored(tmp_path: Path) -> None:
    def train(steps: int, name: str = "counter") -> _Counter:
        trainer = Trainer(TinyNet(), mse_loss, config(str(tmp_path)))
        counter = _Counter()
        trainer.stateful[name] = counter
        trainer.fit(RandomBatches(seed=3), steps, lambda s, m: setattr(counter, "n", counter.n + 1))
        return counter

    assert train(STEPS // 2).n == STEPS // 2
    assert train(STEPS).n == STEPS  # restored at STEPS // 2, then counted the rest
    with pytest.raises(ValueError, match="holds no 'other' state"):
        train(STEPS + 2, name="other")


def _with_critic(ckpt: str, steps: int, model_seed: int = 0) -> tuple[Trainer, Any]:
    """A trainer whose loss first takes two steps of a companion engine (TTUR, as
    distillation's critic does), with its own betas and one param group at another LR."""
    torch.manual_seed(model_seed)
    holder: dict[str, Any] = {}

    def loss(engine: Any, batch: Any) -> torch.Tensor:
        for _ in range(2):
            critic = holder["critic"]
            critic.backward(mse_loss(critic, batch) + 0.1 * torch.rand(()))
            critic.step()
        return mse_loss(engine, batch)

    trainer = Trainer(TinyNet(), loss, config(ckpt))
    net = TinyNet()
    holder["critic"] = trainer.add_companion(
        "critic", net, config(ckpt, betas=(0.0, 0.9), ema_decay=None),
        [{"params": list(net.body.parameters())},
         {"params": list(net.head.parameters()), "lr": 1e-2}])
    trainer.fit(RandomBatches(seed=3), steps)
    return trainer, holder["critic"]


def test_a_companion_engine_resumes_exactly_with_the_main_one(tmp_path: Path) -> None:
    straight, critic = _with_critic(str(tmp_path / "a"), STEPS)
    want = {n: p.detach().clone() for n, p in critic.module.named_parameters()}
    assert critic.optimizer.param_groups[1]["lr"] != critic.optimizer.param_groups[0]["lr"]
    _with_critic(str(tmp_path / "b"), STEPS // 2)
    resumed, critic = _with_critic(str(tmp_path / "b"), STEPS, model_seed=5)
    assert resumed.resumed_from == checkpoint.step_dir(tmp_path / "b", STEPS // 2)
    _same({n: p.detach() for n, p in critic.module.named_parameters()}, want)
    _same(final_state(resumed), final_state(straight))
    # a checkpoint written with a critic is refused by a run without one, by name
    plain = Trainer(TinyNet(), mse_loss, config(str(tmp_path / "b")))
    with pytest.raises(ValueError, match=r"holds the engines \['main', 'critic'\]"):
        plain.fit(RandomBatches(seed=3), STEPS + 2)


def test_straight_run_logs_warmup_and_keeps_the_last_checkpoints(
        straight: dict[str, Any]) -> None:
    log, ckpt = straight["log"], straight["ckpt"]
    assert [m["lr"] for m in log[:4]] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3])
    assert all(math.isfinite(m["loss"]) for m in log)
    assert [p.name for p in checkpoint.complete(ckpt)] == ["step-00000006", "step-00000008"]
    latest = checkpoint.latest(ckpt)
    meta = json.loads((latest / checkpoint.META).read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 1 and meta["zero_stage"] == 0
    assert {"ema.safetensors", "rank-00000.json", "rank-00000.safetensors",
            "deepspeed/mp_rank_00_model_states.pt"} <= set(meta["files"])
    own = json.loads((latest / "rank-00000.json").read_text())
    assert own["loader"] == {"index": STEPS, "seed": 3, "rank": 0}
    assert set(own["rng"]) == {"train", "data"}


class _Unsaveable(RandomBatches):
    """A batch source whose state cannot be written: saving fails halfway through."""

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "handle": object()}


def test_a_crash_mid_save_leaves_the_previous_latest(straight: dict[str, Any]) -> None:
    trainer, ckpt = straight["trainer"], straight["ckpt"]
    before = checkpoint.latest(ckpt)
    listing = sorted(p.relative_to(before) for p in before.rglob("*"))
    meta = (before / checkpoint.META).read_bytes()
    trainer.step = STEPS + 2
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        trainer.save(_Unsaveable(seed=3))
    tmp = ckpt / ".tmp-step-00000010"
    assert (tmp / "deepspeed").is_dir()  # DeepSpeed had written its part
    assert checkpoint.latest(ckpt) == before
    assert sorted(p.relative_to(before) for p in before.rglob("*")) == listing
    assert (before / checkpoint.META).read_bytes() == meta
    # the next save completes, removes the leftover and prunes to keep_last
    trainer.save(straight["batches"])
    assert not tmp.exists()
    assert [p.name for p in checkpoint.complete(ckpt)] == ["step-00000008", "step-00000010"]
    trainer.save(straight["batches"])  # saving a step again swaps the folder whole
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000008", "step-00000010"]


def test_bf16_zero2_with_checkpointing_trains(tmp_path: Path) -> None:
    trainer, _, log = run(None, 3, zero=2, precision="bf16", grad_checkpointing=True,
                          warmup_steps=2)
    assert trainer.module.checkpointing
    assert next(trainer.module.parameters()).dtype == torch.bfloat16
    assert trainer.ema is not None
    assert all(t.dtype == torch.float32 for t in trainer.ema.shadow.values())
    assert [m["lr"] for m in log] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in log)


def test_gradient_accumulation_takes_several_batches_per_step() -> None:
    trainer = Trainer(TinyNet(), mse_loss, config(None, ema_decay=None, grad_accum=3))
    batches = RandomBatches(seed=3)
    assert trainer.fit(batches, 2) == 2 and batches.index == 6
    assert trainer.engine.global_steps == 2


def test_zero3_trains_without_ema_and_ema_refuses_its_params(monkeypatch) -> None:
    # ZeRO-3 swaps torch.nn.functional.linear for its own autograd Function for the rest of
    # the process; monkeypatch puts the original back so later tests run plain linears.
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    trainer, _, log = run(None, 2, zero=3, ema_decay=None)
    assert trainer.ema is None and len(log) == 2
    with pytest.raises(ValueError, match="partitioned by ZeRO-3"):
        EMA(trainer.module, 0.9)


def test_fit_refuses_unresumable_or_short_batch_sources(tmp_path: Path) -> None:
    trainer = Trainer(TinyNet(), mse_loss, config(str(tmp_path)))
    with pytest.raises(TypeError, match="state_dict"):
        trainer.fit([(torch.zeros(4, 8), torch.zeros(4, 1))], 2)
    short = Trainer(TinyNet(), mse_loss, config(None))
    with pytest.raises(RuntimeError, match="ran out at step 1"):
        short.fit([(torch.zeros(4, 8), torch.zeros(4, 1))], 2)


# --- two processes (torchrun) and two simulated nodes ---------------------------------------

def _torchrun(*worker_args: str, nproc: int = 2, nnodes: int = 1, node_rank: int = 0,
              port: int | None = None) -> subprocess.Popen:
    cmd = torchrun_cmd(nproc, nnodes, node_rank, "127.0.0.1", port or free_port(), WORKER,
                       worker_args)
    return subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(*procs: subprocess.Popen) -> None:
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"{p.args} exited {p.returncode}:\n{out[-4000:]}"


def _result(out: Path, tag: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return (load_file(str(out / f"{tag}-rank{rank}.safetensors")),
            json.loads((out / f"{tag}-rank{rank}.json").read_text()))


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ZeRO-2 on 2 processes: straight and half in one launch, the resume in a second."""
    root = tmp_path_factory.mktemp("two_procs")
    out = root / "out"
    _finish(_torchrun("--out", str(out), "--zero", "2", "--job", f"straight:{root / 'a'}:8",
                      "--job", f"half:{root / 'b'}:4"))
    _finish(_torchrun("--out", str(out), "--zero", "2", "--model-seed", "9",
                      "--job", f"resumed:{root / 'b'}:8"))
    return out


def test_two_processes_resume_exactly_and_ranks_agree(two_procs: Path) -> None:
    straight0, info0 = _result(two_procs, "straight", 0)
    for tag in ("straight", "resumed"):
        for rank in (0, 1):
            state, info = _result(two_procs, tag, rank)
            _same(state, straight0)
            assert info["world_size"] == 2 and info["step"] == 8
            assert info["loader"] == {"index": 8, "seed": 3, "rank": rank}
    _, half = _result(two_procs, "half", 0)
    _, resumed = _result(two_procs, "resumed", 0)
    assert resumed["resumed_from"].endswith("step-00000004")
    assert half["losses"] + resumed["losses"] == info0["losses"]


def test_two_simulated_nodes_match_two_processes(two_procs: Path, tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out"
    args = ("--out", str(out), "--zero", "2", "--job", f"nodes:{tmp_path / 'ckpt'}:8")
    nodes = [_torchrun(*args, nproc=1, nnodes=2, node_rank=r, port=port) for r in (0, 1)]
    _finish(*nodes)
    straight, _ = _result(two_procs, "straight", 0)
    for rank in (0, 1):
        state, info = _result(out, "nodes", rank)
        assert info["world_size"] == 2
        _same(state, straight)


def test_a_zero2_checkpoint_of_two_processes_resumes_on_one(two_procs: Path,
                                                            tmp_path: Path) -> None:
    """The 2-rank ZeRO-2 run's step-8 checkpoint loads into one process through DeepSpeed's
    universal checkpoint: weights, EMA and the Adam moments (partitioned over 2 ranks when
    saved) equal the 2-rank run's, the loader is re-dealt, and training goes on from step 8;
    a batch source that cannot re-deal its position is refused by name."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_procs.parent / "a", ckpt)
    with pytest.raises(TypeError, match="reshard_state"):
        Trainer(TinyNet(), mse_loss, config(str(ckpt), zero=2)).fit(_NoReshard(3), 8)
    out = tmp_path / "out"
    one = subprocess.run([sys.executable, str(WORKER), "--out", str(out), "--zero", "2",
                          "--model-seed", "9", "--job", f"one:{ckpt}:8",
                          "--job", f"more:{ckpt}:10"],
                         cwd=REPO, env=trainer_env(), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    straight, _ = _result(two_procs, "straight", 0)
    state, info = _result(out, "one", 0)
    assert any(k.startswith("adam.exp_avg_sq.") for k in state)
    _same(state, straight)
    assert info["world_size"] == 1 and info["step"] == 8
    assert info["resumed_from"].endswith("step-00000008")
    assert info["loader"] == {"index": 8, "seed": 3, "rank": 0}
    _, more = _result(out, "more", 0)
    assert more["step"] == 10 and len(more["losses"]) == 2
    assert all(math.isfinite(x) for x in more["losses"])
    assert checkpoint.saved_world_size(checkpoint.latest(ckpt)) == 1
    assert not list(ckpt.glob(".universal-*"))  # the conversion is removed after loading


class _NoReshard(RandomBatches):
    reshard_state = None
