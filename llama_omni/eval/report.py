"""The report of a run: summary JSON, Markdown tables laid out like the paper's, PNG plot.

Table 1: judge scores (content, style) for speech-to-text and speech-to-speech.
Table 2: speech answers at the reference Omega: ASR-WER/CER, MOS, latency, fidelity.
Table 3: the chunk-size sweep: latency, lagging words, WER/CER and MOS per Omega.
Then decode time with and without speech, and latency against quality across Omega.
Means are over the items that have the value; WER/CER are corpus level.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

from llama_omni.eval.metrics import mean
from llama_omni.eval.wer import ErrorCounts, error_rates, median_item_wer
from llama_omni.eval.runner import CASCADE, MODEL, omega_name

PLOT_NAME = "latency_vs_quality.png"


def _stage(record: dict, name: str) -> dict | None:
    value = record.get(name)
    return value if isinstance(value, dict) and "error" not in value else None


def _speech_summary(stages: list[dict]) -> dict[str, Any]:
    counts = [ErrorCounts(**s["errors"]) if s.get("errors") else None for s in stages]
    wer, cer = error_rates(counts)
    dns = [s["dnsmos"] for s in stages if s.get("dnsmos")]
    return {
        "items": len(stages),
        "latency_ms": mean(s["first_audio_ms"] for s in stages),
        "lagging_words": mean(s["lagging_words"] for s in stages),
        "wer": wer, "cer": cer, "wer_median": median_item_wer(counts),
        "dnsmos_ovrl": mean(d["ovrl_mos"] for d in dns),
        "dnsmos_p808": mean(d["p808_mos"] for d in dns),
        "utmos": mean(s.get("utmos") for s in stages),
        "decode_ms": mean(s["total_ms"] for s in stages),
        "audio_seconds": mean(s["audio_seconds"] for s in stages),
        "no_audio": sum(1 for s in stages if s["first_audio_ms"] is None),
    }


def _judge_summary(records: list[dict], task: str) -> dict[str, Any]:
    scores = [r.get("judge", {}).get(task) for r in records]
    scored = [s for s in scores if s and s.get("content") is not None]
    return {"content": mean(s["content"] for s in scored), "style": mean(s["style"] for s in scored),
            "scored": len(scored), "unscored": sum(1 for s in scores if s and s.get("content") is None)}


def summarize(records: dict[str, list[dict]], run_info: dict[str, Any],
              chunk_sizes: tuple[int | None, ...], reference_omega: int | None) -> dict[str, Any]:
    """The numbers of every table, per system."""
    systems = {}
    for system, items in records.items():
        runs = ["cascade"] if system == CASCADE else [omega_name(o) for o in chunk_sizes]
        s2t = [s for s in (_stage(r, "s2t") for r in items) if s]
        speech = {run: [s for s in (_stage(r, f"s2s_{run}") for r in items) if s] for run in runs}
        systems[system] = {
            "s2t": {"items": len(s2t), "decode_ms": mean(s["total_ms"] for s in s2t),
                    "first_text_ms": mean(s["first_text_ms"] for s in s2t),
                    "fidelity": mean(r.get("fidelity") for r in items)},
            "s2s": {run: _speech_summary(stages) for run, stages in speech.items() if stages},
            "judge": {task: _judge_summary(items, task) for task in ("s2t", "s2s")},
            "failed_stages": sum(1 for r in items for v in r.values()
                                 if isinstance(v, dict) and "error" in v),
        }
    loads = [r.get("load_average") for items in records.values() for r in items]
    return {"run": run_info, "items": max((len(v) for v in records.values()), default=0),
            "load_average": mean(loads), "cpu_cores": os.cpu_count(),
            "reference_omega": omega_name(reference_omega), "systems": systems}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows]


def _reference_run(summary: dict, system: str) -> dict:
    runs = summary["systems"][system]["s2s"]
    return runs.get("cascade" if system == CASCADE else summary["reference_omega"], {})


def markdown(summary: dict[str, Any], plot: str | None = PLOT_NAME) -> str:
    run, systems = summary["run"], summary["systems"]
    omega = summary["reference_omega"]
    lines = ["# Evaluation report", ""]
    lines += [f"- **{k}**: {v}" for k, v in run.items() if k != "settings"]
    load = (f"- **machine load while generating** (1-min load average, mean over items): "
            f"{_fmt(summary['load_average'], 1)} on {summary['cpu_cores']} cores")
    lines += [f"- **items**: {summary['items']}", load, ""]
    lines += ["## Table 1: judge scores (1-5)", ""]
    rows = []
    for name, s in systems.items():
        j = s["judge"]
        rows.append([name] + [_fmt(j[t][k]) for t in ("s2t", "s2s") for k in ("content", "style")]
                    + [f"{j['s2t']['unscored'] + j['s2s']['unscored']}"])
    lines += _table(["System", "S2TIF content", "S2TIF style", "S2SIF content", "S2SIF style",
                     "unscored"], rows)
    lines += ["", f"## Table 2: speech answers (model at Omega = {omega})", ""]
    rows = []
    for name, s in systems.items():
        r = _reference_run(summary, name)
        rows.append([name, _fmt(r.get("wer")), _fmt(r.get("wer_median")), _fmt(r.get("cer")),
                     _fmt(r.get("dnsmos_ovrl")), _fmt(r.get("dnsmos_p808")), _fmt(r.get("utmos")),
                     _fmt(r.get("latency_ms"), 0), _fmt(r.get("lagging_words")),
                     _fmt(s["s2t"]["fidelity"], 3)])
    lines += _table(["System", "ASR-WER", "WER median", "ASR-CER", "DNSMOS OVRL", "DNSMOS P.808", "UTMOS",
                     "Latency (ms)", "Lagging words", "Fidelity"], rows)
    lines += ["", "## Table 3: chunk size Omega", ""]
    rows = []
    for name, s in systems.items():
        for label, r in s["s2s"].items():
            rows.append([label if name == MODEL else name, _fmt(r["latency_ms"], 0),
                         _fmt(r["lagging_words"]), _fmt(r["wer"]), _fmt(r["wer_median"]), _fmt(r["cer"]),
                         _fmt(r["dnsmos_ovrl"]), _fmt(r["utmos"]), _fmt(_seconds(r["decode_ms"]))])
    lines += _table(["Omega", "Latency (ms)", "Lagging words", "ASR-WER", "WER median", "ASR-CER",
                     "DNSMOS OVRL", "UTMOS", "Decode (s)"], rows)
    lines += ["", "## Decode time: text only vs text + speech", ""]
    rows = []
    for name, s in systems.items():
        text, speech = s["s2t"]["decode_ms"], _reference_run(summary, name).get("decode_ms")
        ratio = speech / text if text and speech else None
        rows.append([name, _fmt(_seconds(text)), _fmt(_seconds(speech)), _fmt(ratio)])
    lines += _table(["System", "S2T (s)", "S2S (s)", "ratio"], rows)
    if plot:
        lines += ["", "## Latency vs quality across Omega", "", f"![latency vs quality]({plot})"]
    return "\n".join(lines) + "\n"


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Latency against ASR-WER and against DNSMOS, one point per Omega (and the cascade)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "wer", "ASR-WER (%)"), (axes[1], "dnsmos_ovrl", "DNSMOS OVRL")):
        for system, s in summary["systems"].items():
            points = [(run, r["latency_ms"], r[key]) for run, r in s["s2s"].items()
                      if r["latency_ms"] is not None and r[key] is not None]
            if not points:
                continue
            style = "*" if system == CASCADE else "o-"
            ax.plot([p[1] for p in points], [p[2] for p in points], style, label=system, markersize=8)
            if system == MODEL:
                for run, x, y in points:
                    ax.annotate(f"Ω={run}", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("latency to first audio (ms)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(str(summary["run"].get("model", "")), 110)), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(summary: dict[str, Any], directory: str | Path) -> Path:
    """summary.json, report.md and the plot into `directory`; returns report.md's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, directory / PLOT_NAME)
    path = directory / "report.md"
    path.write_text(markdown(summary))
    return path
