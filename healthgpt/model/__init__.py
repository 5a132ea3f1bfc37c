"""The HealthGPT model: configuration, CLIP tower and projectors, the Phi-3/Phi-4 LLM with both
H-LoRA plugins, the VQ image tokenizer, prompt templates, constrained decoding, and weight files."""

from healthgpt.model.config import MODEL_PRESETS, HealthGPTConfig
from healthgpt.model.healthgpt import HealthGPT
from healthgpt.model.tokenizer import GenerationVocab
from healthgpt.model.vq import VQConfig, VQTokenizer
from healthgpt.model.vq_convert import convert_taming_checkpoint

__all__ = ["HealthGPT", "HealthGPTConfig", "MODEL_PRESETS", "GenerationVocab", "VQConfig", "VQTokenizer", "convert_taming_checkpoint"]
