"""Markdown tables, the JSON file and the PNG chart of a benchmark run."""

import json
import os

from bench import goals

ORDER = ("lora_jax", "hand", "naive", "nnx", "qwix", "full", "frozen", "merged")


def _ms(t):
  return f"{1e3 * t['median_s']:.1f} ({1e3 * t['min_s']:.1f}–{1e3 * t['max_s']:.1f})"


def _mb(b):
  return f"{b / 2**20:.1f}"


def _fmt(v, digits=2):
  return "—" if v is None else f"{v:.{digits}f}"


def goals_table(results) -> str:
  lines = ["| workload | r | goal | target | measured (min–max) | |",
           "| --- | --- | --- | --- | --- | --- |"]
  for res in results:
    for row in goals.evaluate(res):
      spread = row["spread"]
      meas = _fmt(row["value"], 3)
      if spread:
        meas += f" ({spread[0]:.2f}–{spread[1]:.2f})"
      verdict = {True: "met", False: "**missed**", None: "n/a"}[row["met"]]
      lines.append(f"| {res['workload']} | {res['rank']} | {row['goal']} | ≤ {row['target']} "
                   f"| {meas} | {verdict} |")
  return "\n".join(lines)


def train_table(results) -> str:
  lines = ["| workload | r | contender | train step ms, median (min–max) | / full FT wall "
           "| XLA GFLOPs | / full FT FLOPs | opt state MiB | compiled peak MiB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for res in results:
    tr = res["train"]
    full = tr.get("full")
    for name in ORDER:
      e = tr.get(name)
      if name in res["skipped"]:
        lines.append(f"| {res['workload']} | {res['rank']} | {name} | skipped: "
                     f"{res['skipped'][name][:90]} | | | | | |")
      if not isinstance(e, dict):
        continue
      lines.append(
          f"| {res['workload']} | {res['rank']} | {name} | {_ms(e['time'])} "
          f"| {e['time']['median_s'] / full['time']['median_s']:.2f} "
          f"| {e['flops'] / 1e9:.2f} | {e['flops'] / full['flops']:.2f} "
          f"| {_mb(e['opt_state_bytes'])} | {_mb(e['memory'].get('peak_bytes', 0))} |")
    fl = res["flop_floor"]
    if res.get("exact_flops"):  # the floor is computed for the mlp / decoder shapes
      lines.append(f"| {res['workload']} | {res['rank']} | analytic LoRA floor | | "
                   f"| {fl['lora_floor'] / 1e9:.2f} | {fl['lora_floor'] / fl['full_ft']:.2f} | | |")
  inexact = sorted({r["workload"] for r in results if not r.get("exact_flops")})
  if inexact:
    lines.append(f"\n{', '.join(inexact)}: XLA's cost analysis counts a scanned "
                 "layer body once, so these FLOPs are not the whole step's.")
  return "\n".join(lines)


def forward_table(results) -> str:
  lines = ["| workload | r | phase | contender | forward ms, median (min–max) | / merged |",
           "| --- | --- | --- | --- | --- | --- |"]
  for res in results:
    for phase in ("prefill", "decode"):
      merged = res[phase]["merged"]["median_s"]
      for name in ORDER:
        e = res[phase].get(name)
        if e:
          lines.append(f"| {res['workload']} | {res['rank']} | {phase} | {name} "
                       f"| {_ms(e)} | {e['median_s'] / merged:.2f} |")
  return "\n".join(lines)


def merge_table(results) -> str:
  lines = ["| workload | r | merge ms | copy ms | merge / copy | extra MiB (temp + unaliased out) "
           "| largest kernel MiB | compile lora(f) s | compile f s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for res in results:
    m, c = res["merge"], res["compile"]
    mem = m["memory"]
    extra = mem.get("temp_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0) - mem.get(
        "alias_size_in_bytes", 0)
    lines.append(f"| {res['workload']} | {res['rank']} | {_ms(m['time'])} | {_ms(m['copy_time'])} "
                 f"| {m['time']['median_s'] / m['copy_time']['median_s']:.2f} | {_mb(extra)} "
                 f"| {_mb(m['largest_kernel_bytes'])} | {c['lora_forward']['median_s']:.2f} "
                 f"| {c['base_forward']['median_s']:.2f} |")
  return "\n".join(lines)


def markdown(machine, results) -> str:
  head = (f"Machine: {machine['platform']} / {machine['device_kind']}, "
          f"{machine['cpu_count']} CPUs, jax {machine['jax']}, flax {machine['flax']}, "
          f"qwix {machine['qwix']}. float32. Times: median (min–max) of interleaved steps.")
  return "\n\n".join([head, "### Goals", goals_table(results), "### Train step",
                      train_table(results), "### Forward", forward_table(results),
                      "### Merge and compile", merge_table(results)])


def write_json(path, machine, results, args) -> None:
  payload = {"machine": machine, "args": args,
             "results": [dict(r, goals=goals.evaluate(r)) for r in results]}
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=str)


def chart(path, results) -> None:
  """Train-step and forward wall time of each contender, relative to lora_jax."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("train", "train step / full FT"), ("prefill", "prefill / merged"),
            ("decode", "decode / merged")]
  fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(results) + 3), squeeze=False)
  labels = [f"{r['workload']} r={r['rank']}" for r in results]
  for ax, (section, title) in zip(axes[0], panels):
    names = [n for n in ORDER if any(
        isinstance(r[section].get(n), dict) for r in results)]
    width = 0.8 / max(len(names), 1)
    for j, n in enumerate(names):
      vals = []
      for r in results:
        e = r[section].get(n)
        ref = r[section]["full" if section == "train" else "merged"]
        t = (e or {}).get("time", e) if section == "train" else e
        rt = ref["time"] if section == "train" else ref
        vals.append(t["median_s"] / rt["median_s"] if t else 0.0)
      ax.barh([i + j * width for i in range(len(results))], vals, height=width, label=n)
    ax.set_yticks([i + 0.4 - width / 2 for i in range(len(results))], labels)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_title(title)
    ax.invert_yaxis()
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def save(out_dir, machine, results, args) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "results.json"),
           "png": os.path.join(out_dir, "results.png"),
           "md": os.path.join(out_dir, "results.md")}
  write_json(paths["json"], machine, results, args)
  with open(paths["md"], "w") as f:
    f.write(markdown(machine, results) + "\n")
  chart(paths["png"], results)
  return paths
