"""The markdown tables of docs/performance.md's GPU section, from the JSON of bench/gpu_throughput.py.

    python bench/gpu_table.py gpu.json            # prints the tables
    python bench/gpu_table.py gpu.json -o gpu.md  # also writes them
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

SIDE_NAMES = {"reference_adr": "reference ADR (`AdvTrainer._train_one_epoch`)",
              "robustkd_adr_defaults": "robustkd ADR, defaults (float32)",
              "robustkd_adr_fast": "robustkd ADR, speed modes",
              "reference_bmtard": "reference B-MTARD (script's loop body)",
              "robustkd_mtard_defaults": "robustkd B-MTARD preset, defaults (float32)",
              "robustkd_mtard_fast": "robustkd B-MTARD preset, speed modes"}


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def throughput_table(part: dict[str, Any]) -> list[str]:
    lines = [f"Batch {part.get('batch_size')}, {part.get('rounds')} rounds x {part.get('steps_per_round')} timed steps "
             "per side (order rotated each round).", "",
             "| side | images/s | vs reference (median of rounds) | peak memory, GiB | warm-up, s | host syncs per step |",
             "| --- | --- | --- | --- | --- | --- |"]
    ratios = part.get("ratio_to_reference", {})
    for name, side in part.get("sides", {}).items():
        label = SIDE_NAMES.get(name, name)
        if "error" in side:
            first = side["error"].strip().splitlines()
            lines.append(f"| {label} | failed: {first[-1][:120] if first else '?'} | | | | |")
            continue
        sync = side.get("sync_check", {})
        syncs = sync.get("syncs_per_step", sync.get("skipped", sync.get("error", "–")))
        ratio = 1.0 if name.startswith("reference") and "images_per_second" in side else ratios.get(name)
        lines.append(f"| {label} | {_f(side.get('images_per_second'), 0)} | {_f(ratio)}x | "
                     f"{_f(side.get('peak_memory_gib'))} | {_f(side.get('setup', {}).get('warmup_seconds'), 0)} | "
                     f"{_f(syncs)} |")
    if "error" in part:
        lines += ["", f"Stopped by an error: `{part['error'].strip().splitlines()[-1][:200]}`"]
    if "stopped_early" in part:
        lines += ["", f"Stopped early: {part['stopped_early']}."]
    return lines


def accuracy_table(part: dict[str, Any]) -> list[str]:
    lines = [f"`{part.get('recipe')}`, {part.get('epochs')} epochs on the shared training images; the fast runs add "
             f"`{' '.join(part.get('fast_flags', []))}`. Accuracy (%) on the shared test split.", "",
             "| precision | seed | clean | PGD-20 | EMA clean | EMA PGD-20 | speed settings in run_config.json | "
             "run, s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_mode: dict[str, list[tuple[float, float]]] = {}
    for r in part.get("runs", []):
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['seed']} | failed: {r['error'][:120]} | | | | | {_f(r.get('seconds'), 0)} |")
            continue
        m, e = r.get("model", {}), r.get("ema", {})
        rc = r.get("run_config", {})
        settings = ", ".join(f"{k}={rc.get(k)}" for k in ("mixed_precision", "compile", "channels_last", "tf32"))
        ok = "" if r.get("flags_reached_trainer") else " (NOT as asked)"
        if r.get("returncode") not in (0, None):
            ok += f" (recipe exit status {r['returncode']}: see accuracy-logs.txt)"
        lines.append(f"| {r['mode']} | {r['seed']} | {_pct(m.get('clean'))} | {_pct(m.get('pgd20'))} | "
                     f"{_pct(e.get('clean'))} | {_pct(e.get('pgd20'))} | {settings}{ok} | {_f(r.get('seconds'), 0)} |")
        if m.get("clean") is not None and m.get("pgd20") is not None:
            by_mode.setdefault(r["mode"], []).append((m["clean"], m["pgd20"]))
    if len(by_mode) == 2:
        lines += ["", "| precision | runs | clean, mean | PGD-20, mean |", "| --- | --- | --- | --- |"]
        for mode, vals in by_mode.items():
            lines.append(f"| {mode} | {len(vals)} | {_pct(statistics.mean(v[0] for v in vals))} | "
                         f"{_pct(statistics.mean(v[1] for v in vals))} |")
    return lines


def autoattack_table(part: dict[str, Any]) -> list[str]:
    lines = [f"AutoAttack {part.get('version')} on {part.get('points')} test points, model `{part.get('model')}`.", "",
             "| path | seconds | robust accuracy, % | peak memory, GiB |", "| --- | --- | --- | --- |"]
    rk = part.get("robustkd", {})
    robust = rk.get("result", {}).get("robust_accuracy", {})
    robust = robust.get("autoattack") if isinstance(robust, dict) else robust
    lines.append(f"| robustkd `autoattack` attack (`robustkd.eval.robustness.evaluate`) | {_f(rk.get('seconds'), 1)} | "
                 f"{_pct(robust)} | {_f(rk.get('peak_memory_gib'))} |")
    d = part.get("pyautoattack_direct", {})
    lines.append(f"| `pyautoattack.AutoAttack.run_standard_evaluation` | {_f(d.get('seconds'), 1)} | "
                 f"{_pct(d.get('robust_accuracy'))} | {_f(d.get('peak_memory_gib'))} |")
    return lines


def hf_table(part: dict[str, Any]) -> list[str]:
    lines = ["| RobustTrainer step (ADR), MiniLM architecture | s/step (median) | sequences/s | peak memory, GiB |",
             "| --- | --- | --- | --- |"]
    for key, r in part.items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {key} | {(r.get('skipped') or r['error'].strip().splitlines()[-1])[:120]} | | |")
            continue
        lines.append(f"| {key}, batch {r['batch_size']}, length {r['seq_len']} | {_f(r['seconds_per_step_median'], 3)} | "
                     f"{_f(r['sequences_per_second'], 0)} | {_f(r['peak_memory_gib'])} |")
    return lines


def goals(parts: dict[str, Any]) -> list[str]:
    ratios = parts.get("adr", {}).get("ratio_to_reference", {})
    out = []
    if "robustkd_adr_fast" in ratios:
        r = ratios["robustkd_adr_fast"]
        out.append(f"- ADR with the speed modes: **{r:.2f}x** the reference's images/s (goal >= 2x: "
                   f"{'met' if r >= 2 else 'not met'}).")
    if "robustkd_adr_defaults" in ratios:
        r = ratios["robustkd_adr_defaults"]
        out.append(f"- ADR with defaults: **{r:.2f}x** the reference (goal: within 5 %: "
                   f"{'met' if r >= 0.95 else 'not met'}).")
    return out


def render(result: dict[str, Any]) -> str:
    parts = result.get("parts", {})
    head = [f"Measured on {result.get('device')} (torch {result.get('torch')}, CUDA {result.get('cuda')}, "
            + ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
            + f"), {result.get('started')}, {result.get('elapsed_seconds', 0):.0f} s in all"
            + (" — **dry run at toy size on the CPU: not a measurement**" if result.get("dry_run") else "") + ".",
            "", "```bash", f"python {result.get('command')}", "```", ""]
    body: list[str] = []
    body += goals(parts) + ([""] if goals(parts) else [])
    for key, title, fn in (("adr", "ADR epoch slice (ResNet-18, PGD-10)", throughput_table),
                           ("mtard", "B-MTARD epoch slice (ResNet-18 student, PGD-10)", throughput_table),
                           ("accuracy", "Accuracy after a short training: float32 vs the speed modes", accuracy_table),
                           ("autoattack", "AutoAttack", autoattack_table),
                           ("hf", "RobustTrainer on MiniLM", hf_table)):
        if key in parts:
            part = parts[key]
            body += [f"#### {title}", ""]
            body += ([f"Failed: `{part['error'].strip().splitlines()[-1][:300]}`"]
                     if set(part) == {"error"} else fn(part)) + [""]
    return "\n".join(head + body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="the --output of bench/gpu_throughput.py")
    p.add_argument("-o", "--output", default=None, help="also write the markdown here")
    args = p.parse_args()
    path = Path(args.json)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {path} is not a readable JSON from bench/gpu_throughput.py ({exc}); pass the file its "
              "--output wrote", file=sys.stderr)
        sys.exit(2)
    text = render(result)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
