"""``python -m bench [--quick | --tiny] [--out DIR] [--rounds N] [--ranks 8 64]``.

Runs on the first JAX device (a GPU when there is one, else the CPU), prints
the markdown tables, and writes ``results.json`` (every raw figure and the
machine), ``results.md`` and ``results.png`` into ``--out``.
"""

import argparse
import os
import sys
import time

from bench.cli import HelpFormatter


TINY_TRAIN = ("lora_jax", "hand", "naive", "full")  # --tiny: fewer compiles


def parse(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                              formatter_class=HelpFormatter)
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                    help="small sizes, a few minutes on 2 CPU cores")
  mode.add_argument("--tiny", action="store_const", dest="mode", const="tiny",
                    help="toy sizes (smoke test)")
  p.set_defaults(mode="full")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                 help="folder for the JSON, markdown table and PNG chart (default: bench/results)")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed steps per figure (default: 2 with --tiny, 10 with --quick, 12)")
  p.add_argument("--ranks", type=int, nargs="+", default=[8, 64],
                 help="LoRA ranks to measure (default: 8 64)")
  p.add_argument("--only", default=None,
                 help="substring of the workload names to run (default: none, all of them)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse(argv)
  from bench import measure, report, workloads  # jax is imported here, after parsing

  rounds = args.rounds or {"tiny": 2, "quick": 10, "full": 12}[args.mode]
  machine = measure.machine()
  print(f"# lora_jax bench ({args.mode}) on {machine['platform']} / "
        f"{machine['device_kind']}, {machine['cpu_count']} CPUs", flush=True)
  results, t0 = [], time.perf_counter()
  for spec in workloads.specs(args.mode):
    if args.only and args.only not in spec.name:
      continue
    for rank in args.ranks:
      rank = min(rank, spec.d // 2) if args.mode == "tiny" else rank
      results.append(workloads.run(spec, rank, rounds,
                                   compile_repeats=1 if args.mode == "tiny" else 3,
                                   exact_flops=args.mode != "tiny",
                                   train_only=TINY_TRAIN if args.mode == "tiny" else None,
                                   log=lambda m: print(f"{time.perf_counter() - t0:6.1f}s {m}",
                                                       file=sys.stderr, flush=True)))
  paths = report.save(args.out, machine, results, vars(args))
  print(report.markdown(machine, results))
  print(f"\nwrote {', '.join(paths.values())} in {time.perf_counter() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
