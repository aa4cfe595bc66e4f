"""A compact Flax Mixtral-style MoE decoder that matches Hugging Face's Mixtral.

Llama attention and norms, and per block a sparse MoE MLP: router
``mlp/gate/kernel`` ``(d, E)``, softmax, top-k renormalized, SwiGLU experts
stored as HF's fused 3-D parameters and computed with ``jax.lax.ragged_dot``::

  layers_{i}/mlp/gate/kernel                 model.layers.{i}.mlp.gate.weight
  layers_{i}/mlp/experts/gate_up_proj        model.layers.{i}.mlp.experts.gate_up_proj  (E, 2ff, d)
  layers_{i}/mlp/experts/down_proj           model.layers.{i}.mlp.experts.down_proj     (E, d, ff)

``lora_init(..., trace=...)`` reads each expert tensor's roles as ``"soi"``
(one adapter per expert, the torch ``(out, in)`` axis order), and ``lora()``
keeps the adapted experts factored.
"""

from lora_jax._src.models.moe import Mixtral as Mixtral
from lora_jax._src.models.moe import MixtralConfig as MixtralConfig
from lora_jax._src.models.moe import MixtralExperts as MixtralExperts
from lora_jax._src.models.moe import MixtralSparseMoe as MixtralSparseMoe
from lora_jax._src.models.moe import grouped_linear as grouped_linear
from lora_jax._src.models.moe import init_moe_params as init_moe_params
from lora_jax._src.models.moe import route as route
from lora_jax._src.models.moe_hf import load_hf_mixtral as load_hf_mixtral
from lora_jax._src.models.moe_hf import mixtral_name_map as mixtral_name_map
from lora_jax._src.models.moe_hf import mixtral_rules as mixtral_rules
from lora_jax._src.models.moe_hf import to_hf_mixtral_state_dict as to_hf_mixtral_state_dict
