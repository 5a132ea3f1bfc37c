"""``HealthGPT``: CLIP + per-task projectors + Phi-3/phi-4 with both H-LoRA plugins + the VQ image tokenizer.

The hard router works per sample: for a batch with tasks ``["comp", "gen", ...]`` each sample
reads its own CLIP hidden state (``visual_layers[task]``), goes through its own projector and its
own plugin (``hlora.set_task(llm, tasks)``). Both plugins stay resident; switching task reloads
nothing.

Sequence layout: the prompt's ``<image>`` becomes ``num_image_tokens`` positions whose input ids are
``IMAGE_TOKEN_INDEX``; ``embed_inputs`` puts the projected patch features there::

    x[b, t] = embed_tokens(ids[b, t])                       for text positions
    x[b, t] = projector_task(b)(CLIP_layer(task(b))(image)[p])   for the p-th image position
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

import hlora
from hlora.quantized import quantize_4bit
from hlora.routing import Routing

from healthgpt.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, TASKS
from healthgpt.data.dataset import Collator
from healthgpt.model.config import HealthGPTConfig
from healthgpt.model.files import from_pretrained_checked, require_hf_checkpoint
from healthgpt.model.generation import decode, decode_eager
from healthgpt.data.images import load_image
from healthgpt.model.templates import TEMPLATES, encode_conversation, normalize_messages
from healthgpt.model.tokenizer import GenerationVocab, START_TOKEN, add_generation_vocab, load_base_tokenizer, resize_embeddings_with_mean
from healthgpt.model.vision import ImageProcessor, build_projector, load_vision_tower
from healthgpt.model.vq import CONFIG_FILE, WEIGHTS_FILE, VQTokenizer
from healthgpt.model.weights import load_model, load_release_weights, save_model

__all__ = ["HealthGPT", "HealthGPTOutput", "load_llm", "choose_attn_implementation", "PromptTooLong"]


@dataclass
class HealthGPTOutput(CausalLMOutputWithPast):
    """``HealthGPT.forward``'s output with ``labels``: ``CausalLMOutputWithPast`` plus, per sample,
    ``token_loss_sum`` [B] (fp32, detached: the sum of its supervised tokens' cross-entropies) and
    ``token_count`` [B] (its supervised tokens), so per-task losses need no logits. ``logits`` is
    None when the forward was asked for none (``return_logits=False``)."""

    token_loss_sum: torch.FloatTensor | None = None
    token_count: torch.LongTensor | None = None


class PromptTooLong(ValueError):
    """A prompt the model has no positions for; the message gives the lengths."""


def choose_attn_implementation(config: HealthGPTConfig) -> str:
    """The config's choice, else flash_attention_2 when flash-attn, CUDA and a 16-bit dtype are there, else sdpa."""
    if config.attn_implementation is not None:
        return config.attn_implementation
    if config.dtype != "float32" and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_llm(path: str | None, config: dict | None, dtype: torch.dtype, attn_implementation: str):
    """``transformers.Phi3ForCausalLM`` from local ``path`` or, when ``path`` is None, random from ``config``."""
    if path is None:
        return Phi3ForCausalLM._from_config(Phi3Config(**config), attn_implementation=attn_implementation, dtype=dtype)
    require_hf_checkpoint(path, "LLM", "microsoft/Phi-3-mini-4k-instruct (or microsoft/phi-4)")
    return from_pretrained_checked(Phi3ForCausalLM, path, "LLM", dtype=dtype, attn_implementation=attn_implementation)


def _check_paths(config: HealthGPTConfig) -> None:
    """Fail before building anything when a configured local checkpoint is missing."""
    if config.llm_path is not None:
        require_hf_checkpoint(config.llm_path, "LLM", "microsoft/Phi-3-mini-4k-instruct (or microsoft/phi-4)")
    if config.vision_path is not None:
        require_hf_checkpoint(config.vision_path, "vision tower", "openai/clip-vit-large-patch14-336")
    if config.image_tokenizer_path is not None:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not os.path.isfile(os.path.join(config.image_tokenizer_path, name)):
                raise FileNotFoundError(
                    f"image tokenizer directory {config.image_tokenizer_path!r} has no {name}: expected the output of "
                    f"`healthgpt convert-vqgan` (taming's VQGAN OpenImages f=8 8192 last.ckpt + model.yaml converted)"
                )


class HealthGPT(nn.Module):
    """The unified medical VLM. Build from a config (``HealthGPT("tiny")``,
    ``HealthGPT(HealthGPTConfig.preset("m3", llm_path=..., vision_path=..., image_tokenizer_path=...))``)
    or load a saved model with ``HealthGPT.from_pretrained(dir)``.

    Attributes: ``healthgpt_config``, ``vision`` (CLIPVisionModel, frozen), ``projectors`` (ModuleDict comp/gen), ``llm``
    (Phi3ForCausalLM with hlora plugins comp/gen), ``tokenizer``, ``image_tokenizer`` (VQTokenizer),
    ``image_processor``, ``gen_vocab``, ``template``.
    """

    def __init__(self, config: HealthGPTConfig | str = "tiny"):
        super().__init__()
        config = HealthGPTConfig.preset(config) if isinstance(config, str) else config
        _check_paths(config)
        self.healthgpt_config = config
        dtype = getattr(torch, config.dtype)
        attn = choose_attn_implementation(config)

        self.tokenizer = load_base_tokenizer(config.tokenizer_path or config.llm_path)
        add_generation_vocab(self.tokenizer)
        self.gen_vocab = GenerationVocab.from_tokenizer(self.tokenizer)
        self.template = TEMPLATES[config.template]
        sep_id = self.tokenizer.convert_tokens_to_ids(self.template.sep)
        if sep_id is None or sep_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.template.sep!r} token that the {config.template} template ends turns with")
        self.stop_ids = {sep_id} | ({self.tokenizer.eos_token_id} - {None})
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else sep_id

        self.llm = load_llm(config.llm_path, config.llm_config, dtype, attn)
        resize_embeddings_with_mean(self.llm, len(self.tokenizer), self.gen_vocab.base_size)
        if config.load_in_4bit:
            quantize_4bit(self.llm, dtype, skip=["lm_head"])
        hlora.inject(self.llm, hlora.HLoRAConfig(plugins=config.plugins, target_modules="all-linear"))

        self.vision = load_vision_tower(config.vision_path, config.vision_config, dtype, attn)
        vcfg = self.vision.config
        size = vcfg.image_size
        self.image_processor = ImageProcessor.from_dir(config.vision_path, size) if config.vision_path else ImageProcessor(size)
        self.num_image_tokens = (size // vcfg.patch_size) ** 2
        states = vcfg.num_hidden_layers + 1
        for task, layer in config.visual_layers.items():
            if not -states <= layer < states:
                raise ValueError(f"visual_layers[{task!r}] = {layer} but the vision tower has hidden states 0..{states - 1}")
        hidden = self.llm.config.hidden_size
        self.projectors = nn.ModuleDict({t: build_projector(vcfg.hidden_size, hidden, dtype) for t in TASKS})

        if config.image_tokenizer_path is not None:
            self.image_tokenizer = VQTokenizer.from_pretrained(config.image_tokenizer_path)
        else:
            self.image_tokenizer = VQTokenizer(config.image_tokenizer_config)
        if self.image_tokenizer.config.num_vq_embeddings != self.gen_vocab.num_codes:
            raise ValueError(
                f"the image tokenizer has {self.image_tokenizer.config.num_vq_embeddings} codes but the vocabulary "
                f"has {self.gen_vocab.num_codes} <idx_*> tokens"
            )
        self.set_trainable(plugins=TASKS, projectors=TASKS, fusion=False)

    # ---- properties -----------------------------------------------------------------------------

    @property
    def config(self):
        """The LLM's ``Phi3Config`` (what the HF Trainer reads and sets, e.g. ``use_cache``); the
        ``HealthGPTConfig`` is ``healthgpt_config``."""
        return self.llm.config

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def num_image_codes(self) -> int:
        """VQ codes per generated image (1024 for 256 px at f=8)."""
        return self.image_tokenizer.num_tokens

    # ---- training controls ------------------------------------------------------------------------

    # True: every batch runs every plugin, the vision tower and every projector, in the same order, on
    # its tokens/images of that task (maybe none): the same autograd graph on every process whatever
    # its batch's tasks, so every parameter gets a gradient (zeros when unused) in the same order.
    # DeepSpeed ZeRO reduces gradients in buckets filled in that order, and ZeRO-3 gathers each
    # module's weights as it runs (``healthgpt train --deepspeed`` sets it).
    run_every_part: bool = False

    def set_trainable(self, plugins=(), projectors=(), fusion: bool = False) -> None:
        """Freeze everything, then train the named plugins and projectors and, with ``fusion``, the
        embeddings + lm_head (the paper's stage-2 "fusion layer"). The vision tower and the image
        tokenizer stay frozen."""
        for name in (*plugins, *projectors):
            self._check_task(name)
        self.requires_grad_(False)
        hlora.set_trainable(self.llm, plugins=list(plugins))
        for t in projectors:
            self.projectors[t].requires_grad_(True)
        if fusion:
            self.llm.get_input_embeddings().requires_grad_(True)
            self.llm.get_output_embeddings().requires_grad_(True)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Checkpoint the LLM's layers (non-reentrant by default, so frozen inputs still pass
        gradients to the plugins). Per-sample routing is layer state, so the recompute sees it."""
        kwargs = {"use_reentrant": False} if activation_checkpointing_kwargs is None else activation_checkpointing_kwargs
        self.llm.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )

    def activation_checkpointing_disable(self) -> None:
        self.llm.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.llm.is_activation_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The pre-5.x transformers name of ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    # ---- routing ----------------------------------------------------------------------------------

    @staticmethod
    def _check_task(task) -> str:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
        return task

    def _task_list(self, tasks, batch: int) -> list:
        """A task name, names per sample, or an int tensor of indices into ``TASKS`` -> names per sample."""
        if tasks is None:
            raise ValueError(f"tasks is required: one of {TASKS} for the batch, or one per sample")
        if isinstance(tasks, str):
            return [self._check_task(tasks)] * batch
        if isinstance(tasks, torch.Tensor):
            tasks = [TASKS[i] for i in tasks.tolist()]
        tasks = [self._check_task(t) for t in tasks]
        if len(tasks) != batch:
            raise ValueError(f"got {len(tasks)} tasks for a batch of {batch}")
        return tasks

    def route(self, tasks: list) -> None:
        """Route the LLM's plugins: one task for all samples, or one per sample."""
        if not self.run_every_part:
            hlora.set_task(self.llm, tasks[0] if len(set(tasks)) == 1 else list(tasks))
            return
        hlora.set_task(self.llm, list(tasks))
        names = hlora.get_config(self.llm).plugin_names
        routing = Routing(tuple(range(len(names))), torch.tensor([names.index(t) for t in tasks], dtype=torch.int64))
        for layer in hlora.adapter_layers(self.llm):
            layer.set_routing(routing)

    # ---- model --------------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor, tasks: list) -> torch.Tensor:
        """CLIP pixels [N, 3, S, S] + a task per image -> projected features [N, patches, H]: each image
        reads its task's hidden state (CLS dropped) and goes through its task's projector."""
        vision_dtype = next(self.vision.parameters()).dtype
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(grad):
            states = self.vision(images.to(self.device, vision_dtype), output_hidden_states=True).hidden_states
        parts, order = [], []
        for task in TASKS if self.run_every_part else dict.fromkeys(tasks):
            idx = [i for i, t in enumerate(tasks) if t == task]
            feats = states[self.healthgpt_config.visual_layers[task]][idx, 1:]
            proj = self.projectors[task]
            parts.append(proj(feats.to(proj[0].weight.dtype)))
            order += idx
        out = torch.cat(parts)
        return out[torch.argsort(torch.tensor(order, dtype=torch.long, device=out.device))]

    def _every_part_on_no_images(self) -> torch.Tensor:
        """Exactly 0, through the vision tower and every projector (``run_every_part`` on a batch
        without images: DeepSpeed ZeRO-3 gathers a module's weights around its forward, a collective
        that every process must join, so the tower runs too). CLIP cannot run on zero images (its
        attention reshapes with -1): it runs on one blank image, of which nothing is kept."""
        size = self.vision.config.image_size
        blank = torch.zeros(1, 3, size, size, device=self.device)
        return self.encode_images(blank, [TASKS[0]])[:0].sum()

    def embed_inputs(self, input_ids: torch.Tensor, images: torch.Tensor | None, tasks: list) -> torch.Tensor:
        """Token embeddings with every run of ``num_image_tokens`` ``IMAGE_TOKEN_INDEX`` positions
        replaced by the next image's features (images in batch order, then order of appearance)."""
        is_image = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, self.pad_id))
        per_sample = is_image.sum(dim=1).tolist()
        if images is None:
            if any(per_sample):
                raise ValueError("input_ids hold image positions but no images were given")
            return embeds + self._every_part_on_no_images() if self.run_every_part else embeds
        P = self.num_image_tokens
        if any(c % P for c in per_sample):
            raise ValueError(f"each sample's image positions must come in runs of {P}, got counts {per_sample}")
        counts = [c // P for c in per_sample]
        if sum(counts) != images.shape[0]:
            raise ValueError(f"input_ids hold {sum(counts)} image placeholders but {images.shape[0]} images were given")
        if not sum(counts):
            return embeds + self._every_part_on_no_images() if self.run_every_part else embeds
        image_tasks = [t for t, c in zip(tasks, counts) for _ in range(c)]
        feats = self.encode_images(images, image_tasks).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1).expand_as(embeds), feats)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        tasks=None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
        **kwargs,
    ):
        """-> ``CausalLMOutputWithPast``; with ``labels`` a ``HealthGPTOutput``: ``loss`` is the token
        cross-entropy over the positions whose next-token label is not -100, summed and divided by
        ``num_items_in_batch`` when given (the HF Trainer's count over the whole accumulated batch),
        else by the number of those positions (their mean), plus the per-sample sums and counts.

        With labels the LLM body runs to hidden states and ``lm_head`` (a [V, H] matrix, V ~ 40k) is
        applied only at the supervised positions for the loss; ``return_logits=False`` (what
        ``HealthGPTTrainer`` asks while training) skips the [B, T, V] logits of every position, most
        of a small model's step and of a large one's activation memory.

        Args:
            input_ids: [B, T], ``IMAGE_TOKEN_INDEX`` at image positions (``prepare_sample`` + ``collate``).
            attention_mask: [B, T], 1 for real tokens.
            images: CLIP pixels [N, 3, S, S], one per image placeholder run, in batch order.
            tasks: ``"comp"``/``"gen"`` for all samples, one per sample, or an int tensor into ``TASKS``.
            labels: [B, T] with -100 on unsupervised positions.
            return_logits: with ``labels``, also compute every position's logits (without labels they always are).
            kwargs: passed to the LLM (e.g. ``num_items_in_batch`` from the HF Trainer, ``cache``).
        """
        tasks = self._task_list(tasks, input_ids.shape[0])
        inputs_embeds = self.embed_inputs(input_ids, images, tasks)
        self.route(tasks)
        if labels is None:
            return self.llm(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=use_cache, **kwargs,
            )
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        body = self.llm.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, **kwargs,
        )
        return self._supervised_output(body, labels, num_items_in_batch, return_logits)

    def _supervised_output(self, body, labels: torch.Tensor, num_items_in_batch, return_logits: bool) -> HealthGPTOutput:
        """The LLM body's output + labels -> loss (``forward``), per-sample token loss sums and counts,
        logits when asked. Position t is scored against ``labels[:, t + 1]``, as ``ForCausalLMLoss``."""
        hidden = body.last_hidden_state
        head = self.llm.get_output_embeddings()
        targets = labels[:, 1:].to(hidden.device)
        supervised = targets != IGNORE_INDEX
        logits = head(hidden) if return_logits else None
        picked = logits[:, :-1][supervised] if return_logits else head(hidden[:, :-1][supervised])
        token_loss = F.cross_entropy(picked.float(), targets[supervised], reduction="none")
        count = supervised.sum(dim=1)
        divisor = count.sum() if num_items_in_batch is None else num_items_in_batch
        if torch.is_tensor(divisor):
            divisor = divisor.to(token_loss.device)
        rows = supervised.nonzero()[:, 0]
        sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=token_loss.device)
        return HealthGPTOutput(
            loss=token_loss.sum() / divisor, logits=logits, cache=body.cache, hidden_states=body.hidden_states,
            attentions=body.attentions, token_loss_sum=sums.index_add_(0, rows, token_loss.detach()), token_count=count,
        )

    # ---- samples ------------------------------------------------------------------------------------

    def image_codes(self, target) -> torch.Tensor:
        """A generation target -> its VQ codes [num_image_codes]: codes as given (tensor/list/array)
        or an image (PIL, path, array) encoded by the image tokenizer."""
        if isinstance(target, (torch.Tensor, list, tuple)) or (hasattr(target, "dtype") and getattr(target, "ndim", 0) == 1):
            codes = torch.as_tensor(target, dtype=torch.long).flatten()
        else:
            codes = self.image_tokenizer.encode_images([load_image(target)])[0].cpu()
        if codes.numel() != self.num_image_codes:
            raise ValueError(f"a generation target has {self.num_image_codes} codes, got {codes.numel()}")
        return codes

    def prepare_sample(self, conversation, task: str, image=None, target=None, max_length: int | None = None) -> dict:
        """One training sample -> ``{"input_ids", "labels", "images", "task"}`` (``collate`` batches them).

        Args:
            conversation: LLaVA turns (``{"from": "human"|"gpt", "value"}``) or chat turns
                (``{"role", "content"}``), alternating from the user. One ``<image>`` per image in user
                turns; with one image and no placeholder, ``<image>\\n`` is put before the first turn.
            task: ``"comp"`` (assistant turns are text) or ``"gen"``: the conversation ends with a user
                turn and the answer is ``target`` as ``<start_index><idx_..>x1024<end_index>``.
            image: input image(s): PIL, path (``load_image``), array, or a list of them.
            target: for ``gen``: the output image (PIL/path/array) or its VQ codes.
            max_length: cut the sequence to this many tokens (an error if that would cut an image).
        """
        task = self._check_task(task)
        messages = normalize_messages(conversation)
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in messages)
        if len(images) == 1 and placeholders == 0:
            messages[0] = (messages[0][0], IMAGE_PLACEHOLDER + "\n" + messages[0][1])
            placeholders = 1
        if placeholders != len(images):
            raise ValueError(f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
        if task == "gen":
            if target is None:
                raise ValueError("a generation sample needs target: the output image or its VQ codes")
            if messages[-1][0] != "user":
                raise ValueError("a generation conversation must end with the user turn; the answer is the target image")
            messages.append(("assistant", self.gen_vocab.answer_text(self.image_codes(target))))
        elif target is not None:
            raise ValueError("target is for generation samples (task='gen')")
        ids, labels = encode_conversation(
            self.tokenizer, self.template, messages, self.num_image_tokens, system=self.healthgpt_config.system_prompt
        )
        if max_length is not None and len(ids) > max_length:
            if IMAGE_TOKEN_INDEX in ids[max_length:]:
                raise ValueError(f"max_length={max_length} would cut an image out of a {len(ids)}-token sample")
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError("the sample supervises no token: the conversation needs an assistant turn")
        pixels = self.image_processor([load_image(im) for im in images]) if images else None
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "images": pixels,
            "task": task,
        }

    def collate(self, samples: list, pad_to_multiple_of: int | None = None) -> dict:
        """``prepare_sample`` outputs -> a right-padded batch for ``forward``: ``input_ids``,
        ``attention_mask``, ``labels`` [B, T], ``images`` [N, 3, S, S] or None, ``tasks``."""
        return Collator(self.pad_id, pad_to_multiple_of)(samples)

    # ---- inference ----------------------------------------------------------------------------------

    def _prompt_ids(self, has_image: bool, text: str, task: str) -> list:
        if has_image and IMAGE_PLACEHOLDER not in text:
            text = IMAGE_PLACEHOLDER + "\n" + text
        if text.count(IMAGE_PLACEHOLDER) != int(has_image):
            raise ValueError(f"a prompt holds one {IMAGE_PLACEHOLDER} with an image and none without, got {text!r}")
        prefix = START_TOKEN if task == "gen" else ""
        ids, _ = encode_conversation(
            self.tokenizer, self.template, [("user", text)], self.num_image_tokens,
            system=self.healthgpt_config.system_prompt, generation_prefix=prefix,
        )
        return ids

    def _fit_positions(self, prompts: list, tasks: list, max_new_tokens: int) -> int:
        """The LLM's ``max_position_embeddings`` must hold every prompt (its image positions included)
        plus what it generates: a prompt that leaves no room (for ``gen``: the whole image's codes) is
        refused with the lengths (``PromptTooLong``); ``max_new_tokens`` is cut, with a warning, to the
        room the longest prompt leaves. -> the ``max_new_tokens`` to decode with."""
        limit = getattr(self.llm.config, "max_position_embeddings", None)
        if not limit:
            return max_new_tokens
        for b, (ids, task) in enumerate(zip(prompts, tasks)):
            images = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
            needed = self.num_image_codes + 1 if task == "gen" else 1
            if len(ids) + needed > limit:
                raise PromptTooLong(f"prompt {b} is {len(ids)} tokens ({images} of them image positions) and needs "
                                    f"{needed} more to answer, but the model has {limit} positions: shorten the text "
                                    f"by at least {len(ids) + needed - limit} tokens")
        room = limit - max(map(len, prompts))
        if max_new_tokens > room and "comp" in tasks:
            warnings.warn(f"max_new_tokens={max_new_tokens} does not fit the model's {limit} positions after a "
                          f"{limit - room}-token prompt: answers are cut at {room} tokens", stacklevel=3)
            return room
        return max_new_tokens

    @torch.no_grad()
    def generate(self, images: list, texts: list, tasks, max_new_tokens: int = 512, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, static: bool = True, compile: bool = False) -> list:
        """Batched decoding, tasks mixed freely -> per sample the generated token ids: for ``comp`` the
        answer up to the stop token, for ``gen`` exactly ``num_image_codes`` ``<idx_*>`` ids then
        ``<end_index>``. ``images``: per sample a PIL image, path, array or None. ``static``: decode
        through the static cache (a CUDA graph on CUDA; ``generation.decode``), else through the eager
        ``DynamicCache`` loop (``generation.decode_eager``); greedy outputs are the same. ``compile``: the
        static path's step through ``torch.compile`` (the first call per batch shape compiles; on a
        CPU that is seconds to minutes, later calls reuse it)."""
        if compile and not static:
            raise ValueError("compile=True compiles the static decoder's step: it needs static=True")
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images for {len(texts)} texts")
        tasks = self._task_list(tasks, len(texts))
        prompts = [self._prompt_ids(im is not None, tx, t) for im, tx, t in zip(images, texts, tasks)]
        max_new_tokens = self._fit_positions(prompts, tasks, max_new_tokens)
        T = max(map(len, prompts))
        input_ids = torch.full((len(prompts), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for b, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            input_ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
        present = [load_image(im) for im in images if im is not None]
        pixels = self.image_processor(present) if present else None
        was_training = self.training
        self.eval()
        try:
            embeds = self.embed_inputs(input_ids.to(self.device), pixels, tasks)
            self.route(tasks)
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(seed)
            return (decode if static else decode_eager)(
                self.llm, embeds, mask.to(self.device), [t == "gen" for t in tasks], self.num_image_codes,
                self.gen_vocab, self.stop_ids, self.pad_id, max_new_tokens,
                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                **(dict(compile=True) if compile else {}),
            )
        finally:
            self.train(was_training)

    def infer(self, images: list, texts: list, tasks, **kwargs) -> list:
        """Batched, tasks mixed freely -> per sample a ``str`` (comp) or a ``PIL.Image`` (gen).
        ``kwargs``: ``generate``'s decoding options."""
        tasks = self._task_list(tasks, len(texts))
        outputs = self.generate(images, texts, tasks, **kwargs)
        results = [None] * len(outputs)
        gen_rows = [b for b, t in enumerate(tasks) if t == "gen"]
        if gen_rows:
            codes = torch.tensor([outputs[b][:-1] for b in gen_rows]) - self.gen_vocab.code0
            for b, img in zip(gen_rows, self.image_tokenizer.decode_images(codes.to(self.image_tokenizer.proj.weight.device))):
                results[b] = img
        for b, t in enumerate(tasks):
            if t == "comp":
                results[b] = self.tokenizer.decode(outputs[b], skip_special_tokens=True).strip()
        return results

    def answer(self, image, question: str, **kwargs) -> str:
        """Comprehension: the text answer to ``question`` about ``image`` (PIL, path, array or None)."""
        return self.infer([image], [question], "comp", **kwargs)[0]

    def answer_batch(self, images: list, questions: list, **kwargs) -> list:
        return self.infer(images, questions, "comp", **kwargs)

    def generate_image(self, image, instruction: str, **kwargs):
        """Generation: a 256x256 ``PIL.Image`` from exactly 1024 generated codes."""
        return self.infer([image], [instruction], "gen", **kwargs)[0]

    def generate_images(self, images: list, instructions: list, **kwargs) -> list:
        return self.infer(images, instructions, "gen", **kwargs)

    # ---- weights ------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write the model to ``directory`` (layout in ``healthgpt.model.weights``)."""
        if self.healthgpt_config.load_in_4bit and self.healthgpt_config.llm_path is None:
            raise ValueError(
                "a 4-bit HealthGPT saves its plugins, projectors and fusion layer and reads the base LLM from llm_path; "
                "this one's LLM has random weights (llm_path None), which would be lost: save a model built "
                "without load_in_4bit, or give llm_path"
            )
        return save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides) -> "HealthGPT":
        """Load a directory written by ``save_pretrained``; ``overrides`` replace config fields (e.g. a
        moved ``llm_path``, or ``dtype``)."""
        return load_model(cls, directory, **overrides)

    def load_release_weights(self, com: str | None = None, gen: str | None = None, fusion: str | None = None) -> "HealthGPT":
        """Load the public release's ``com_hlora_weights.bin`` / ``gen_hlora_weights.bin`` /
        ``fusion_layer_weights.bin`` (any subset); all-or-nothing (``healthgpt.model.weights``)."""
        load_release_weights(self, com=com, gen=gen, fusion=fusion)
        return self
