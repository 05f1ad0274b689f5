"""The GPU suite's records as one Markdown page (summary.md): what a person reads first, with
the targets beside the ratios. Every figure in it is also in the sections' JSON files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MIB = 2**20


def markdown(documents: dict[str, dict[str, Any]], targets: dict[str, float]) -> str:
    parts = [_environment(documents.get("environment"))]
    for name, render in (
        ("correctness", _correctness),
        ("inference", lambda doc: _inference(doc, targets)),
        ("training", lambda doc: _training(doc, targets)),
        ("max_batch", _max_batch),
        ("end_to_end", _end_to_end),
        ("jpeg_pipeline", lambda doc: _jpeg_pipeline(doc, targets)),
        ("more_models", _more_models),
        ("ml_decoder", lambda doc: _ml_decoder(doc, targets)),
    ):
        if name in documents:
            parts.append(render(documents[name]))
    parts.append(_problems(documents))
    return "\n\n".join(part for part in parts if part) + "\n"


def _environment(doc: dict[str, Any] | None) -> str:
    results = (doc or {}).get("results", {})
    env, gpu = results.get("environment", {}), results.get("gpu", {})
    if not env:
        return "# GPU suite"
    versions = env.get("versions", {})
    smi = gpu.get("nvidia_smi") or []
    lines = [
        f"# GPU suite: {gpu.get('name', '?')}, {env.get('date', '')}",
        "",
        f"jax {versions.get('jax')} (jaxlib {versions.get('jaxlib')}, backend {env.get('jax_backend')}), "
        f"torch {versions.get('torch')} (CUDA {gpu.get('torch_cuda')}, cuDNN {gpu.get('cudnn')}), "
        f"timm {versions.get('timm')}, flax {versions.get('flax')}, Python {env.get('python')}; "
        f"{env.get('cpu')}, {env.get('cpu_cores')} cores; bf16 peak {_number(gpu.get('bf16_peak_tflops'), '.0f')} "
        "TFLOP/s (dense).",
    ]
    if len(smi) > 1:
        lines.append(f"nvidia-smi: {smi[1]}")
    return "\n".join(lines)


def _correctness(doc: dict[str, Any]) -> str:
    results = doc.get("results", {})
    images = results.get("images", {})
    lines = [
        f"## Correctness: {images.get('model', 'tresnet_m')}, {images.get('source', '?')}",
        "",
        "| check | dtype | matmul precision | error vs timm float32 | relative L2 vs float32 | top-1 agreement "
        "| top-5 agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        if name == "images" or not isinstance(row, dict):
            continue
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | | |")
            continue
        lines.append(
            f"| {name} | {row.get('dtype')} | {row.get('matmul_precision')} | {_number(row.get('vs_timm_float32'))} | "
            f"{_number(row.get('relative_l2_vs_fp32'))} | {_percent(row.get('top1_agreement'))} | "
            f"{_percent(row.get('top5_agreement'))} |"
        )
    return "\n".join(lines)


RUNNERS = ("jax", "timm_eager", "timm_channels_last", "timm_compile")


def _comparison_rows(results: dict[str, Any], extra: Callable[[dict[str, Any]], list[str]] | None = None) -> list[str]:
    """One line per configuration: images/s of each runner and JAX's ratios (and ``extra``
    cells from the configuration's result)."""
    lines = []
    for key, result in results.items():
        if "error" in result:
            lines.append(f"| {key} | failed: {result['error']} |")
            continue
        if not result.get("rows"):
            continue
        rows = {row["runner"]: row for row in result["rows"]}
        first = result["rows"][0]
        rates = [
            _number(rows[r].get("images_per_s"), ".0f") if r in rows and "error" not in rows[r] else "–"
            for r in RUNNERS
        ]
        cells = extra(result) if extra else []
        lines.append(
            f"| {first['model']} | {first['precision']} | {first['batch_size']} | {' | '.join(rates)} | "
            f"{_ratio(result.get('jax_over_best_eager'))} | {_ratio(result.get('jax_over_compile'))} |"
            + "".join(f" {cell} |" for cell in cells)
        )
    return lines


def _inference(doc: dict[str, Any], targets: dict[str, float]) -> str:
    header = [
        f"## Inference (images/s; JAX ÷ timm: targets ≥ {targets['jax_over_best_eager']}× the best AMP eager, "
        f"≥ {targets['jax_over_compile']}× torch.compile)",
        "",
        "| model | precision | batch | JAX | timm eager | timm channels_last | timm torch.compile | JAX ÷ best eager "
        "| JAX ÷ torch.compile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + _comparison_rows(doc.get("results", {})))


def _training(doc: dict[str, Any], targets: dict[str, float]) -> str:
    results = doc.get("results", {})

    def jax_cells(result: dict[str, Any]) -> list[str]:
        jax_row = next((row for row in result["rows"] if row["runner"] == "jax"), {})
        how = "from the cache" if (jax_row.get("compilation_cache") or {}).get("hits") else "cold"
        return [_percent(jax_row.get("peak_fraction")), f"{_number(jax_row.get('compile_s'), '.1f')} ({how})"]

    per_image = next((r.get("stated_flops_per_image") for r in results.values() if "rows" in r), None)
    header = [
        f"## Training step (images/s; targets as inference, and ≥ {targets['training_peak_fraction']:.0%} of the "
        f"bf16 peak at {_number(per_image and per_image / 1e9, '.1f')} GFLOP per image)",
        "",
        "| model | precision | batch | JAX | timm eager | timm channels_last | timm torch.compile | JAX ÷ best eager "
        "| JAX ÷ torch.compile | JAX, of bf16 peak | JAX compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + _comparison_rows(results, jax_cells))


def _max_batch(doc: dict[str, Any]) -> str:
    results = doc.get("results", {})
    lines = [
        "## Largest training batch (fresh process per probe)",
        "",
        "| side | largest that fits | smallest that does not | peak memory per image at the training batch (MiB) "
        "| compile at the training batch (s) |",
        "|---|---|---|---|---|",
    ]
    for side in ("jax", "timm_eager"):
        first = results.get(f"{side}_at_training_batch") or {}
        search = results.get(f"{side}_search") or {}
        if not first and not search:
            continue
        peak, batch = first.get("peak_memory_bytes"), first.get("batch")
        per_image = peak / batch / MIB if peak and batch else None
        cache = first.get("compilation_cache") or {}
        compile_s = _number(first.get("compile_s"), ".1f") + (" (from the cache)" if cache.get("hits") else "")
        lines.append(
            f"| {side} | {search.get('largest_fitting', search.get('error', '–'))} | "
            f"{search.get('smallest_failing') or '–'} | {_number(per_image, '.1f')} | {compile_s} |"
        )
    return "\n".join(lines)


def _end_to_end(doc: dict[str, Any]) -> str:
    results = doc.get("results", {})
    data = results.get("data", {})
    lines = [
        "## End to end (the library's compiled steps, synthetic batches from the host; TensorFlow "
        f"{'importable' if data.get('tensorflow_importable') else 'not importable'} here)",
        "",
        "| what | images/s | compile (s) | notes |",
        "|---|---|---|---|",
    ]
    for key in ("training_step", "evaluation_step", "host_jpeg_decoding"):
        row = results.get(key)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {key} | failed: {row['error']} | | |")
            continue
        notes = [
            f"{k} {format(v, '.3g') if isinstance(v, float) else v}"
            for k, v in row.items()
            if k not in ("images_per_s", "compile_s")
        ]
        lines.append(
            f"| {key} | {_number(row.get('images_per_s'), '.0f')} | {_number(row.get('compile_s'), '.1f')} | "
            f"{', '.join(notes)} |"
        )
    return "\n".join(lines)


JPEG_RUNS = ("train_jpeg", "train_synthetic", "train_jpeg_host", "eval_jpeg", "eval_synthetic", "eval_jpeg_host")


def _jpeg_pipeline(doc: dict[str, Any], targets: dict[str, float]) -> str:
    results = doc.get("results", {})
    setup, images, found = results.get("setup", {}), results.get("images") or {}, results.get("ratios") or {}
    model = f"{setup.get('model')}, {setup.get('precision')}, batch {setup.get('batch')}, {setup.get('image_size')} px"
    lines = [
        f"## train.py and eval.py on JPEGs ({model}; {setup.get('files')} files: {setup.get('images_written')} "
        f"written and hard links to them; {setup.get('host_cores')} host cores)",
        "",
    ]
    if "writing_s" in images:
        width, height = images["mean_size"]
        lines += [
            f"Wrote {images['images']} ImageNet-like images ({images['progressive']} progressive, "
            f"{images['png_named_jpg']} PNG named .jpg; mean {width:.0f}×{height:.0f}, {images['mib']:.0f} MiB) "
            f"in {images['writing_s']:.1f} s with {images['workers']} processes ({images['wall_s']:.1f} s in all).",
            "",
        ]
    met = found.get("target_met") or {}

    def verdict(name: str, text: str) -> str:
        bound = "≤" if name.startswith("host") else "≥"
        mark = "" if met.get(name) is None else (", met" if met[name] else ", **not met**")
        return f"{text} (target {bound} {targets.get(name)}{mark})"

    host_path = [_ratio(found.get(f"{c}_jpeg_host_over_synthetic")) for c in ("train", "eval")]
    lines += [
        "- train.py, JPEG ÷ synthetic: "
        + verdict("train_jpeg_over_synthetic", _ratio(found.get("train_jpeg_over_synthetic"))),
        "- eval.py, JPEG ÷ synthetic (steady rates): "
        + verdict("eval_jpeg_over_synthetic", _ratio(found.get("eval_jpeg_over_synthetic"))),
        "- host core-ms per training image: "
        + verdict("host_core_ms_per_train_image", _number(found.get("host_core_ms_per_train_image"), ".2f")),
        f"- the host path (`--augment host --decode host`) ÷ synthetic: train {host_path[0]}, eval {host_path[1]}",
        "",
        "| run | images/s | steady | compile (s) | host cores | host core-ms per image | unreadable or skipped "
        "| wall (s) | decoding, as the command said |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in JPEG_RUNS:
        row = results.get(key)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {key} | failed: {row['error']} | | | | | | | |")
            continue
        lost = row.get("skipped_images", row.get("unreadable_images"))
        cells = [
            key + (" (stopped)" if row.get("stopped") else ""),
            _number(row.get("images_per_s"), ".0f"),
            _number(row.get("images_per_s_steady", row.get("images_per_s_window")), ".0f"),
            _number(row.get("compile_s"), ".1f"),
            _number(row.get("host_cores"), ".1f"),
            _number(row.get("host_core_ms_per_image"), ".2f"),
            "–" if lost is None else str(lost),
            _number(row.get("wall_s"), ".0f"),
            "; ".join(row.get("decoding_lines") or []) or "–",
        ]
        lines.append(f"| {' | '.join(cells)} |")
    lines += [
        "",
        f"train.py: images/s is the median of the metrics rows after the first {setup.get('skip_rows')} "
        f"({setup.get('log_every')} steps a row), steady the mean over the same steps; eval.py: images/s as it "
        "reports it (first batch included), steady after the first batch. Host cores: CPU seconds of the command "
        "and its workers (from /proc) over those steps.",
    ]
    return "\n".join(lines)


def _more_models(doc: dict[str, Any]) -> str:
    header = [
        "## More models (images/s; JAX ÷ timm)",
        "",
        "| model | precision | batch | JAX | timm eager | timm channels_last | timm torch.compile | JAX ÷ best eager "
        "| JAX ÷ torch.compile | mode |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + _comparison_rows(doc.get("results", {}), lambda result: [result.get("mode", "")]))


def _ml_decoder(doc: dict[str, Any], targets: dict[str, float]) -> str:
    results = doc.get("results", {})
    share, head = results.get("head_share") or {}, results.get("head_inference") or {}
    about = share or head
    lines = [
        f"## ML-Decoder ({about.get('model')}, {about.get('image_size')} px, {about.get('num_classes')} classes in "
        f"{about.get('num_groups')} groups, {about.get('precision')})",
        "",
    ]
    if "error" in share:
        lines.append(f"- share of the training step: failed: {share['error']}")
    elif share:
        lines.append(
            f"- share of the training step (batch {share['batch_size']}): {_percent(share['share_by_difference'])} "
            f"by the difference of the steps (with ML-Decoder {share['step_s_ml_decoder'] * 1e3:.1f} ms, with fc "
            f"{share['step_s_fc'] * 1e3:.1f} ms), {_percent(share['share_by_head_alone'])} by the head alone "
            f"({share['head_alone_s'] * 1e3:.1f} ms forward and backward), {_percent(share.get('flops_share'))} of "
            "the step's FLOPs (XLA's count)"
        )
    if "error" in head:
        lines.append(f"- inference against the official head: failed: {head['error']}")
    elif head:
        ratio, target = head["ours_over_official"], targets.get("ml_decoder_ours_over_official")
        ours, official = head["runners"]
        met = "met" if target is not None and ratio >= target else "**not met**"
        lines.append(
            f"- inference, ours ÷ the official head (timm's copy, PyTorch eager; batch {head['batch_size']}): "
            f"{_ratio(ratio)} (target ≥ {target}, {met}); {ours['images_per_s']:.0f} against "
            f"{official['images_per_s']:.0f} images/s; logits apart by "
            f"{_number(head['agreement']['max_abs_diff_over_max_abs'])} (max |diff| ÷ max(1, max |logit|))"
        )
    return "\n".join(lines)


def _problems(documents: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, doc in documents.items():
        if doc.get("error"):
            lines.append(f"- {name}: failed: {doc['error']}")
        lines += [f"- {name}: {s['item']} skipped ({s['reason']})" for s in doc.get("skipped", [])]
        lines += [
            f"- {name}: {key} failed: {value['error']}"
            for key, value in doc.get("results", {}).items()
            if isinstance(value, dict) and "error" in value and "traceback" in value
        ]
    return "\n".join(["## Skipped and failed", "", *lines]) if lines else ""


def _number(value: float | None, spec: str = ".2g") -> str:
    return "–" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"
