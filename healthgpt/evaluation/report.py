"""Markdown tables in the paper's column layouts.

- Table 1 (comprehension): ``VQA-RAD close/all | SLAKE close/all | PathVQA close/all |
  MMMU-Med | OMVQA | Avg.`` (Avg. = mean of the eight columns, shown only when all are known).
- Table 9 (OmniMedVQA): ``CT | X-ray | FDM | MiS | OCT | MRI | USS | Avg.``.
- Tables 2 and 11 (modality conversion, reconstruction): per task ``SSIM | PSNR | MSE``, tasks as
  column groups; Table 3 (super-resolution): ``SSIM | PSNR | MSE | LPIPS``.

Every text number says which scoring protocol (``protocols.py``) it follows: Table 1 has one
row per protocol, labelled ``model [strict]`` / ``model [llava-med]`` (the run's chosen protocol
first; a summary written before both were kept gives only its own), Table 9 labels its row with
the run's protocol, and a legend under the tables says what ``llava-med`` means.

Two header rows (group names, then metric names) are written as the paper review prints them:
the first is the markdown header, the second the first body row. Missing values print ``-``;
LPIPS without weights prints ``n/a``. Percentages: one decimal for text benchmarks, two for
images (as in the paper).
"""

from __future__ import annotations

from healthgpt.evaluation.data import BENCHMARKS
from healthgpt.evaluation.normalise import TABLE9_MODALITIES
from healthgpt.evaluation.protocols import DEFAULT_PROTOCOL, PROTOCOLS, suffix

__all__ = ["table1", "table9", "image_table", "details_table", "bench_tables", "combined_tables"]

VQA_BENCHES = ("vqa-rad", "slake", "pathvqa")

PROTOCOL_LEGEND = ("Protocols: [strict] = our rules (closed: first yes/no word; multiple choice: letter or "
                   "option text, unparsed rows wrong); [llava-med] = the published scorers: LLaVA-Med's "
                   "run_eval.py for VQA close/all (closed: 'yes'/'no' substring + answer substring), "
                   "HuatuoGPT-Vision's match_choice3 for MMMU-Med/OMVQA.")


def _fmt(x, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list, rows: list[list]) -> str:
    lines = [_row(header), _row(["---"] * len(header))]
    lines += [_row(r) for r in rows]
    return "\n".join(lines)


def protocol_value(summary: dict | None, key: str, protocol: str):
    """``summary[key_<protocol>]``; for a summary written before both protocols were kept, its
    plain ``key`` when it was scored under ``protocol`` (such summaries are ``strict``)."""
    if not summary:
        return None
    keyed = f"{key}_{suffix(protocol)}"
    if keyed in summary:
        return summary[keyed]
    return summary.get(key) if summary.get("protocol", DEFAULT_PROTOCOL) == protocol else None


def _protocol_order(summaries) -> list[str]:
    chosen = next((s.get("protocol") for s in summaries if s and s.get("protocol")), DEFAULT_PROTOCOL)
    return [chosen] + [p for p in PROTOCOLS if p != chosen]


def _table1_row(summaries: dict[str, dict], label: str, protocol: str) -> list | None:
    vals = []
    for b in VQA_BENCHES:
        s = summaries.get(b)
        vals += [protocol_value(s, "close", protocol), protocol_value(s, "all", protocol)]
    vals += [protocol_value(summaries.get("mmmu-med"), "accuracy", protocol),
             protocol_value(summaries.get("omnimedvqa"), "accuracy", protocol)]
    if all(v is None for v in vals):
        return None
    avg = sum(vals) / len(vals) if all(v is not None for v in vals) else None
    return [f"{label} [{protocol}]"] + [_fmt(v, 1) for v in vals + [avg]]


def table1(summaries: dict[str, dict], model: str) -> str:
    """Paper Table 1 rows for ``model`` from ``{bench: summary}`` (any subset of benchmarks),
    one per protocol with numbers, labelled with it."""
    groups = ["", "VQA-RAD", "", "SLAKE", "", "PathVQA", "", "", "", ""]
    sub = ["Model", "close", "all", "close", "all", "close", "all", "MMMU-Med", "OMVQA", "Avg."]
    rows = [_table1_row(summaries, model, p) for p in _protocol_order(summaries.values())]
    return _table(groups, [sub] + [r for r in rows if r is not None])


def table9(summary: dict, model: str) -> str:
    """Paper Table 9 row (OmniMedVQA accuracy per modality, then the benchmark's ``accuracy``)."""
    cols = list(TABLE9_MODALITIES)
    label = f"{model} [{summary.get('protocol', DEFAULT_PROTOCOL)}]"
    return _table(["Model"] + cols + ["Avg."],
                  [[label] + [_fmt(summary.get(c), 1) for c in cols] + [_fmt(summary.get("accuracy"), 1)]])


def image_table(bench: str, summary: dict, model: str) -> str:
    """Tables 2/11 layout (tasks as column groups) or Table 3 layout (super-resolution)."""
    tasks = summary.get("tasks") or {}
    with_lpips = bench == "super-resolution" or summary.get("lpips") is not None
    metrics = [("ssim", "SSIM ↑"), ("psnr", "PSNR ↑"), ("mse", "MSE ↓")]
    if with_lpips:
        metrics.append(("lpips", "LPIPS ↓"))

    def cell(s, key):
        if key == "lpips" and s.get(key) is None:
            return "n/a"
        return _fmt(s.get(key), 2)

    if bench == "super-resolution" and len(tasks) <= 1:
        return _table(["Model"] + [m for _, m in metrics], [[model] + [cell(summary, k) for k, _ in metrics]])
    groups, sub, vals = [""], ["Model"], [model]
    for t, s in tasks.items():
        groups += [t] + [""] * (len(metrics) - 1)
        sub += [m for _, m in metrics]
        vals += [cell(s, k) for k, _ in metrics]
    return _table(groups, [sub, vals])


def details_table(bench: str, summary: dict) -> str:
    """Everything the paper table leaves out (counts, both open scorings, per-modality n, ...)."""
    fam = BENCHMARKS[bench].family
    if fam == "vqa":
        keys = ["protocol", "n", "n_closed", "n_open", "close", "open", "all", "open_scoring", "open_recall",
                "all_recall", "open_choice", "all_choice", "closed_unparsed", "open_choice_unparsed",
                "close_strict", "close_llava_med", "closed_llava_med_only", "closed_strict_only",
                "close_llava_med_script", "closed_llava_med_dropped", "open_recall_strict",
                "open_recall_llava_med", "open_precision_llava_med", "open_f1_llava_med",
                "open_exact_llava_med", "open_accuracy_llava_med", "all_strict", "all_llava_med"]
        return _table(["metric", "value"], [[k, _val(summary.get(k))] for k in keys if k in summary])
    if fam == "choice":
        rows = [["all", _val(summary.get("accuracy_micro")), summary.get("n")]]
        rows += [[m, _val(v["accuracy"]), v["n"]] for m, v in (summary.get("modalities") or {}).items()]
        head = _table(["modality", "accuracy", "n"], rows)
        text = head + f"\n\naccuracy = {_val(summary.get('accuracy'))} ({summary.get('accuracy_basis')})"
        per = [[p, _val(summary.get(f"accuracy_{suffix(p)}")), _val(summary.get(f"accuracy_micro_{suffix(p)}")),
                _val(summary.get(f"unparsed_{suffix(p)}")), (summary.get("rules") or {}).get(p, "-")]
               for p in PROTOCOLS if f"accuracy_{suffix(p)}" in summary]
        if per:
            text += "\n\n" + _table(["protocol", "accuracy", "accuracy_micro", "unparsed", "rule"], per)
        return text
    rows = []
    for t, s in [("all", summary)] + list((summary.get("tasks") or {}).items()):
        rows.append([t, s.get("n"), s.get("psnr_identical"), _val(s.get("psnr_of_mean_mse"))])
    return (_table(["task", "n", "identical (PSNR inf)", "PSNR of mean MSE"], rows)
            + f"\n\nLPIPS: {summary.get('lpips_status')}")


def _val(v):
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def bench_tables(bench: str, summary: dict, model: str) -> str:
    """The markdown written to ``table.md`` for one benchmark run."""
    spec = BENCHMARKS[bench]
    parts = [f"## {spec.title} ({bench})", ""]
    if spec.family == "image":
        parts.append(image_table(bench, summary, model))
    else:
        parts.append(table1({bench: summary}, model))
        if bench == "omnimedvqa" or any(m in summary for m in TABLE9_MODALITIES):
            parts += ["", table9(summary, model)]
        parts += ["", PROTOCOL_LEGEND]
    parts += ["", "Details:", "", details_table(bench, summary), ""]
    return "\n".join(parts)


def combined_tables(summaries: list[dict]) -> str:
    """Paper tables from several ``summary.json`` contents (each with ``bench`` and ``model``)."""
    by_model: dict[str, dict[str, dict]] = {}
    for s in summaries:
        by_model.setdefault(s.get("model", "model"), {})[s["bench"]] = s
    parts = []
    text = {m: {b: s for b, s in d.items() if BENCHMARKS[b].family != "image"} for m, d in by_model.items()}
    if any(text.values()):
        rows = [table1(d, m).splitlines() for m, d in text.items() if d]
        # each table: group header, rule, metric names, then one row per protocol
        parts += ["## Table 1: comprehension", "", "\n".join(rows[0] + [x for r in rows[1:] for x in r[3:]]), ""]
    omni = [(m, d["omnimedvqa"]) for m, d in by_model.items() if "omnimedvqa" in d]
    if omni:
        rows = [table9(s, m).splitlines() for m, s in omni]
        parts += ["## Table 9: OmniMedVQA", "", "\n".join(rows[0] + [r[-1] for r in rows[1:]]), ""]
    if any(text.values()):
        parts += [PROTOCOL_LEGEND, ""]
    for bench in ("modality-conversion", "super-resolution", "reconstruction"):
        for m, d in by_model.items():
            if bench in d:
                parts += [f"## {BENCHMARKS[bench].title}", "", image_table(bench, d[bench], m), ""]
    return "\n".join(parts)
