"""Optimise a stored transformer model into a new version: an int8 ONNX encoder (``onnx`` family).

``mlserve optimize sentiment:v2 --int8 --as sentiment:v3``:

1. export the source model's MiniLM encoder to ONNX (eager attention, so the padding mask
   survives the export; mean pooling and L2 normalisation inside the graph), and check the
   float graph against PyTorch;
2. on a CPU with VNNI (or not x86), smooth the activations' outlier channels into the weights
   (SmoothQuant, calibrated on training-split texts: see :func:`smooth_activations`), then
   quantise the weights to int8 with ONNX Runtime's dynamic quantisation; on an x86 CPU without
   VNNI, unsmoothed, all but the feed-forward output projections (see :func:`float_nodes`);
3. rebuild the source's data split (same data set, checked by sha256; same seed and cleaning),
   embed it with the int8 encoder, and fit the linear head again on those embeddings (int8 moves
   the embeddings: a cosine of about 0.99 to the float ones), then calibrate on validation with
   the source's calibration method and decision rule (refitted, not chosen again);
4. hold it to the quality gate: label agreement with the float model on the test split, the
   largest probability difference, test macro-F1, ECE and ms per text. A variant whose macro-F1
   is more than ``MAX_F1_DROP`` below the float model's is not saved (:class:`QualityGateError`
   says why);
5. save it (ONNX, safetensors and JSON only; a sha256 per file), with the gate in its metadata
   and model card, and check that serving it reproduces the evaluated probabilities.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlserve.calibration import Calibrator
from mlserve.preprocessing import CleaningConfig, clean_texts
from mlserve.store import StoredModel, open_model
from training.data import DataError

MAX_F1_DROP = 0.01
"""The int8 variant may lose at most this much test macro-F1 against the float model."""
EXPORT_PARITY = 1e-4
"""The float ONNX graph must reproduce PyTorch's embeddings to this (before quantising)."""
SMOOTH_ALPHA = 0.8
"""SmoothQuant's migration strength (:func:`smooth_activations`), chosen on the validation
split's mean embedding cosine to the float encoder, all 36 MatMuls quantised, on an AVX-512 VNNI
CPU. Fine-tuned ``sentiment:v2``: none 0.989; alpha 0.6 0.991, 0.7 0.995, **0.8 0.996**, 0.9
0.996, 1.0 0.995. The frozen MiniLM: none 0.993; 0.5 0.983, 0.7 0.997, **0.8 0.997**, 0.9 0.996.
(Measured with one scale per MatMul; with the shared scales, 0.8 gives the fine-tuned 0.996.)"""
SMOOTH_CALIBRATION_TEXTS = 256
"""How many training-split texts calibrate the smoothing (the test split is never used)."""


class QualityGateError(RuntimeError):
    """The optimised variant is not good enough to save."""


def export_encoder(encoder_dir: Path, out: Path, max_tokens: int) -> float:
    """Export the MiniLM in ``encoder_dir`` to ``out`` (ONNX, float), with pooling and
    normalisation inside the graph. Returns the largest embedding difference from PyTorch on a
    few padded texts (raises if it is over ``EXPORT_PARITY``)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    # Eager attention: the SDPA path loses the padding mask in the exported graph.
    model = AutoModel.from_pretrained(
        encoder_dir, local_files_only=True, use_safetensors=True, attn_implementation="eager"
    ).eval()

    class Pooled(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    wrapped = Pooled(model).eval()
    probe = [
        "short",
        "a somewhat longer sentence, so that the batch is padded",
        "The medication helped, although the first week brought headaches and some nausea.",
    ]
    enc = tokenizer(
        probe, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    with torch.inference_mode():
        expected = wrapped(enc["input_ids"], enc["attention_mask"]).numpy()
    torch.onnx.export(
        wrapped,
        (enc["input_ids"], enc["attention_mask"]),
        str(out),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(
        None,
        {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()},
    )[0]
    diff = float(np.abs(got - expected).max())
    if diff > EXPORT_PARITY:
        raise RuntimeError(f"the exported encoder differs from PyTorch by {diff:.2e}")
    return diff


def has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies int8 without saturating: not x86 (ARM's dot products do not
    saturate), or x86 with VNNI (AVX512_VNNI or AVX_VNNI). ``cpuinfo``: /proc/cpuinfo's text."""
    import platform

    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
            return True
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return True  # not Linux: nothing to read, assume the common case
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_vnni", "avx_vnni"})


def float_nodes(model_path: Path, vnni: bool) -> list[str]:
    """The MatMul nodes to leave in float: none on a VNNI CPU; without VNNI, the feed-forward
    output projections (``layer.N/output/dense``).

    Without VNNI, ONNX Runtime multiplies uint8 activations by int8 weights with VPMADDUBSW,
    whose 16-bit pair sums saturate; the feed-forward output's inputs (after GELU) have the
    widest ranges, and transformer int8 loses most there (the outliers of Bondarenko et al.,
    2021). Measured on an AVX2-only EPYC with the fine-tuned sentiment:v2: all MatMuls in int8
    gave an embedding cosine of 0.987 to the float encoder and failed the macro-F1 gate (0.491
    against 0.502); without the six projections, cosine 0.993, at 1.3 instead of 1.5 times the
    float encoder's speed."""
    if vnni:
        return []
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and "/output/dense/" in n.name and "/attention/" not in n.name
    ]


def weighted_matmuls(graph: Any) -> list[Any]:
    """The MatMul nodes of ``graph`` whose second input is a weight (an initializer used by
    that node alone): the ones dynamic quantisation turns into int8 products."""
    from collections import Counter

    inits = {i.name for i in graph.initializer}
    uses = Counter(name for n in graph.node for name in n.input)
    return [
        n
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and uses[n.input[1]] == 1
    ]


def smooth_activations(
    src: Path,
    out: Path,
    texts: list[str],
    tokenizer_file: Path,
    max_tokens: int,
    *,
    alpha: float = SMOOTH_ALPHA,
    exclude: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """SmoothQuant (Xiao et al., 2023) on the float graph ``src``, written to ``out``.

    Dynamic quantisation gives each activation tensor one scale, so a few outlier channels
    (transformers have them, widest after GELU) leave the other channels a handful of int8
    levels. For every weighted MatMul ``x @ W`` (but ``exclude``), per input channel j:
    ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` over the calibration ``texts`` (``W``: the
    weights of every MatMul that reads ``x``, which share ``s``); the graph
    computes ``(x / s) @ (diag(s) W)``, the same product in float (a ``Mul`` by ``1/s`` before
    the MatMul; ``W``'s rows scaled), whose activations quantise with far less error. Returns
    how it went (for the quality gate's record)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from runners.onnx import feed_of, load_tokenizer

    model = onnx.load(str(src))
    graph = model.graph
    targets = [n for n in weighted_matmuls(graph) if n.name not in set(exclude)]
    # MatMuls reading one tensor (a layer's query, key and value) share its scale, so the
    # tensor is divided, and quantised at run time, once.
    groups: dict[str, list[Any]] = {}
    for node in targets:
        groups.setdefault(node.input[0], []).append(node)
    # The calibration pass: the float graph, with each smoothed activation as an output too.
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # not read from disk twice
    probe.graph.output.extend(
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in groups
    )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    tokenizer = load_tokenizer(tokenizer_file, max_tokens)
    ordered = sorted(texts, key=len)
    amax: list[np.ndarray | None] = [None] * len(groups)
    for start in range(0, len(ordered), 32):
        batch = tokenizer.encode_batch(ordered[start : start + 32])
        for k, act in enumerate(session.run(None, feed_of(batch))[1:]):
            m = np.abs(act).reshape(-1, act.shape[-1]).max(axis=0)
            amax[k] = m if amax[k] is None else np.maximum(amax[k], m)
    inits = {i.name: i for i in graph.initializer}
    for k, (name, nodes) in enumerate(groups.items()):
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        a = np.maximum(amax[k], 1e-5)  # type: ignore[arg-type]
        w = np.maximum(np.max([np.abs(wt).max(axis=1) for wt in weights], axis=0), 1e-5)
        scale = (a**alpha / w ** (1 - alpha)).astype(np.float32)
        for node, weight in zip(nodes, weights, strict=True):
            inits[node.input[1]].CopyFrom(
                numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), node.input[1])
            )
        inv = f"smooth_inv_scale_{k}"
        graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inv))
        smoothed = f"{name}/smoothed"
        mul = helper.make_node("Mul", [name, inv], [smoothed], name=f"smooth_mul_{k}")
        graph.node.insert(list(graph.node).index(nodes[0]), mul)
        for node in nodes:
            node.input[0] = smoothed
    onnx.save(model, str(out))
    return {
        "applied": True,
        "method": "SmoothQuant (Xiao et al., 2023): per input channel of each quantised "
        "MatMul, activations divided and weights multiplied by max|x|^alpha / max|W|^(1-alpha)",
        "alpha": alpha,
        "matmuls": len(targets),
        "scales": len(groups),
        "calibration_texts": len(texts),
    }


def quantize_int8(src: Path, out: Path, vnni: bool | None = None) -> list[str]:
    """Dynamic int8 quantisation of the weights (activations quantised at run time); on a CPU
    without VNNI, except the nodes :func:`float_nodes` names. Returns those nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = float_nodes(src, has_vnni() if vnni is None else vnni)
    quantize_dynamic(
        str(src),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=keep,
    )
    return keep


def _dataset_of(source: StoredModel, dataset: Any = None) -> Any:
    """The data set ``source`` was trained on (by name, or ``dataset``), checked by sha256."""
    from training.data import load_named

    meta = source.metadata["dataset"]
    dataset = dataset if dataset is not None else load_named(meta["name"])
    if dataset.sha256 != meta["sha256"]:
        raise DataError(
            f"{source.tag} was trained on {meta['name']} with sha256 {meta['sha256'][:16]}…, "
            f"but the data set found now has {dataset.sha256[:16]}…"
        )
    return dataset


def optimize_int8(
    source_tag: str,
    dest_tag: str,
    *,
    reports_dir: Path | None = None,
    overwrite: bool = False,
    max_f1_drop: float = MAX_F1_DROP,
    dataset: Any = None,
    log: Any = print,
) -> StoredModel:
    """Write the int8 ONNX variant of transformer model ``source_tag`` as ``dest_tag`` (see the
    module docstring). ``dataset``: the source's training data, when it is not a built-in data
    set. Raises :class:`QualityGateError` when it fails the gate."""
    from runners import load_runner
    from runners.onnx import ENCODER_FILE, TOKENIZER_FILE, OnnxEncoder
    from training.candidates import fit_linear_head
    from training.evaluate import selection_metric
    from training.pipeline import (
        TrainConfig,
        TrainingRun,
        _calibrate,
        _plain_baseline,
        _split,
        save_result,
        verify_reload,
    )

    source = open_model(source_tag)
    if source.family != "transformer":
        raise DataError(f"{source_tag} is a {source.family} model; only transformer models are")
    meta = source.metadata
    dataset = _dataset_of(source, dataset)
    cleaning = CleaningConfig(**meta["preprocessing"]["cleaning"])
    max_tokens = int(meta["preprocessing"]["max_tokens"])
    cfg = TrainConfig(candidates=("minilm",), seed=int(meta["dataset"]["seed"]), cleaning=cleaning)
    cfg.max_tokens = max_tokens
    labels = list(meta["labels"])
    if sorted(labels) != sorted(dataset.classes):
        raise DataError(f"{source_tag}'s labels {labels} are not the data set's {dataset.classes}")
    y_all = np.array([labels.index(label) for label in dataset.labels])
    train_idx, val_idx, test_idx = _split(dataset, cfg)
    cleaned = clean_texts(dataset.texts, cleaning)
    t_train, t_val, t_test = ([cleaned[i] for i in idx] for idx in (train_idx, val_idx, test_idx))
    y_train, y_val, y_test = (y_all[idx] for idx in (train_idx, val_idx, test_idx))

    work = Path(tempfile.mkdtemp(prefix="mlserve-optimize-"))
    try:
        started = time.perf_counter()
        enc_dir = work / "encoder"
        enc_dir.mkdir()
        parity = export_encoder(source.path / "encoder", work / "float.onnx", max_tokens)
        vnni = has_vnni()
        # SmoothQuant where int8 products do not saturate. Without VNNI (VPMADDUBSW's 16-bit
        # pair sums saturate) it was measured on an AVX2-only EPYC, smoothing the 30 MatMuls
        # that are quantised there: validation cosine to the float encoder 0.9933 -> 0.9949,
        # but the gate no better (label agreement 0.973 against 0.993, macro-F1 0.498 against
        # 0.497) at the same speed, so the recipe measured there stays (FFN outputs in float).
        smoothing: dict[str, Any] = {"applied": False, "why": "no VNNI"}
        graph = work / "float.onnx"
        if vnni:
            smoothing = smooth_activations(
                graph,
                work / "smoothed.onnx",
                t_train[:SMOOTH_CALIBRATION_TEXTS],
                source.path / "encoder" / TOKENIZER_FILE,
                max_tokens,
            )
            graph = work / "smoothed.onnx"
        kept_float = quantize_int8(graph, enc_dir / ENCODER_FILE, vnni)
        shutil.copy2(source.path / "encoder" / TOKENIZER_FILE, enc_dir / TOKENIZER_FILE)
        log(f"exported and quantised the encoder (float parity {parity:.1e})")

        encoder = OnnxEncoder(enc_dir, threads=cfg.n_jobs, max_tokens=max_tokens)
        emb_train, emb_val = (encoder.embed(t).astype(np.float64) for t in (t_train, t_val))
        fit = fit_linear_head(
            encoder.embed,
            emb_train,
            y_train,
            emb_val,
            y_val,
            cfg.seed,
            name="minilm-int8-onnx+linear_head",
            family="onnx",
            kind="minilm_int8_linear_head",
            encoder=f"all-MiniLM-L6-v2 from {source_tag}, ONNX, dynamic int8 (per channel)",
            write_encoder=lambda directory: shutil.copytree(enc_dir, directory / "encoder"),
            max_tokens=max_tokens,
        )
        splits = {
            name: {labels[k]: int((y == k).sum()) for k in range(len(labels))}
            for name, y in (("train", y_train), ("validation", y_val), ("test", y_test))
        }
        counts = np.bincount(y_train, minlength=len(labels)).astype(float)
        # The source's calibration method and decision rule, refitted on the int8 scores.
        inherited = Calibrator.from_dict(
            json.loads((source.path / "calibration.json").read_text(encoding="utf-8"))
        )
        result = _calibrate(fit, t_val, y_val, t_test, y_test, labels, cfg, counts, inherited)

        # The float model's answers on the same test texts, as it serves them.
        float_runner = load_runner(source_tag, warmup=False)
        try:
            float_probs = float_runner.infer(t_test).probabilities
            float_pred = float_runner.calibrator.decide(float_probs)
        finally:
            float_runner.close()
        int8_pred = result.calibrator.decide(result.test_probs)
        float_f1 = float(meta["metrics"]["test"]["f1_macro"])
        gate = {
            "source": source_tag,
            "quantization": "onnxruntime quantize_dynamic, int8 weights (per channel)"
            + (", after SmoothQuant" if smoothing["applied"] else "")
            + (
                f"; {len(kept_float)} feed-forward output MatMuls left in float (no VNNI)"
                if kept_float
                else ""
            ),
            "float_nodes": kept_float,
            "smoothing": smoothing,
            "calibration": f"{inherited.method}, {inherited.decision_rule} (the source's, "
            "refitted on validation)",
            "export_parity_max_abs": parity,
            "label_agreement": round(float((float_pred == int8_pred).mean()), 4),
            "max_probability_difference": round(
                float(np.abs(float_probs - result.test_probs).max()), 4
            ),
            "test_f1_macro": round(result.test["f1_macro"], 4),
            "float_test_f1_macro": round(float_f1, 4),
            "max_f1_drop": max_f1_drop,
            "test_ece": round(result.test["ece"], 4),
            "float_test_ece": round(float(meta["metrics"]["test"]["ece"]), 4),
            "ms_per_text_batch1": result.speed["ms_per_text_batch1"],
            "ms_per_text_batch32": result.speed["ms_per_text_batch32"],
            "float_ms_per_text_batch1": meta.get("speed", {}).get("ms_per_text_batch1"),
            "float_ms_per_text_batch32": meta.get("speed", {}).get("ms_per_text_batch32"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        log(
            f"quality gate: macro-F1 {gate['test_f1_macro']:.3f} (float {float_f1:.3f}), "
            f"agreement {gate['label_agreement']:.3f}, "
            f"largest probability difference {gate['max_probability_difference']:.3f}, "
            f"ECE {gate['test_ece']:.3f}, {gate['ms_per_text_batch32']} ms/text at batch 32 "
            f"(float {gate['float_ms_per_text_batch32']})"
        )
        if result.test["f1_macro"] < float_f1 - max_f1_drop:
            raise QualityGateError(
                f"not saved: the int8 variant's test macro-F1 {result.test['f1_macro']:.3f} is "
                f"more than {max_f1_drop} below {source_tag}'s {float_f1:.3f}"
            )
        gate["passed"] = True

        run = TrainingRun(
            dataset,
            cfg,
            labels,
            splits,
            [result],
            t_test,
            y_test,
            selection_metric(splits["train"]),
            _plain_baseline(t_train, y_train, t_test, y_test, labels),
        )
        reason = (
            f"int8 ONNX variant of {source_tag}; quality gate passed (macro-F1 within "
            f"{max_f1_drop} of the float model's)"
        )
        stored = save_result(
            run,
            result,
            dest_tag,
            reason,
            reports_dir,
            overwrite=overwrite,
            extra={"quality_gate": gate, "optimized_from": source_tag},
        )
        verify_reload(stored, run, result)
        return stored
    finally:
        shutil.rmtree(work, ignore_errors=True)
