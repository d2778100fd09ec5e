"""mtptune: finetune native multi-token-prediction heads for speculative decoding."""

__version__ = "0.1.0"
