"""The evaluation's numbers: per-image scores averaged per subject, per prompt and overall, written to
OUT/results.json and as a Markdown table (OUT/results.md) beside the paper's rows."""

from __future__ import annotations

import json
import os

import numpy as np

METRICS = ("dino", "clip_i", "clip_t")
HEADERS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
# BLIP-Diffusion (Li, Li, Hoi 2023), DreamBench table.
PAPER = {
    "BLIP-Diffusion zero-shot (paper)": {"dino": 0.594, "clip_i": 0.779, "clip_t": 0.300},
    "BLIP-Diffusion fine-tuned (paper)": {"dino": 0.670, "clip_i": 0.805, "clip_t": 0.302},
}


def means(rows: list[dict]) -> dict:
    """Mean of each metric over `rows` (None where no row has it), and the number of images."""
    out = {}
    for metric in METRICS:
        values = [row[metric] for row in rows if row.get(metric) is not None]
        out[metric] = float(np.mean(values)) if values else None
    out["images"] = len(rows)
    return out


def grouped(rows: list[dict], key: str) -> dict:
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return {name: means(group) for name, group in groups.items()}


def summarise(rows: list[dict], settings: dict, real: dict | None = None) -> dict:
    """The content of results.json: settings, overall / per-subject / per-prompt means, the real images'
    scores against each other (when measured), the paper's rows and every image's scores."""
    results = {
        "clip": settings.get("clip"), "dino": settings.get("dino"), "settings": settings,
        "overall": means(rows), "subjects": grouped(rows, "subject"), "prompts": grouped(rows, "prompt_key"),
        "paper": PAPER, "images": rows,
    }
    if real is not None:
        results["real_images"] = real
    return results


def _cell(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def ours_label(settings: dict) -> str:
    mode = "fine-tuned" if settings.get("finetuned") else "zero-shot"
    return (f"ours: {os.path.basename(os.path.normpath(str(settings.get('model'))))}, {mode}, "
            f"{settings.get('steps')} steps, guidance {settings.get('guidance')}, {settings.get('scheduler')}")


def markdown(results: dict) -> str:
    """The main table (the paper's rows, ours, the real images' bound) and one row per subject."""
    settings, overall = results["settings"], results["overall"]
    subjects = len(results["subjects"])
    lines = [
        f"DreamBench: {subjects} subjects, {overall['images']} images ({settings.get('images_per_prompt')} per prompt); "
        f"CLIP {results['clip']}, DINO {results['dino']}, reference: {settings.get('reference')}",
        "",
        "| | DINO | CLIP-I | CLIP-T | images |",
        "|---|---|---|---|---|",
    ]
    for label, row in PAPER.items():
        lines.append(f"| {label} | {row['dino']:.3f} | {row['clip_i']:.3f} | {row['clip_t']:.3f} | |")
    lines.append(f"| {ours_label(settings)} | {_cell(overall['dino'])} | {_cell(overall['clip_i'])} | "
                 f"{_cell(overall['clip_t'])} | {overall['images']} |")
    real = results.get("real_images")
    if real is not None:
        lines.append(f"| real images against each other (upper bound) | {_cell(real['dino'])} | {_cell(real['clip_i'])} | "
                     f"– | {real['images']} |")
    lines += ["", "The paper's rows are its published numbers; compare with the same CLIP backbone and images per prompt.",
              "", "| subject | DINO | CLIP-I | CLIP-T | images |", "|---|---|---|---|---|"]
    for name, row in results["subjects"].items():
        lines.append(f"| {name} | {_cell(row['dino'])} | {_cell(row['clip_i'])} | {_cell(row['clip_t'])} | {row['images']} |")
    return "\n".join(lines) + "\n"


def write_results(out: str, results: dict) -> tuple[str, str]:
    """OUT/results.json and OUT/results.md, each written whole (a temporary file renamed into place)."""
    paths = []
    for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("results.md", markdown(results))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return tuple(paths)
