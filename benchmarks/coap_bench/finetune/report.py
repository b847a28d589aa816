"""The fine-tuning run as a table, with the base model's reference loss, LoRA against COAP at equal bytes and
the targets below it, and its plots."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from ..report import (
    _number,
    _pyplot,
    failed_columns,
    finished_results,
    format_bytes,
    job_table,
    lr_sweep_text,
    measurement_columns,
    measurement_header,
    peak_memory_kind,
    percent,
    plot_job_curves,
    run_remarks,
    scale_text,
    schedule_text,
    sweep_edge_listing,
)
from ..training import FINAL_LOSS_WINDOW

__all__ = ["format_finetune_table", "write_finetune_plots"]

#: The measurement columns (the memory ones widened by the adapter), and the loss relative to the base model's.
_HEADER = [
    "optimizer",
    "lr",
    "trainable",
    "state",
    "adapter",
    "state+adapter",
    "vs AdamW",
    *measurement_header("tok/s")[4:],
    "vs base",
]

_NOTES = (
    "trainable: parameters that get a gradient; state: optimizer-state bytes after training (every tensor "
    "reachable from the state, each storage once, step counters excluded); adapter: LoRA's adapter weights; "
    "state+adapter: the memory a method adds to the frozen or trained weights besides gradients, and its "
    "ratio to AdamW's state; peak mem: {peak}; iter / step ms: median over all steps of forward+backward+step "
    "/ of optimizer.step() alone; refresh ms: mean time a projection refresh adds to its step; tok/s: batch "
    "tokens / median iteration; final loss: mean of the last {window} batch losses; held-out loss: mean token "
    "cross-entropy on the fixed held-out windows of the fine-tuning corpus; vs base: relative to the base "
    "model's before fine-tuning."
)


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"


def _columns(result: dict[str, Any], base_loss: float) -> list[str]:
    if result.get("failed"):
        return failed_columns(result, len(_HEADER), skipped=1)
    (name, lr, state, _state_ratio, peak, iteration, iteration_ratio, step, refresh, tokens, final, heldout, rel) = (
        measurement_columns(result, "tokens_per_s")
    )
    adapter = format_bytes(result["adapter_bytes"]) if result["adapter_bytes"] else "-"
    return [
        name,
        lr,
        _count(result.get("trainable_parameters")),
        state,
        adapter,
        format_bytes(result["state_plus_adapter_bytes"]),
        _number(result.get("memory_ratio_to_adamw"), ".3f"),
        peak,
        iteration,
        iteration_ratio,
        step,
        refresh,
        tokens,
        final,
        heldout,
        rel,
        percent(result["heldout_loss"] / base_loss - 1),
    ]


def _base_line(run: dict[str, Any]) -> str:
    base = run["base_model"]
    if base["default"]:
        key = base["key"]
        made = (
            f"coap-bench llama's {key['preset']} LLaMA ({base['parameters']:,} parameters), pretrained with AdamW "
            f"for {key['steps']} steps on {key['corpus']} (held-out loss there "
            f"{_number((base.get('pretraining') or {}).get('heldout_loss'), '.4f')})"
            + (", from the cache" if base["from_cache"] else ", pretrained now and cached")
        )
    else:
        made = f"{base['path']} ({base['parameters']:,} parameters)"
    return f"base model: {made}"


def _data_line(run: dict[str, Any]) -> str:
    data = run["data"]
    packages = data.get("packages")
    versions = f" ({', '.join(f'{k} {v}' for k, v in packages.items())})" if packages else ""
    return (
        f"fine-tuning corpus: {data['corpus_name']}{versions}, {data['train_documents']} train / "
        f"{data['heldout_documents']} held-out documents, {data['train_tokens']:,} / {data['heldout_tokens']:,} "
        f"tokens (sha256 {data['corpus_sha256'][:12]}), {run['config']['heldout_windows']} held-out windows"
    )


def _recipe_line(run: dict[str, Any]) -> str:
    config = run["config"]
    low = config["low_rank"]
    lrs = ", ".join(f"{name} {lr:g}" for name, lr in config["lrs"].items())
    lora = run.get("lora")
    lora_text = (
        f"; LoRA rank {lora['rank']} (alpha {lora['alpha']:g}) on {lora['targets']} projections"
        + (", matched to CoapAdamW's state" if lora["matched"] else "")
        if lora
        else ""
    )
    return (
        f"recipe: the paper's LLaVA fine-tuning row, every matrix offered for projection at rank min(m, n) // "
        f"{low['rank_ratio']:g} (COAP T_u {low['update_interval']}, lambda {low['reproject_factor']}; GaLore "
        f"update_proj_gap {low['proj_gap']}; update scale {scale_text(low['scale'])}){lora_text}; weight decay "
        f"{low['weight_decay']:g}; peak lr: {lrs}{lr_sweep_text(config)}"
    )


def _comparison_lines(run: dict[str, Any]) -> list[str]:
    found = run.get("targets", {})
    lines = [
        f"reference: the base model before fine-tuning: held-out loss {found.get('base_heldout_loss', float('nan')):.4f}"
    ]
    lora = found.get("coap_matches_lora_at_equal_bytes")
    if lora:
        lines.append(
            f"COAP vs LoRA: CoapAdamW's state {format_bytes(lora['coap_state_bytes'])} vs LoRA's adapter + AdamW "
            f"state {format_bytes(lora['lora_adapter_plus_state_bytes'])} ({lora['bytes_ratio']:.2f}x); held-out "
            f"loss {lora['coap_heldout_loss']:.4f} vs {lora['lora_heldout_loss']:.4f} ({percent(lora['relative'])})"
        )
    names = {
        "coap_state_le_50pct_adamw": "COAP state <= 50% of AdamW's",
        "coap_heldout_within_2pct_adamw": "COAP held-out loss within 2% of AdamW's",
        "coap_no_worse_than_galore": "COAP held-out loss <= GaLore's at equal rank",
        "coap_iteration_le_1.10x_adamw": "COAP iteration time <= 1.10x AdamW's",
        "coap_matches_lora_at_equal_bytes": "COAP held-out loss <= LoRA's at comparable bytes",
    }
    judged = [f"{text}: {'met' if found[key]['met'] else 'NOT met'}" for key, text in names.items() if key in found]
    if judged:
        lines.append("targets: " + "; ".join(judged))
    return lines


def format_finetune_table(run: dict[str, Any], *, notes: bool = True) -> str:
    """The run as a Markdown table, one row per method, with the setup above and the comparisons below."""
    config = run["config"]
    title = f"finetune {config['preset']}: " + schedule_text(
        config, f"{config['batch_size']} x {config['seq_len']} tokens"
    )
    base_loss = run["base_model"]["heldout_loss"]
    rows = [_columns(r, base_loss) for r in run["results"]]
    comparisons = [line for part in _comparison_lines(run) for line in textwrap.wrap(part, width=120)]
    remarks = [*comparisons, *run_remarks(run, sweep_edge=sweep_edge_listing)]
    peak = peak_memory_kind(run["results"])
    notes_text = _NOTES.format(window=FINAL_LOSS_WINDOW, peak=peak) if notes else None
    above = [title, _base_line(run), _data_line(run), _recipe_line(run)]
    return job_table(above, _HEADER, rows, remarks, notes_text)


def write_finetune_plots(run: dict[str, Any], directory: str | Path) -> list[Path] | None:
    """Write ``finetune_loss.png`` (training loss curves, the base model's held-out loss as a line) and
    ``finetune_heldout_vs_memory.png`` (held-out loss against state plus adapter bytes); ``None`` if
    matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    directory = Path(directory)
    paths = plot_job_curves(plt, run, directory, "finetune")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for result in finished_results(run["results"]):
        ax.scatter([result["state_plus_adapter_bytes"] / 2**20], [result["heldout_loss"]], label=result["name"])
    ax.axhline(run["base_model"]["heldout_loss"], color="gray", linestyle="--", label="base model")
    ax.set_xlabel("optimizer state + adapter (MiB)")
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out loss vs optimizer state + adapter")
    ax.legend()
    fig.tight_layout()
    scatter_path = directory / "finetune_heldout_vs_memory.png"
    fig.savefig(scatter_path, dpi=120)
    plt.close(fig)
    return [*paths, scatter_path]
