"""slserve: one base language model, thousands of LoRA adapters, one batched forward pass."""

from slserve.llm import LLM
from slserve.outputs import RequestOutput
from slserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"
