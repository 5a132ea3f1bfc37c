"""HealthGPT: a medical vision-language model for comprehension and generation, on H-LoRA plugins.

    from healthgpt import HealthGPT, load_image
    model = HealthGPT.from_pretrained("weights/")          # or HealthGPT("tiny") for random weights
    model.answer(load_image("scan.dcm"), "What abnormality is shown?")
    model.generate_image("ct.nii.gz", "Convert this CT slice to MRI.").save("mri.png")
"""

import importlib

# name -> the module that defines it, imported on first use (PEP 562): `import healthgpt.cli` stays
# light, so the `healthgpt` command starts, and says what to install, even without hlora[healthgpt].
_EXPORTS = {
    "IGNORE_INDEX": "healthgpt.constants",
    "IMAGE_PLACEHOLDER": "healthgpt.constants",
    "IMAGE_TOKEN_INDEX": "healthgpt.constants",
    "TASKS": "healthgpt.constants",
    "MODEL_PRESETS": "healthgpt.model.config",
    "HealthGPTConfig": "healthgpt.model.config",
    "convert_taming_checkpoint": "healthgpt.model.vq_convert",
    "ImageLoadError": "healthgpt.data.images",
    "load_image": "healthgpt.data.images",
    "HealthGPT": "healthgpt.model.healthgpt",
    "TEMPLATES": "healthgpt.model.templates",
    "GenerationVocab": "healthgpt.model.tokenizer",
    "VQConfig": "healthgpt.model.vq",
    "VQTokenizer": "healthgpt.model.vq",
}
_SUBPACKAGES = ("constants", "model", "data", "training", "evaluation", "cli")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"healthgpt.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'healthgpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

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
