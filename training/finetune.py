"""Fine-tune the MiniLM encoder end to end, with a linear head, for text classification.

The model is the frozen candidate's, trained instead of frozen: MiniLM -> mean pooling over the
attention mask -> L2 normalisation -> a linear head. It saves as the frozen one does (the
encoder's config, tokenizer and ``model.safetensors``, then ``head.safetensors``), so the
transformer runner serves it, and ``mlserve optimize`` exports its encoder, unchanged.

Training: class-weighted cross-entropy, AdamW (a smaller learning rate for the encoder than for
the head) with a linear decay, length-bucketed batches (each batch pads only to its own longest
text), up to ``max_epochs`` epochs with early stopping on validation macro-F1: the best epoch's
weights are kept (epoch 0 is the head on the frozen encoder, kept if no epoch does better). The
head starts from the class-balanced logistic regression on the frozen embeddings, so the first
steps refine a working classifier instead of a random one. A fixed seed and
``torch.use_deterministic_algorithms``: two runs on one machine give the same weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class FineTuneConfig:
    """How the encoder is fine-tuned."""

    max_epochs: int = 3
    patience: int = 2
    """Stop after this many epochs without a better validation macro-F1."""
    batch_size: int = 16
    encoder_lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    length_quantile: float = 0.99
    """Truncate to the token length that covers this share of the training texts (rounded up
    to a multiple of 16, never over the configured ``max_tokens``)."""
    precision: str = "auto"
    """The training steps' arithmetic: ``fp32``, ``bf16`` (mixed precision: the forward pass
    under bfloat16 autocast, the weights, gradients, optimiser and loss in float32), or
    ``auto``: bf16 where the device computes it natively (a CPU with AVX-512 BF16 or AMX, a
    GPU that supports it), fp32 elsewhere, where emulated bf16 would be slower. Validation,
    the head refit and serving always run in float32."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "batch_size": self.batch_size,
            "encoder_lr": self.encoder_lr,
            "head_lr": self.head_lr,
            "weight_decay": self.weight_decay,
            "length_quantile": self.length_quantile,
            "precision": self.precision,
        }


@dataclass
class FineTuned:
    """A fine-tuned encoder (eval mode) and its head, with how the training went."""

    model: Any
    tokenizer: Any
    weight: np.ndarray
    bias: np.ndarray
    max_tokens: int
    best_epoch: int
    precision: str = "fp32"
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def save_encoder(self, directory: Path, source_dir: Path) -> None:
        """The encoder's files in ``directory``: config and weights (safetensors) from the
        fine-tuned model, the tokenizer files from ``source_dir``."""
        import shutil

        from runners.transformer import ENCODER_FILES

        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory), safe_serialization=True)
        for name in ENCODER_FILES:
            if name not in ("config.json", "model.safetensors"):
                shutil.copy2(source_dir / name, directory / name)
        stray = {p.name for p in directory.iterdir()} - set(ENCODER_FILES)
        for name in stray:  # e.g. generation_config.json: nothing the runner reads
            (directory / name).unlink()


def needed_tokens(lengths: list[int], cap: int, quantile: float = 0.99) -> int:
    """The truncation length for texts of ``lengths`` tokens: the ``quantile`` of the lengths,
    rounded up to a multiple of 16, at least 16 and at most ``cap``."""
    if not lengths:
        return min(cap, 16)
    q = float(np.quantile(np.asarray(lengths), quantile))
    return int(max(16, min(cap, 16 * math.ceil(q / 16))))


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic torch for the duration (the global settings are restored)."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    old_cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # what CUDA needs for determinism
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN, in case an op reads memory it
    # never wrote. No op of this training does, and the fill took some 8 % of a step on the CPU.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = old_fill
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)
        if old_cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = old_cublas


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar lengths: shuffle, sort runs of 8 batches by length, cut them
    into batches, shuffle the batches."""
    order = rng.permutation(len(lengths))
    span = batch_size * 8
    out = []
    for start in range(0, len(order), span):
        run = order[start : start + span]
        run = run[np.argsort(lengths[run], kind="stable")]
        out.extend(run[i : i + batch_size] for i in range(0, len(run), batch_size))
    return [out[i] for i in rng.permutation(len(out))]


def _pool(model: Any, ids: Any, mask: Any) -> Any:
    import torch

    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _pad(tokenizer: Any, rows: list[list[int]], device: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def training_precision(requested: str, device: str) -> str:
    """``fp32`` or ``bf16``: what ``requested`` (``auto``, ``fp32``, ``bf16``) means on
    ``device``."""
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {requested!r}")
    if requested != "auto":
        return requested
    import torch

    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"


def macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0))


def finetune(
    source_dir: Path,
    t_train: list[str],
    y_train: np.ndarray,
    t_val: list[str],
    y_val: np.ndarray,
    n_classes: int,
    *,
    seed: int,
    max_tokens: int,
    init_head: tuple[np.ndarray, np.ndarray],
    cfg: FineTuneConfig | None = None,
    threads: int = 2,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> FineTuned:
    """Fine-tune the encoder in ``source_dir`` and a linear head (started from ``init_head``,
    (weight, bias)) on the cleaned ``t_train``; early stopping on validation macro-F1.
    ``max_tokens``: the most tokens per text (see :func:`needed_tokens`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    cfg = cfg or FineTuneConfig()
    precision = training_precision(cfg.precision, device)
    started = time.perf_counter()
    with deterministic(seed, threads):
        dev = torch.device(device)
        tokenizer = AutoTokenizer.from_pretrained(source_dir, local_files_only=True)
        model = AutoModel.from_pretrained(source_dir, local_files_only=True, use_safetensors=True)
        model.to(dev)
        head = torch.nn.Linear(model.config.hidden_size, init_head[0].shape[0]).to(dev)
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(init_head[0], dtype=torch.float32))
            head.bias.copy_(torch.as_tensor(init_head[1], dtype=torch.float32))

        def encode(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]

        train_ids, val_ids = encode(t_train), encode(t_val)
        lengths = np.array([len(r) for r in train_ids])
        counts = np.bincount(y_train, minlength=n_classes).astype(float)
        class_weight = torch.tensor(
            len(y_train) / (n_classes * np.maximum(counts, 1.0)), dtype=torch.float32, device=dev
        )
        y_t = torch.as_tensor(y_train, dtype=torch.long, device=dev)
        steps = cfg.max_epochs * math.ceil(len(train_ids) / cfg.batch_size)
        optimizer = torch.optim.AdamW(
            [
                {"params": list(model.parameters()), "lr": cfg.encoder_lr},
                {"params": list(head.parameters()), "lr": cfg.head_lr},
            ],
            weight_decay=cfg.weight_decay,
            # One fused kernel per step instead of a dozen passes over the 22.7 M parameters
            # (the same update; about 10 % of a training step on the CPU).
            fused=dev.type in ("cpu", "cuda") or None,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / max(1, steps))
        )

        def logits_of(rows: list[list[int]]) -> np.ndarray:
            model.eval()
            out = np.empty((len(rows), head.out_features))
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
            with torch.inference_mode():
                for start in range(0, len(order), 32):
                    idx = order[start : start + 32]
                    ids, mask = _pad(tokenizer, [rows[i] for i in idx], dev)
                    out[idx] = head(_pool(model, ids, mask)).cpu().numpy()
            return out

        def head_pred(logits: np.ndarray) -> np.ndarray:
            return logits.argmax(axis=1) if logits.shape[1] > 1 else (logits[:, 0] > 0) * 1

        rng = np.random.default_rng(seed)
        best_f1 = macro_f1(y_val, head_pred(logits_of(val_ids)), n_classes)
        history: list[dict[str, float]] = [{"epoch": 0, "val_f1_macro": round(best_f1, 4)}]
        best_epoch, best_state, waited = 0, None, 0
        for epoch in range(1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            model.train()
            total, seen = 0.0, 0
            for batch in _batches(lengths, cfg.batch_size, rng):
                ids, mask = _pad(tokenizer, [train_ids[i] for i in batch], dev)
                with torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16"):
                    logits = head(_pool(model, ids, mask))
                logits = logits.float()  # the loss in float32
                target = y_t[torch.as_tensor(batch, device=dev)]
                if logits.shape[1] == 1:
                    w = class_weight[target]
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(
                        logits[:, 0], target.float(), weight=w / w.mean()
                    )
                else:
                    loss = torch.nn.functional.cross_entropy(logits, target, weight=class_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    list(model.parameters()) + list(head.parameters()), 1.0
                )
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
            f1 = macro_f1(y_val, head_pred(logits_of(val_ids)), n_classes)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": round(total / max(1, seen), 4),
                    "val_f1_macro": round(f1, 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            if log:
                log(
                    f"fine-tuning epoch {epoch}: loss {total / max(1, seen):.3f}, "
                    f"validation macro-F1 {f1:.3f} ({time.perf_counter() - t0:.0f} s)"
                )
            # Ties go to the later epoch (the more fine-tuned model), but only a higher score
            # resets the patience.
            waited = 0 if f1 > best_f1 else waited + 1
            if f1 >= best_f1:
                best_f1, best_epoch = f1, epoch
                best_state = (
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                    {k: v.detach().clone() for k, v in head.state_dict().items()},
                )
            if waited >= cfg.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state[0])
            head.load_state_dict(best_state[1])
        else:  # no epoch beat the starting point: keep the pretrained encoder and the head
            model = AutoModel.from_pretrained(
                source_dir, local_files_only=True, use_safetensors=True
            ).to(dev)
            with torch.no_grad():
                head.weight.copy_(torch.as_tensor(init_head[0], dtype=torch.float32))
                head.bias.copy_(torch.as_tensor(init_head[1], dtype=torch.float32))
        model.eval()
        weight = head.weight.detach().cpu().numpy().astype(np.float64)
        bias = head.bias.detach().cpu().numpy().astype(np.float64)
    return FineTuned(
        model=model,
        tokenizer=tokenizer,
        weight=weight,
        bias=bias,
        max_tokens=max_tokens,
        best_epoch=best_epoch,
        precision=precision,
        history=history,
        seconds=round(time.perf_counter() - started, 1),
    )
