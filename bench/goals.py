"""The project's performance targets, and their verdicts on measured results.

Each goal is a ratio with an upper bound. ``evaluate(result)`` returns one row
per goal that applies to the workload: ``{goal, target, value, spread, met}``;
``spread`` is the (min, max) of the ratio over the timed steps where it is a
wall-time ratio (min of one over max of the other, and vice versa).
"""

import math

LIBRARY_PEERS = ("naive", "nnx", "qwix")  # "hand" is the floor, with its own bound


def _t(res, section, name):
  entry = res[section].get(name)
  if entry is None:
    return None
  return entry["time"] if section == "train" else entry


def _ratio(a, b):
  if a is None or b is None:
    return None, None
  value = a["median_s"] / b["median_s"]
  return value, (a["min_s"] / b["max_s"], a["max_s"] / b["min_s"])


def _row(goal, target, value, spread=None, note=""):
  met = None if value is None or math.isnan(value) else bool(value <= target)
  return {"goal": goal, "target": target, "value": value, "spread": spread,
          "met": met, "note": note}


def evaluate(res: dict) -> list[dict]:
  rows = []
  tr = res["train"]
  ours = _t(res, "train", "lora_jax")
  big_mlp = res["kind"] == "mlp" and res["spec"]["d"] >= 1024
  if big_mlp:
    rows.append(_row("train FLOPs / full FT", 0.70,
                     tr["lora_jax"]["flops"] / tr["full"]["flops"]))
    rows.append(_row("train wall / full FT", 0.75,
                     *_ratio(ours, _t(res, "train", "full"))))
  floor = res["flop_floor"]["lora_floor"]
  if res["kind"] != "mlp" and res.get("exact_flops"):
    rows.append(_row("train FLOPs / analytic floor", 1.03, tr["lora_jax"]["flops"] / floor))
  rows.append(_row("train wall / hand-written", 1.10, *_ratio(ours, _t(res, "train", "hand"))))
  rows.append(_row("train wall / frozen base", 1.08, *_ratio(ours, _t(res, "train", "frozen"))))
  for phase, target in (("prefill", 1.03), ("decode", 1.05)):
    rows.append(_row(f"{phase}: unmerged / merged", target,
                     *_ratio(res[phase].get("lora_jax"), res[phase].get("merged"))))
    rows.append(_row(f"{phase}: unmerged / hand-written", 1.10,
                     *_ratio(res[phase].get("lora_jax"), res[phase].get("hand"))))
  m = res["merge"]
  rows.append(_row("merge / copy of the same bytes", 1.5, *_ratio(m["time"], m["copy_time"])))
  mem = m["memory"]
  extra = mem.get("temp_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0) - mem.get(
      "alias_size_in_bytes", 0)
  rows.append(_row("merge peak extra memory / largest kernel", 1.0,
                   extra / m["largest_kernel_bytes"]))
  c = res["compile"]
  rows.append(_row("compile lora(f) / f", 1.5, *_ratio(c["lora_forward"], c["base_forward"])))
  for peer in LIBRARY_PEERS:
    for section in ("train", "prefill", "decode"):
      other = _t(res, section, peer)
      if other is None:
        continue
      mine = ours if section == "train" else res[section].get("lora_jax")
      rows.append(_row(f"{section}: lora_jax / {peer}", 1.0, *_ratio(mine, other)))
  return rows
