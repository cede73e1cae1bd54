"""ONNX family: the MiniLM encoder as an ONNX graph (int8 from ``mlserve optimize``) -> linear
head -> calibration, on ONNX Runtime.

Files: ``encoder/model.onnx`` (the encoder with mean pooling and L2 normalisation inside the
graph: inputs ``input_ids`` and ``attention_mask``, output ``embedding``),
``encoder/tokenizer.json``, ``head.safetensors`` and ``calibration.json``. ONNX is a protobuf
graph and safetensors raw arrays: nothing on the load path unpickles. Needs neither torch nor
transformers: the tokenizer is the ``tokenizers`` library's, from the same ``tokenizer.json``
the float model uses.

Execution provider: CUDA when ``onnxruntime-gpu`` is installed, a GPU is present and
``MLSERVE_DEVICE`` allows it (auto or cuda); the CPU otherwise, with the same thread pinning as
the torch runner (``MLSERVE_TORCH_THREADS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlserve.settings import get_settings
from runners.base import BatchResult, Stopwatch
from runners.transformer import EncoderHeadRunner

ENCODER_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
PAD = "[PAD]"  # BERT's padding token


def providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device`` (auto, cpu, cuda, mps)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_tokenizer(path: Path, max_tokens: int) -> Any:
    """The ``tokenizers`` tokenizer in ``path`` (``tokenizer.json``), truncating to
    ``max_tokens`` and padding each batch to its longest text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_tokens)
    pad = tokenizer.token_to_id(PAD)
    tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token=PAD)
    return tokenizer


def feed_of(batch: list[Any]) -> dict[str, np.ndarray]:
    """The encoder graph's inputs for a batch of ``tokenizers`` encodings."""
    return {
        "input_ids": np.array([e.ids for e in batch], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
    }


class OnnxEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from an ONNX encoder, batched with
    length-sorted padding (as ``runners.transformer.MiniLMEncoder``)."""

    def __init__(
        self,
        directory: Path,
        *,
        threads: int = 1,
        max_tokens: int = 128,
        chunk: int = 32,
        device: str = "cpu",
    ):
        import onnxruntime as ort

        self.chunk = chunk
        self.tokenizer = load_tokenizer(directory / TOKENIZER_FILE, max_tokens)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.providers = providers(device)
        self.session = ort.InferenceSession(
            str(directory / ENCODER_FILE), options, providers=self.providers
        )
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32 embeddings, rows in input order."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.chunk):
            idx = order[start : start + self.chunk]
            batch = self.tokenizer.encode_batch([texts[i] for i in idx])
            out[idx] = self.session.run(None, feed_of(batch))[0]
        return out

    def close(self) -> None:
        self.session = None


class OnnxRunner(EncoderHeadRunner):
    """Serves ONNX-encoder models (``mlserve optimize``) on ONNX Runtime."""

    family = "onnx"

    def load(self) -> None:
        from safetensors.numpy import load_file

        settings = get_settings()
        self.encoder = OnnxEncoder(
            self.model.path / "encoder",
            threads=settings.effective_torch_threads,
            max_tokens=self.max_tokens,
            device=settings.device,
        )
        head = load_file(str(self.model.path / "head.safetensors"))
        self.weight = head["weight"].astype(np.float64)
        self.bias = head["bias"].astype(np.float64)
        self._load_calibrator()
        self.loaded = True

    def infer(self, cleaned: list[str]) -> BatchResult:
        watch = Stopwatch()
        emb = self.encoder.embed(cleaned).astype(np.float64)
        return self._answer(emb @ self.weight.T + self.bias, watch)
