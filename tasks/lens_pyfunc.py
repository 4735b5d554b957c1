"""The registered model, as MLflow "models from code": a pyfunc that wraps LensPipeline.

Input: a DataFrame with a ``prompt`` column. Params: ``steps``, ``cfg``, ``size`` ("WxH"),
``seed`` (image i gets seed + i) and ``reasoner`` (rewrite with the reasoner saved with the
model first; default on when it has one). Output: a DataFrame of ``prompt``, ``rewrite``
(what was drawn) and ``image`` (PNG bytes).
MLflow copies this file into the model; loading it needs only this project installed, and
the pipeline's weights load from safetensors, offline.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class LensPyfunc(PythonModel):
    """Prompts -> PNG images through the LensPipeline saved in the model's artifacts."""

    def load_context(self, context: Any) -> None:
        from lens_model.pipeline import LensPipeline

        self.pipe = LensPipeline.from_pretrained(context.artifacts["pipeline"],
                                                 local_files_only=True)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "prompt" not in model_input:
            raise ValueError(f"the input has columns {list(model_input.columns)}; pass a "
                             "DataFrame with a 'prompt' column of strings")
        p = params or {}
        prompts = [str(x) for x in model_input["prompt"]]
        steps, cfg = p.get("steps"), p.get("cfg")  # unset: the pipeline's own defaults
        out = self.pipe(prompts, size=p.get("size"),
                        num_inference_steps=None if steps is None else int(steps),
                        guidance_scale=None if cfg is None else float(cfg),
                        seed=int(p.get("seed", 0)),
                        reasoner=bool(p.get("reasoner", True)) and self.pipe.rewriter is not None)
        return pd.DataFrame({"prompt": prompts, "rewrite": out.prompts,
                             "image": [_png(im) for im in out.images]})


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


set_model(LensPyfunc())
