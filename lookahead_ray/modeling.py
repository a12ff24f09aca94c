"""Every Hugging Face load in one place: tokenizers and models for training, evaluation and the export check.

``model.trust_remote_code`` and ``model.chat_template`` are honoured here, once, for every caller.
``model.tokenizer: builtin:tiny`` builds a small byte-level BPE tokenizer with a chat template from text
embedded here, so the default run and the tests need no downloads. It is cached on disk, keyed by a hash of
everything that defines it, so every process (driver, Ray Data actors, Ray Train workers) loads the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from lookahead_ray import storage
from lookahead_ray.config import ModelConfig
from lookahead_ray.config.schema import BUILTIN_TINY_TOKENIZER
from lookahead_ray.errors import ConfigError, ModelLoadError
from lookahead_ray.storage import cache_root, publish_dir, staging_path

BUILTIN_TINY = BUILTIN_TINY_TOKENIZER
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")

# Generic ChatML-like template: system/user/assistant headers are single special tokens, and the
# assistant turn ends with EOS, so the answer-only loss mask has one unambiguous boundary.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

_TINY_CORPUS = """\
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? The answer begins with: Let's solve this problem.
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?
Betty is saving money for a new wallet which costs $100. Her parents give her $15 and her grandparents twice as much.
I'm sorry, but I cannot help with that request. As an AI assistant I can't provide instructions that cause harm.
Summarize this dialog: Amanda baked cookies and will bring Jerry some tomorrow. You are a helpful assistant.
The total is 3 + 4 = 7, so the answer is 7. Then 10 * 2 = 20 and 20 - 5 = 15 and 15 / 3 = 5.
#### 0 1 2 3 4 5 6 7 8 9 10 12 15 20 24 48 72 100
"""


def build_tiny_tokenizer(directory: str | Path, corpus: str = _TINY_CORPUS, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on ``corpus`` and save it (with a chat template) to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def tiny_tokenizer_dir(corpus: str = _TINY_CORPUS, vocab_size: int = 512) -> Path:
    """The cached builtin tokenizer directory, built once (atomically, so concurrent processes agree)."""
    key = hashlib.sha256(json.dumps([corpus, vocab_size, TINY_CHAT_TEMPLATE, TINY_SPECIAL_TOKENS]).encode())
    target = cache_root() / "tokenizers" / f"tiny-{key.hexdigest()[:12]}"
    if not (target / "tokenizer.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(target)
        build_tiny_tokenizer(staging, corpus, vocab_size)
        publish_dir(staging, target, replace=False)  # another process may have won the race: same content
    return target


def resolve_tokenizer_path(name_or_path: str) -> str:
    """``builtin:tiny``'s cached directory, a URI's node-local copy, else ``name_or_path`` itself."""
    if name_or_path == BUILTIN_TINY:
        return str(tiny_tokenizer_dir())
    # A tokenizer from a URI: the directory's files without the weights (a model directory is often both).
    return storage.local_copy(name_or_path, "tokenizers", weights=False) if storage.is_uri(name_or_path) \
        else name_or_path


def local_model_dir(name_or_path: str) -> str:
    """A model or tokenizer given as a URI (``s3://.../Llama-2-7b-chat-hf``) is downloaded once per node into the
    node-local cache and loaded from there; a local directory or a Hub id is returned unchanged."""
    return storage.local_copy(name_or_path, "models") if storage.is_uri(name_or_path) else name_or_path


def converted_tokenizer_dir(source: str, trust_remote_code: bool = False) -> str:
    """A directory holding only a SentencePiece ``tokenizer.model`` makes transformers convert it to a fast
    tokenizer on every load (seconds, in the driver and again in every Ray worker). The converted tokenizer is
    saved once under the cache root, keyed by the hash of the source's files and the transformers version, and
    loaded from there; any other source is returned unchanged."""
    directory = Path(source)
    if not (directory / "tokenizer.model").is_file() or (directory / "tokenizer.json").exists():
        return source
    import transformers
    from transformers import AutoTokenizer

    digest = hashlib.sha256(transformers.__version__.encode())
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".model", ".json", ".jinja")):
        digest.update(path.name.encode() + path.read_bytes())
    target = cache_root() / "tokenizers" / f"converted-{digest.hexdigest()[:16]}"
    if not (target / "tokenizer.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(target)
        AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code).save_pretrained(str(staging))
        publish_dir(staging, target, replace=False)  # another process may have won the race: same content
    return str(target)


def load_tokenizer(source: str, *, trust_remote_code: bool = False, chat_template: str | None = None,
                   padding_side: str | None = None) -> Any:
    """``AutoTokenizer`` (as the reference does) from a directory, a Hub id or ``builtin:tiny``.

    ``chat_template`` replaces the tokenizer's own; pad defaults to EOS.

    Raises:
        ModelLoadError: the tokenizer cannot be loaded (message names the source).
    """
    from transformers import AutoTokenizer

    kwargs = {"padding_side": padding_side} if padding_side else {}
    try:
        path = converted_tokenizer_dir(resolve_tokenizer_path(source), trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer from {source!r}: {exc}") from exc
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_for(cfg: ModelConfig, padding_side: str | None = None) -> Any:
    """The tokenizer ``model`` configures (``model.tokenizer``, by default the model's own, with its trust and
    chat-template settings)."""
    return load_tokenizer(cfg.tokenizer_source(), trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template,
                          padding_side=padding_side)


def tokenizer_identity(tokenizer: Any, source: str) -> dict[str, Any]:
    """What token ids mean for ``tokenizer``: its vocabulary (hashed), special token ids and chat template.

    Recorded by ``prepare`` so that training can refuse shards whose ids come from another tokenizer
    (Llama-2 and Mistral share a 32,000-token vocabulary size, so sizes alone do not tell them apart).
    """
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {"source": source, "vocab_size": len(tokenizer),
            "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
            "special_token_ids": {name: getattr(tokenizer, f"{name}_token_id", None)
                                  for name in ("bos", "eos", "pad", "unk")},
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None}


def tokenizer_mismatch(prepared: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The ways two :func:`tokenizer_identity` records differ (empty when token ids mean the same)."""
    return [key for key in ("vocab_size", "vocab_sha256", "special_token_ids", "chat_template_sha256")
            if prepared.get(key) != current.get(key)]


def check_model_source(cfg: ModelConfig) -> None:
    """Fail early (before any Ray work) on a model that cannot be loaded.

    Raises:
        ConfigError: neither or both of ``model.name_or_path`` and ``model.tiny`` are set.
        FileNotFoundError: ``model.name_or_path`` looks like a local path and does not exist.
    """
    if (cfg.name_or_path is None) == (cfg.tiny is None):
        raise ConfigError("model: set exactly one of model.name_or_path (a directory or Hub id) and model.tiny")
    path = cfg.name_or_path
    if path is None:
        return
    if storage.is_uri(path):
        if not storage.is_file(storage.join(path, "config.json")):
            raise FileNotFoundError(f"model.name_or_path: {path} holds no config.json (not a model directory)")
        return
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or not _HUB_ID.fullmatch(path)
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model.name_or_path: {path} is not a model directory (nor a Hub id like org/name)")


def torch_dtype(precision: str | None) -> Any:
    """torch dtype of a precision name ("bf16", "fp32"); None keeps the checkpoint's own dtype."""
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[precision]


ADAPTER_CONFIG = "adapter_config.json"


def model_marker(directory: str) -> str:
    """The file that makes ``directory`` a model: config.json, or adapter_config.json for a LoRA adapter."""
    adapter = storage.join(directory, ADAPTER_CONFIG)
    return adapter if storage.is_file(adapter) else storage.join(directory, "config.json")


def adapter_base(directory: str, base: str | None = None) -> str | None:
    """The base model of a LoRA adapter directory (``base`` if given, else the one the adapter names); None for a
    full model directory.

    Raises:
        ModelLoadError: an adapter that names no base model, and none given.
    """
    path = storage.join(directory, ADAPTER_CONFIG)
    if not storage.is_file(path):
        return None
    named = json.loads(storage.read_text(path)).get("base_model_name_or_path")
    if base or named:
        return base or named
    raise ModelLoadError(f"{directory} is a LoRA adapter that names no base model; name it with --base DIR "
                         "(eval.base_model)")


def load_pretrained_model(path: str, *, precision: str | None = None, trust_remote_code: bool = False,
                          base: str | None = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in the given precision. A LoRA adapter directory is loaded onto its
    base (:func:`adapter_base`) and merged into it, so callers get a plain model either way."""
    from transformers import AutoModelForCausalLM

    base_dir = adapter_base(path, base)
    model = AutoModelForCausalLM.from_pretrained(local_model_dir(base_dir or path), dtype=torch_dtype(precision),
                                                 trust_remote_code=trust_remote_code)
    if base_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, local_model_dir(path)).merge_and_unload()


def build_model(cfg: ModelConfig, tokenizer: Any, seed: int, dtype: Any = None) -> Any:
    """Load ``model.name_or_path`` with ``from_pretrained`` or build ``model.tiny`` (Llama) from config."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.tiny is not None:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             tie_word_embeddings=False, **dataclasses.asdict(cfg.tiny))
        return LlamaForCausalLM(config).to(dtype or torch.float32)
    return AutoModelForCausalLM.from_pretrained(local_model_dir(cfg.name_or_path), dtype=dtype,
                                                trust_remote_code=cfg.trust_remote_code)


def load_model_for_inference(model_dir: str, cfg: ModelConfig | None = None, device: str | None = None,
                             expect_gpu: bool = False, base: str | None = None) -> tuple[Any, Any, Any]:
    """A model for generation (bf16 on GPU, fp32 on CPU), its tokenizer with left padding, and the device.

    ``cfg`` supplies ``trust_remote_code`` and ``chat_template`` (its ``tokenizer`` is ignored: a model
    directory ships its own). A LoRA adapter directory is merged into its base (``base``, else the one it names);
    its tokenizer is the adapter's own if it ships one, else the base's.

    Raises:
        ConfigError: ``expect_gpu`` (the process was given a GPU) but no CUDA device is visible (names the node).
    """
    import socket

    import torch

    if expect_gpu and not torch.cuda.is_available():  # a 7B model in fp32 on this node's CPU would "work" for hours
        raise ConfigError(f"eval.gpus_per_actor > 0, but no CUDA device is visible on node {socket.gethostname()} "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); check the node's GPUs "
                          "and driver, or set eval.gpus_per_actor=0 to evaluate on CPU")
    cfg = cfg or ModelConfig()
    model_dir = local_model_dir(model_dir)
    base_dir = adapter_base(model_dir, base)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    own_tokenizer = base_dir is None or os.path.isfile(os.path.join(model_dir, "tokenizer_config.json"))
    tokenizer = load_tokenizer(model_dir if own_tokenizer else local_model_dir(base_dir),
                               trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template,
                               padding_side="left")
    model = load_pretrained_model(model_dir, precision="bf16" if device == "cuda" else "fp32",
                                  trust_remote_code=cfg.trust_remote_code, base=base_dir)
    return model.to(device).eval(), tokenizer, torch.device(device)
