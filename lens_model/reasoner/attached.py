"""A reasoner saved with a model: its LM (when local) and the system prompt it was searched
for, so a release rewrites prompts the way its scores were measured.

Inside a saved pipeline folder::

    reasoner.json   {"system_prompt", "system_prompt_hash", "backend", generation settings,
                     the endpoint (URL and model, never a key) for backend openai}
    reasoner/       the Hugging Face causal LM and its tokenizer (backends train and hf)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from lens_model import atomic
from lens_model.reasoner.base import Reasoner, check_system_prompt
from lens_model.reasoner.search import prompt_hash
from lens_model.recipe import EndpointSection, ReasonerSection

SPEC = "reasoner.json"
MODEL = "reasoner"


@dataclass
class PromptRewriter:
    """A reasoner bound to its system prompt: prompts in, the prompts to draw out."""

    reasoner: Reasoner
    system_prompt: str

    @property
    def hash(self) -> str:
        return prompt_hash(self.system_prompt)

    def __call__(self, prompts: list[str]) -> list[str]:
        return self.reasoner.rewrite(self.system_prompt, prompts)


def attach(folder: str | Path, section: ReasonerSection, model_dir: str,
           system_prompt: str) -> None:
    """Save the reasoner into the saved pipeline ``folder``: the LM at ``model_dir`` (for
    backends train and hf) and ``system_prompt``."""
    folder = Path(folder)
    check_system_prompt(system_prompt, section.max_system_chars)
    spec = {"system_prompt": system_prompt, "system_prompt_hash": prompt_hash(system_prompt),
            "backend": section.backend, "max_new_tokens": section.max_new_tokens,
            "batch_size": section.batch_size, "max_system_chars": section.max_system_chars}
    if section.backend == "openai":
        spec["endpoint"] = section.endpoint.model_dump(mode="json")
    else:
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"no reasoner model at {model_dir!r} (no config.json): "
                                    "rerun the reasoner stage, or set reasoner.path")
        shutil.copytree(model_dir, folder / MODEL, dirs_exist_ok=True)
    atomic.write_text(folder / SPEC, json.dumps(spec, indent=2))


def load_attached(folder: str | Path) -> PromptRewriter | None:
    """The reasoner saved in ``folder``, or None when it has none."""
    path = Path(folder) / SPEC
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    if spec.get("backend") == "openai":
        from lens_model.reasoner.endpoint import OpenAIReasoner

        reasoner: Reasoner = OpenAIReasoner(EndpointSection(**spec["endpoint"]),
                                            spec["max_system_chars"])
    else:
        from lens_model.reasoner.lm import HFReasoner

        reasoner = HFReasoner(Path(folder) / MODEL, max_new_tokens=spec["max_new_tokens"],
                              batch_size=spec["batch_size"],
                              max_system_chars=spec["max_system_chars"])
    if prompt_hash(spec["system_prompt"]) != spec["system_prompt_hash"]:
        raise ValueError(f"{path}: the system prompt does not match its hash "
                         f"{spec['system_prompt_hash']}: the file was edited; restore it "
                         "or register a new version")
    return PromptRewriter(reasoner, spec["system_prompt"])
