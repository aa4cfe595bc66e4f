"""lora_jax benchmark suite: ``python -m bench [--quick] [--out DIR]``.

Every figure is a ratio taken within one run, on one machine, with the
contenders interleaved step by step (see ``bench/measure.py``). Modules:

* ``models``     the workloads' models (Linen MLP stack, scanned decoder, NNX MLP);
* ``peers``      the contenders: lora_jax, naive W + s·A·B, hand-written factored,
                 Flax NNX LoRALinear, qwix, full fine-tuning, frozen base;
* ``measure``    timing, XLA cost / memory analysis, compile time, machine info;
* ``workloads``  sizes (tiny / quick / full) and one workload's measurements;
* ``goals``      the project's targets and their met / missed verdicts;
* ``report``     markdown table, JSON, PNG chart;
* ``serving``    ``python -m bench.serving [--quick]``: mixed-adapter batches
                 (``adapter_ids``) vs one adapter, the base, merged, a per-adapter loop;
* ``qlora_memory`` ``python -m bench.qlora_memory``: QLoRA memory proxies.
"""
