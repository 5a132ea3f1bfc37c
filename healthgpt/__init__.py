"""HealthGPT: a medical vision-language model for comprehension and generation, on H-LoRA plugins.

    from healthgpt import HealthGPT, load_image
    model = HealthGPT.from_pretrained("weights/")          # or HealthGPT("tiny") for random weights
    model.answer(load_image("scan.dcm"), "What abnormality is shown?")
    model.generate_image("ct.nii.gz", "Convert this CT slice to MRI.").save("mri.png")
"""

from healthgpt.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, TASKS
from healthgpt.model.config import MODEL_PRESETS, HealthGPTConfig
from healthgpt.model.vq_convert import convert_taming_checkpoint
from healthgpt.data.images import ImageLoadError, load_image
from healthgpt.model.healthgpt import HealthGPT
from healthgpt.model.templates import TEMPLATES
from healthgpt.model.tokenizer import GenerationVocab
from healthgpt.model.vq import VQConfig, VQTokenizer

__all__ = [
    "HealthGPT",
    "HealthGPTConfig",
    "MODEL_PRESETS",
    "TASKS",
    "load_image",
    "ImageLoadError",
    "VQTokenizer",
    "VQConfig",
    "convert_taming_checkpoint",
    "GenerationVocab",
    "TEMPLATES",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "IGNORE_INDEX",
]
