"""Architecture adapters, registered by Hugging Face class name. Importing this package registers
the built-in families; a new family registers itself with `@register("FooForCausalLM")`."""
from .base import (  # noqa: F401
    ALL_SITES, NORM_SITES, SITES, Adapter, HeadWeights, Sum, Tap, adapter_for, parse_site_name, register,
    registered, site_name,
)
from . import bert, gemma, gpt2, llama, neox, phi  # noqa: F401,E402  (registration side effect)
