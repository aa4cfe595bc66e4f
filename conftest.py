"""Test setup: 8 simulated CPU devices (for the mesh tests) and strict promotion.

XLA_FLAGS must be set before jax is imported, so it is set here, first.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# The quick subset (`pytest -n 2 -m "not slow"`, README: Run the tests) leaves
# out the tests marked slow: those that run an example or a benchmark end to
# end carry @pytest.mark.slow; the ones below were the slowest of the rest
# (pytest --durations, 2 shared CPU cores), named here so that no test file
# needs an edit. Each entry is a node id, with or without its [parameters].
SLOW = frozenset({
    "lora_jax/_src/models/llama.py::lora_jax._src.models.llama.Llama",
    "lora_jax/_src/models/moe.py::lora_jax._src.models.moe.Mixtral",
    "tests/test_bench_compile_time.py::test_lora_and_hand_written_programs_agree",
    "tests/test_checkpoint_hardening.py::test_concurrent_create_exactly_one_wins",
    "tests/test_combine.py::test_cat_is_the_weighted_sum_of_deltas",
    "tests/test_dora.py::test_gradients_equal_materialized_reference",
    "tests/test_dora.py::test_multi_axis_kernels",
    "tests/test_dora_peft.py::test_lora_jax_dora_exports_to_peft",
    "tests/test_dora_peft.py::test_peft_dora_adapter_loads_with_equal_logits",
    "tests/test_explicit_sharding.py::test_llama_tensor_parallel_trains_and_generates",
    "tests/test_explicit_sharding.py::test_mixtral_tensor_parallel_trains",
    "tests/test_explicit_sharding.py::test_qlora_train_step_matches_one_device",
    "tests/test_flops.py::test_lora_compiles_to_the_hand_written_factored_program",
    "tests/test_generate_cached.py::test_decode_step_updates_the_cache_in_place",
    "tests/test_generate_cached.py::test_eos_pads_finished_rows_like_uncached",
    "tests/test_generate_cached.py::test_greedy_equals_uncached",
    "tests/test_generate_cached.py::test_prefill_and_decode_compile_once_per_shape",
    "tests/test_generate_cached.py::test_sampling_with_the_same_key_equals_uncached",
    "tests/test_merge_optim.py::test_merge_both_fold_paths_match_hand_delta",
    "tests/test_moe.py::test_expert_rule_is_factored_and_exact",
    "tests/test_moe.py::test_mixtral_expert_adapters_are_factored",
    "tests/test_moe.py::test_mixtral_logits_match_transformers",
    "tests/test_moe.py::test_mixtral_lora_train_step_costs_less_than_full_finetuning",
    "tests/test_moe_peft.py::test_expert_adapter_exports_to_peft_with_equal_logits",
    "tests/test_moe_peft.py::test_expert_factors_round_trip_in_both_axis_orders",
    "tests/test_multihost.py::test_two_processes_against_one",
    "tests/test_peft.py::test_lora_jax_adapter_loads_in_peft",
    "tests/test_peft.py::test_peft_adapter_loads_into_lora_jax",
    "tests/test_peft_parity.py::test_twenty_steps_match_peft_and_the_export_loads_in_peft",
    "tests/test_pod_memory_bench.py::test_per_device_arguments_are_the_sharded_params_and_adapter_state",
    "tests/test_qlora.py::test_quantized_kernel_with_and_without_adapter_matches_dense",
    "tests/test_qlora.py::test_scanned_llama_qlora_matches_dense_without_fallback",
    "tests/test_qlora_sharding.py::test_codes_and_scales_follow_the_kernel_sharding",
    "tests/test_qlora_sharding.py::test_stacked_kernel_and_factors_keep_the_layer_and_model_axes",
    "tests/test_readme.py::test_runnable_block_runs_as_written[docs/guides/explicit_sharding.md-0]",
    "tests/test_readme.py::test_runnable_block_runs_as_written[docs/guides/nnx.md-0]",
    "tests/test_readme.py::test_runnable_block_runs_as_written[docs/guides/qlora.md-0]",
    "tests/test_stack.py::test_flops_do_not_grow_with_the_number_of_adapters",
    "tests/test_stack.py::test_kv_cached_generate_serves_a_mixed_batch",
    "tests/test_stack.py::test_mixed_batch_rows_equal_each_adapter_alone",
    "tests/test_stack_strategies.py::test_each_strategy_rows_equal_each_adapter_alone",
    "tests/test_transform_hardening.py::test_fresh_adapter_keeps_whole_models_to_rounding",
    "tests/test_transform_hardening.py::test_grouped_conv_runs_without_warning_and_matches_merge",
    "tests/test_variants.py::test_stacked_layers_outside_the_list_are_exact_no_ops_through_training",
    "tests/test_variants.py::test_to_lora_is_plain_rank_2r_on_the_original_base",
    "tests/test_variants_peft.py::test_layers_to_transform_selects_what_peft_selects",
    "tests/test_variants_peft.py::test_pissa_olora_export_as_plain_lora_loads_in_peft",
})


def pytest_collection_modifyitems(config, items):
  import pytest  # pylint: disable=import-outside-toplevel
  for item in items:
    if item.nodeid in SLOW or item.nodeid.split("[")[0] in SLOW:
      item.add_marker(pytest.mark.slow)
