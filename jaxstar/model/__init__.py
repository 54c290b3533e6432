"""The Mistral-style decoder: configs, the Flax module, KV-cache decoding, HF interop."""
from jaxstar.model.config import ModelConfig, VARIANTS, get_config
from jaxstar.model.transformer import (KVCache, Transformer, abstract_params, count_params,
                                       init_cache)
