"""lora_jax: LoRA for any JAX model, as a pure pytree transformation.

>>> import jax, jax.numpy as jnp, optax, lora_jax as lj
>>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> apply = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
>>> lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=2))
>>> y = lj.lora(apply)(lp, jnp.ones(8))           # factored x@W + s*(x@A)@B
>>> tx = lj.optimizer(optax.adam(1e-2), lp)       # A/B train, the rest frozen
>>> served = lj.merge(lp)                         # plain params again
"""

# First: on a JAX older than supported, a clear ImportError (see _src/compat.py)
from lora_jax._src import compat as _compat  # noqa: F401  isort: skip
from lora_jax._src.checkpoint import adapter_args as adapter_args
from lora_jax._src.checkpoint import load_adapter as load_adapter
from lora_jax._src.checkpoint import read_description as read_description
from lora_jax._src.checkpoint import save_adapter as save_adapter
from lora_jax._src.combine import combine_adapters as combine_adapters
from lora_jax._src.config import LoraConfig as LoraConfig
from lora_jax._src.init import lora_init as lora_init
from lora_jax._src.inits import to_lora as to_lora
from lora_jax._src.merge import adapter as adapter
from lora_jax._src.merge import attach as attach
from lora_jax._src.merge import base as base
from lora_jax._src.merge import merge as merge
from lora_jax._src.merge import unmerge as unmerge
from lora_jax._src.optim import combine as combine
from lora_jax._src.optim import labels as labels
from lora_jax._src.optim import optimizer as optimizer
from lora_jax._src.optim import split as split
from lora_jax._src.quant import QuantConfig as QuantConfig
from lora_jax._src.quant import QuantizedWeight as QuantizedWeight
from lora_jax._src.quant import dequantize as dequantize
from lora_jax._src.quant import quantize as quantize
from lora_jax._src.stack import StackedLora as StackedLora
from lora_jax._src.stack import set_adapter as set_adapter
from lora_jax._src.stack import stack_adapters as stack_adapters
from lora_jax._src.stack import unstack_adapters as unstack_adapters
from lora_jax._src.sharding import factor_specs as factor_specs
from lora_jax._src.sharding import lora_shardings as lora_shardings
from lora_jax._src.summary import Summary as Summary
from lora_jax._src.summary import summary as summary
from lora_jax._src.transform import LoraFallbackWarning as LoraFallbackWarning
from lora_jax._src.transform import lora as lora
from lora_jax._src.train import train_step as train_step
from lora_jax._src.weight import LoraWeight as LoraWeight
from lora_jax._src.weight import Trainable as Trainable
from lora_jax._src.weight import delta as delta

__version__ = "0.1.0"

__all__ = (
    "LoraConfig",
    "LoraFallbackWarning",
    "LoraWeight",
    "QuantConfig",
    "QuantizedWeight",
    "StackedLora",
    "Summary",
    "Trainable",
    "adapter",
    "adapter_args",
    "attach",
    "base",
    "combine",
    "combine_adapters",
    "delta",
    "dequantize",
    "factor_specs",
    "labels",
    "load_adapter",
    "lora",
    "lora_init",
    "lora_shardings",
    "merge",
    "optimizer",
    "quantize",
    "read_description",
    "save_adapter",
    "set_adapter",
    "split",
    "stack_adapters",
    "summary",
    "to_lora",
    "train_step",
    "unmerge",
    "unstack_adapters",
)
