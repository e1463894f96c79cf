"""Manifest assembly and the summary report of a data build."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from llama_omni.data.config import STEPS

REQUIRED_STEPS = ("rewrite", "respond", "synthesize")  # what an item needs to be in the manifest


def assemble(items: list[dict], records: dict[str, dict[str, dict]]) -> Iterator[dict]:
    """Manifest items (manifest.py format) for every item whose text and speech steps all
    succeeded; units are added where the units step succeeded."""
    for item in items:
        done = {name: records[name].get(item["id"]) for name in STEPS}
        if not all(done[name] and done[name]["ok"] for name in REQUIRED_STEPS):
            continue
        speech = done["synthesize"]
        assistant = {"role": "assistant", "text": done["respond"]["text"],
                     "audio": speech["response_audio"], "voice": speech["response_voice"]}
        if done["units"] and done["units"]["ok"]:
            assistant.update(units=done["units"]["units"], units_model=done["units"]["units_model"])
        yield {
            "id": item["id"],
            "source": item["source"],
            "turns": [{"role": "user", "text": done["rewrite"]["text"],
                       "audio": speech["instruction_audio"], "voice": speech["voice"]},
                      assistant],
            "original": {"instruction": item["text"], "response": item.get("response")},
        }


def summarize(items: list[dict], records: dict[str, dict[str, dict]], manifest: list[dict],
              selection: dict) -> dict:
    """Counts per step (ok, failed by reason, methods, fallbacks), time per item, audio hours."""
    steps = {}
    for name in STEPS:
        done = [records[name][i["id"]] for i in items if i["id"] in records[name]]
        failed = [r for r in done if not r["ok"]]
        steps[name] = {
            "done": len(done),
            "ok": len(done) - len(failed),
            "failed": len(failed),
            "failures": dict(Counter(r["reason"] for r in failed).most_common()),
            "seconds_per_item": _mean([r["seconds"] for r in done]),
            "cpu_seconds_per_item": _mean([r["cpu_seconds"] for r in done if "cpu_seconds" in r]),
            "not_done": len(items) - len(done),
        }
        methods = Counter(r["method"] for r in done if "method" in r)
        if methods:
            steps[name]["methods"] = dict(methods.most_common())
            fallbacks = Counter(r["fallback_reason"] for r in done if r.get("fallback_reason"))
            steps[name]["fallback_reasons"] = dict(fallbacks.most_common())
            steps[name]["rejected_attempts"] = dict(
                Counter(reason for r in done for reason in r.get("rejected", [])).most_common())
            steps[name]["llm_attempts"] = sum(r.get("attempts", 0) for r in done)
    speech = [records["synthesize"][m["id"]] for m in manifest]
    voices = Counter(s["voice"] for s in speech)
    return {
        "selection": {"selected": selection["selected"], "rejected": selection["rejected"]},
        "steps": steps,
        "manifest": {"items": len(manifest),
                     "with_units": sum("units" in m["turns"][1] for m in manifest)},
        "audio_hours": {
            "instruction": round(sum(s["instruction_seconds"] for s in speech) / 3600, 3),
            "response": round(sum(s["response_seconds"] for s in speech) / 3600, 3),
        },
        "instruction_voices": dict(voices.most_common()),
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def format_report(report: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"selected {report['selection']['selected']} items "
             f"(rejected: {report['selection']['rejected']})"]
    for name, step in report["steps"].items():
        line = (f"{name:>10}: {step['ok']} ok, {step['failed']} failed, {step['not_done']} not done"
                f", {step['seconds_per_item']} s/item ({step['cpu_seconds_per_item']} s CPU)")
        if step["failures"]:
            line += f"; failures {step['failures']}"
        if step.get("methods"):
            line += f"; methods {step['methods']}"
        lines.append(line)
    hours = report["audio_hours"]
    lines.append(f"manifest: {report['manifest']['items']} items "
                 f"({report['manifest']['with_units']} with units); audio "
                 f"{hours['instruction']} h instructions + {hours['response']} h responses")
    return "\n".join(lines)
