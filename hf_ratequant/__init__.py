"""hf-ratequant: calibrated mixed-precision KV-cache quantization for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .cache import RateQuantCache, RateQuantLayer, RateQuantSlidingLayer
from .calibration import calibrate
from .config import ModelFingerprint, RateQuantConfig
from .evaluation import evaluate_kl, evaluate_perplexity
from .models import DEFAULT_MODEL, default_config_path, load_default_model, load_model
from .passkey import evaluate_passkey
from .quantizers import available_quantizers, get_quantizer, register_quantizer

__all__ = [
    "DEFAULT_MODEL",
    "ModelFingerprint",
    "RateQuantCache",
    "RateQuantConfig",
    "RateQuantLayer",
    "RateQuantSlidingLayer",
    "__version__",
    "available_quantizers",
    "calibrate",
    "default_config_path",
    "evaluate_kl",
    "evaluate_passkey",
    "evaluate_perplexity",
    "get_quantizer",
    "load_default_model",
    "load_model",
    "register_quantizer",
]
