"""What each pipeline stage hands the next: small frozen records instead of string-keyed
dicts, so that a misspelt field fails where it is read. Prefect persists them (pickled) as
cached task results; ``dataclasses.asdict`` turns them into the JSON ``lens run`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Scores = dict[str, float]  # category -> score, with "overall"


@dataclass(frozen=True)
class TrainedVae:
    """The vae stage: the VAE folder, and its training run ("" when a pretrained one is used)."""
    dir: str
    run_id: str = ""
    compute_s: float = 0.0


@dataclass(frozen=True)
class TrainedJob:
    """A training program's run (pretrain, rl, distill): its MLflow run, its run folder and
    the trainer's final event (``model_dir``, ``steps``, and what the program adds)."""
    run_id: str
    job: str
    run_dir: str
    compute_s: float
    final: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> str:
        return str(self.final.get("model_dir", ""))

    @property
    def gold(self) -> list[tuple[int, float]]:
        """RL's (step, gold reward) pairs; empty for the other programs."""
        return [(int(step), float(score)) for step, score in self.final.get("gold") or []]

    def rl_summary(self) -> dict[str, Any]:
        """RL's before/after gold score, its training reward and the reward-hacking flag."""
        gold = self.gold
        return {"job": self.job, "gold_before": gold[0][1] if gold else None,
                "gold_after": gold[-1][1] if gold else None,
                "reward_start": self.final.get("reward_start"),
                "reward_end": self.final.get("reward_end"),
                "reward_hacking": bool(self.final.get("reward_hacking"))}


@dataclass(frozen=True)
class PromptSet:
    """The RL prompt set: its Parquet file, DVC hash, MLflow run and per-split counts."""
    path: str
    dvc_hash: str
    run_id: str
    counts: dict[str, int]
    compute_s: float = 0.0


@dataclass(frozen=True)
class ReasonerModel:
    """The reasoner stage: the rewriting LM's folder ("" for an endpoint) and its held-out
    rewrite scores; ``run_id`` is "" when nothing was trained."""
    dir: str
    heldout: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    compute_s: float = 0.0


@dataclass(frozen=True)
class SearchedPrompt:
    """The system-prompt search's winner and its shapes-GenEval-R test scores per condition
    ("r/none", "r/literal", "r/seed", "r/searched", "plain/none", "plain/searched"; r/literal
    is each prompt worded plainly from its spec, the most a rewrite can gain)."""
    system_prompt: str
    hash: str
    path: str
    test: dict[str, Scores]
    curve: list[float]
    rounds: int
    stopped: str
    run_id: str
    r_eval_hash: str
    compute_s: float = 0.0


@dataclass(frozen=True)
class TurboScores:
    """The distilled student beside its teacher, both at the student's steps without CFG."""
    model_dir: str
    scores: Scores
    seconds_per_image: float
    eval_hash: str
    steps: int
    undistilled_scores: Scores
    speedup: float  # the teacher's seconds per image over the student's


@dataclass(frozen=True)
class ScoreCard:
    """What a registered version shows of its evaluation: its scores, latency and protocol,
    the columns it is compared with, and its teacher ("name/version") when distilled."""
    scores: Scores
    seconds_per_image: float
    eval_hash: str
    columns: dict[str, Scores]
    rl_trained: bool = False
    teacher: str = ""


@dataclass(frozen=True)
class Evaluation:
    """The evaluate stage: the model's shapes-GenEval scores beside the untrained baseline,
    the VAE's reconstruction ceiling, the model RL started from and the distilled student."""
    run_id: str
    scores: Scores
    baseline_scores: Scores
    ceiling_scores: Scores
    pretrained_scores: Scores | None
    seconds_per_image: float
    eval_hash: str
    grid: str
    turbo: TurboScores | None
    compute_s: float = 0.0

    def card(self) -> ScoreCard:
        before = {"before RL": self.pretrained_scores} if self.pretrained_scores else {}
        return ScoreCard(self.scores, self.seconds_per_image, self.eval_hash,
                         {"untrained": self.baseline_scores} | before,
                         rl_trained=bool(before))


@dataclass(frozen=True)
class Registered:
    """A registered model version and the run that logged it."""
    name: str
    version: str
    run_id: str
    model_uri: str
    scores: Scores
    tags: dict[str, str]
    compute_s: float = 0.0
