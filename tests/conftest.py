"""Shared fixtures: tiny random configs of real transformers classes (seconds on a CPU), the bundled
sample set."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's own jit helpers (tl.zeros, ...) pick interpreter or compiler when triton is first imported,
    # and transformers' optional imports (torchao) import it early: set the interpreter before any test
    # module is collected, so a subset run (`pytest tests/test_healthgpt_decode.py tests/test_kernel_decode.py`)
    # behaves as the whole suite does. The compile gate compiles in a subprocess without it.
    os.environ["TRITON_INTERPRET"] = "1"

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**TINY))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(**TINY, pad_token_id=0))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**TINY))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=28, patch_size=7))


TINY_MODELS = {"llama": _llama, "phi3": _phi3, "qwen2": _qwen2, "gpt2": _gpt2, "clip_vision": _clip_vision}


@pytest.fixture
def tiny_model():
    """``tiny_model(name)`` builds a seeded tiny random model in eval mode."""
    def build(name):
        torch.manual_seed(0)
        return TINY_MODELS[name]().eval()
    return build


def model_inputs(name, batch=3, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "clip_vision":
        return {"pixel_values": torch.randn(batch, 3, 28, 28, generator=g)}
    return {"input_ids": torch.randint(0, 97, (batch, seq), generator=g)}


def model_output(model, inputs):
    out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None else out.logits


@pytest.fixture
def inputs_for():
    return model_inputs


@pytest.fixture
def output_of():
    return model_output


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning OpenMP threads
    slow them down many times over (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def training_subset(tmp_path_factory):
    """``training_subset(n)`` -> ``{"cache", "data"}``: a training file with the first n comp and n gen
    rows of the bundled stage-3 sample set (built once per session), image paths made absolute."""
    from healthgpt.data.samples import build_sample_set

    cache = str(tmp_path_factory.mktemp("cache"))
    samples = build_sample_set(cache)

    def make(n):
        rows = json.load(open(samples.instruct))
        pick = [r for r in rows if r["task"] == "comp"][:n] + [r for r in rows if r["task"] == "gen"][:n]
        for r in pick:
            for key in ("image", "target_image"):
                if key in r:
                    r[key] = os.path.join(samples.root, r[key])
        data = tmp_path_factory.mktemp("data") / f"subset-{n}.json"
        data.write_text(json.dumps(pick))
        return {"cache": cache, "data": str(data)}

    return make
