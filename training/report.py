"""Plots (class distribution, confusion matrix, reliability diagram) and the model card."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_distribution_png(
    splits: dict[str, dict[str, int]], labels: list[str], path: Path
) -> None:
    """Grouped bars: examples per class in each split, to show the imbalance."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(labels))
    for i, (split, counts) in enumerate(splits.items()):
        values = [counts.get(label, 0) for label in labels]
        bars = ax.bar(x + i * width, values, width, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x + width * (len(splits) - 1) / 2, labels, rotation=20)
    ax.set_ylabel("examples")
    ax.set_title("Class distribution per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix_png(y: np.ndarray, pred: np.ndarray, labels: list[str], path: Path) -> None:
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    cm = confusion_matrix(y, pred, labels=list(range(len(labels))))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            color = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability_png(
    y: np.ndarray, curves: dict[str, np.ndarray], path: Path, bins: int = 10
) -> None:
    """Top-label accuracy against confidence, one line per probability source."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    edges = np.linspace(0, 1, bins + 1)
    for name, probs in curves.items():
        conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == y)
        xs, ys = [], []
        for lo, hi in itertools.pairwise(edges):
            mask = (conf > lo) & (conf <= hi)
            if mask.sum() >= 3:
                xs.append(conf[mask].mean())
                ys.append(correct[mask].mean())
        ax.plot(xs, ys, "o-", label=name)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram (test split)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"  # NaN check


def _smoothing(gate: dict) -> str:
    smoothing = gate.get("smoothing")
    if not smoothing or not smoothing.get("applied"):
        return ""
    return (
        f" SmoothQuant (alpha {smoothing['alpha']}) on {smoothing['matmuls']} MatMuls, "
        f"calibrated on {smoothing['calibration_texts']} training texts."
    )


def _quality_gate(meta: dict) -> str:
    gate = meta.get("quality_gate")
    if not gate:
        return ""
    return f"""## Quality gate (optimised from {gate["source"]})

{gate["quantization"]}.{_smoothing(gate)} On the test split, against the float model:

| label agreement | largest probability difference | macro-F1 (float) | ECE (float) | ms/text @1 (float) | ms/text @32 (float) |
|---|---|---|---|---|---|
| {_fmt(gate["label_agreement"])} | {_fmt(gate["max_probability_difference"])} | {_fmt(gate["test_f1_macro"])} ({_fmt(gate["float_test_f1_macro"])}) | {_fmt(gate["test_ece"])} ({_fmt(gate["float_test_ece"])}) | {gate["ms_per_text_batch1"]} ({gate["float_ms_per_text_batch1"]}) | {gate["ms_per_text_batch32"]} ({gate["float_ms_per_text_batch32"]}) |

Saved because its macro-F1 is within {gate["max_f1_drop"]} of the float model's.

"""


def _cv(candidate: dict, metric: str) -> str:
    cv = candidate.get("cv")
    if not cv:
        return "n/a"
    return f"{_fmt(cv[metric]['mean'])} ± {_fmt(cv[metric]['std'])}"


def _cross_validation(meta: dict) -> str:
    cv = meta.get("cross_validation")
    if not cv:
        return ""
    rows = "\n".join(
        f"| {c['name']} | {_cv(c, 'f1_macro')} | {_cv(c, 'pr_auc')} | {_cv(c, 'accuracy')}"
        f" | {_cv(c, 'ece')} | {', '.join(_fmt(v) for v in c['cv']['f1_macro']['folds'])}"
        f" | {c['cv']['seconds']} |"
        for c in meta["candidates"]
        if c.get("cv")
    )
    return f"""## Cross-validation (model selection)

{cv["folds"]}-fold stratified cross-validation on train+validation ({cv["n"]} examples, folds of
{cv["fold_sizes"]}, seed {cv["seed"]}); mean ± {cv["std"]}. {cv["protocol"]}
{cv["finetune_protocol"]}

| candidate | CV macro-F1 | CV PR-AUC | CV accuracy | CV ECE | macro-F1 per fold | seconds |
|---|---|---|---|---|---|---|
{rows}

"""


def _precision(ft: dict) -> str:
    used = ft.get("precision_used", "fp32")
    if used == "bf16":
        return "bfloat16 mixed precision (forward pass under autocast; weights, optimiser and loss in float32)"
    return "float32"


def _fine_tuning(meta: dict) -> str:
    ft = meta.get("fine_tuning")
    if not ft:
        return ""
    curve = "\n".join(
        f"| {p['epoch']} | {p.get('train_loss', 'n/a')} | {_fmt(p['val_f1_macro'])}"
        f" | {p.get('seconds', 'n/a')} |"
        for p in ft["learning_curve"]
    )
    return f"""## Fine-tuning

MiniLM fine-tuned end to end with its linear head on the training split ({ft["train_size"]}
texts, truncated to {ft["max_tokens"]} tokens): class-weighted cross-entropy, AdamW (encoder
{ft["encoder_lr"]}, head {ft["head_lr"]}, weight decay {ft["weight_decay"]}, linear decay),
batches of {ft["batch_size"]}, at most {ft["max_epochs"]} epochs with early stopping on
validation macro-F1 (patience {ft["patience"]}); seed {ft["seed"]}, deterministic algorithms,
{ft["threads"]} threads on {ft["device"]}, training steps in {_precision(ft)}. It took {ft["seconds"]} s; the weights of epoch
{ft["best_epoch"]} were kept. Served head: {ft.get("head", "the fine-tuned one")}. Learning
curve (epoch 0: the head on the frozen encoder):

| epoch | training loss | validation macro-F1 (argmax) | seconds |
|---|---|---|---|
{curve}

"""


def model_card(meta: dict) -> str:
    """A short markdown model card from the model's metadata."""
    test = meta["metrics"]["test"]
    metric = meta["selection"]["metric"]
    rows = "\n".join(
        f"| {c['name']} | {c['calibration']} | {_cv(c, metric)} | {_cv(c, 'f1_macro')}"
        f" | {_fmt(c['validation'][metric])}"
        f" | {_fmt(c['test']['accuracy'])} | {_fmt(c['test']['f1_macro'])}"
        f" | {_fmt(c['test']['pr_auc'])} | {_fmt(c['test']['ece'])}"
        f" | {c.get('train_seconds', 'n/a')}"
        f" | {c['speed']['ms_per_text_batch1']} | {c['speed']['ms_per_text_batch32']} |"
        for c in meta["candidates"]
    )
    per_class = "\n".join(
        f"| {label} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | {m['support']} |"
        for label, m in test["per_class"].items()
    )
    ds = meta["dataset"]
    return f"""# Model card: {meta["tag"]}

- **Task:** text classification into {", ".join(meta["labels"])}
- **Runner family:** {meta["runner_family"]} (`{meta["estimator"]["name"]}`)
- **Trained:** {meta["training_date"]}
- **Data:** {ds["name"]} from `{ds["source"]}` ({ds["n_rows"]} rows, sha256 `{ds["sha256"][:16]}…`),
  stratified split {ds["split_sizes"]} with seed {ds["seed"]}
- **Selection:** {meta["selection"]["reason"]}
- **Calibration:** {meta["calibration"]["method"]} (cross-validated log-loss on validation:
  {meta["calibration"]["cv_log_loss"]})

## Test metrics (held-out)

| accuracy | macro-F1 | macro precision | macro recall | ROC-AUC | PR-AUC | Brier | ECE |
|---|---|---|---|---|---|---|---|
| {_fmt(test["accuracy"])} | {_fmt(test["f1_macro"])} | {_fmt(test["precision_macro"])} | {_fmt(test["recall_macro"])} | {_fmt(test["roc_auc"])} | {_fmt(test["pr_auc"])} | {_fmt(test["brier"])} | {_fmt(test["ece"])} |

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

## Candidates

| candidate | calibration | CV {metric} | CV macro-F1 | validation {metric} | test accuracy | test macro-F1 | test PR-AUC | test ECE | training s | ms/text @1 | ms/text @32 |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Baseline on the same split, {meta["baseline"]["name"]}: test accuracy
{_fmt(meta["baseline"]["test"]["accuracy"])}, macro-F1 {_fmt(meta["baseline"]["test"]["f1_macro"])}.

The test split is the final figure: it played no part in fitting, calibrating or picking.

{_cross_validation(meta)}{_fine_tuning(meta)}{_quality_gate(meta)}## Intended use and limits

Served by mlserve. Inputs are cleaned with the stored configuration
({meta["preprocessing"]["cleaning"]}); texts longer than the feature extractor's limit are
truncated. The data sets are small public corpora: expect lower accuracy on other domains.
"""
