"""The baseline of bench/serve.py: the server most people would write first for a fine-tuned classifier — plain
FastAPI + ``transformers.pipeline("text-classification")`` on the CPU, the same endpoint shape as
``distill serve``'s ``POST /v1/classify``.

    .venv/bin/python bench/hf_pipeline_server.py MODEL_FOLDER PORT

MODEL_FOLDER is the student's Hugging Face folder (the training run's ``final/``, the one `distill export`
made the ONNX graph from). Kept deliberately plain — torch fp32, the pipeline's defaults, a sync endpoint
(FastAPI runs it in its thread pool), no batching — because that is the baseline the issue asks for. The
one thing switched off is uvicorn's access log, which `distill serve` also does not write: the comparison
should not be won on logging.
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline


class ClassifyIn(BaseModel):
    texts: list[str]


def make_app(model: str) -> FastAPI:
    pipe = pipeline("text-classification", model=model, device=-1)
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/classify")
    def classify(body: ClassifyIn):
        out = pipe(body.texts)
        return {"results": [{"label": o["label"], "confidence": o["score"]} for o in out]}

    return app


if __name__ == "__main__":
    uvicorn.run(make_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                access_log=False)
