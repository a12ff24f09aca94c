"""The typed config sections: one dataclass per pipeline stage, with field docstrings and validation.

One :class:`LookaheadConfig` describes a whole run (data -> train -> eval -> tune). Every stage is a
library function taking it, so a CLI command, a Ray Tune trial and a cluster job differ only in how
the config is built. Pure module: no ray / torch / transformers imports.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lookahead_ray.config.methods import method_parts
from lookahead_ray.config.typed import build
from lookahead_ray.errors import ConfigError


@dataclass
class PreviewConfig:
    """The LookAhead Tuning data transform (arXiv 2503.19041)."""

    mode: Literal["vanilla", "real", "virtual"] = "real"
    """vanilla: records unchanged; real: preview the answer's first tokens; virtual: preview a fixed prefix."""
    num_answer_tokens: int = 6
    """m in the paper: answer tokens previewed in real mode. 0 previews nothing but still appends the connector."""
    virtual_prefix: str = "Let's solve this problem. "
    """P in the paper: the text previewed in the prompt and prepended to the answer in virtual mode."""
    connector: str = " The answer begins with: "
    """C in the paper: joins the instruction and the preview."""
    exact_span: bool = False
    """Real mode only: preview the original answer text covering the first m tokens (via offsets) instead of
    detokenising them. Avoids detokenisation artefacts; off by default to match the reference output."""
    mix_plain_share: float = 0.0
    """Mixed preview (beyond the paper): this share of the examples, drawn per row from mix_seed, keeps the plain
    prompt, so the model also learns to open its answers without a preview (the test-time condition)."""
    mix_seed: int = 0
    adaptive_nll_threshold: float | None = None
    """Adaptive m (real mode, beyond the paper): per example, preview only the first k <= m answer tokens such that
    the seed model's NLL (nats, summed) of the opening's remaining tokens k..m-1 is at most this; k = 0 keeps the
    plain prompt. The seed is model.name_or_path, run by the prepare step (one forward per example)."""

    def __post_init__(self) -> None:
        if self.num_answer_tokens < 0:
            raise ConfigError(f"preview.num_answer_tokens must be >= 0, got {self.num_answer_tokens}")
        if not 0 <= self.mix_plain_share <= 1:
            raise ConfigError(f"preview.mix_plain_share must be in [0, 1], got {self.mix_plain_share}")
        if self.adaptive_nll_threshold is not None and (self.mode != "real" or self.adaptive_nll_threshold < 0):
            raise ConfigError("preview.adaptive_nll_threshold needs preview.mode real and a value >= 0 (nats), got "
                              f"mode {self.mode} and {self.adaptive_nll_threshold}")


@dataclass
class RecordConfig:
    """How to find the instruction and the answer in an input record."""

    format: Literal["flat", "alpaca", "chat", "sharegpt"] = "flat"
    """flat: two string fields; alpaca: instruction + optional input + output; chat: a messages list of
    {role, content}; sharegpt: a ``conversations`` list of {from, value} with speakers human, gpt, system."""
    instruction_field: str = "input"
    """flat records: the instruction (prompt) field (the reference's --input_field)."""
    answer_field: str = "output"
    """flat records: the answer field (the reference's --output_field)."""
    answer_prefix_field: str | None = None
    """Optional field holding the start of the assistant turn that is given, not learned: its tokens follow the
    prompt with label -100 (e.g. "recovery" examples that begin a harmful reply and then refuse)."""
    messages_field: str = "messages"
    """chat records: the list of {role, content} turns."""


@dataclass
class TokenizationConfig:
    """Training tokenisation: chat template, answer-only loss mask, truncation."""

    system_prompt: str | None = None
    """System turn of the chat template (the paper: "You are a helpful assistant." for GSM8K)."""
    prompt_template: str = "{instruction}"
    """Wraps the (previewed) instruction into the user turn, e.g. "Summarize this dialog:\\n{instruction}"."""
    max_seq_len: int = 1024
    """Longer examples are truncated (answer tokens last) and counted as truncated in the report."""

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ConfigError(f"tokenization.max_seq_len must be >= 2, got {self.max_seq_len}")
        if "{instruction}" not in self.prompt_template:
            raise ConfigError("tokenization.prompt_template must contain '{instruction}'")


@dataclass
class SafetyMixConfig:
    """Safety-data mixing (Safety-Tuned LLaMAs, Bianchi et al. 2024; SafeInstr): refusal demonstrations mixed into the
    fine-tuning data by the prepare step. They are never previewed: the model should learn to refuse without a hint."""

    inputs: list[str] = field(default_factory=list)
    """Files of safety demonstrations (harmful request -> refusal), in any data.input_format."""
    share: float = 0.1
    """Share of the training rows that are safety demonstrations: round(share / (1 - share) x task rows written) of
    them, drawn without repeats (fewer when the files hold fewer; the report says how many)."""
    seed: int = 0
    records: RecordConfig | None = None
    """Where the safety files' instruction and answer are; default: the `records` section."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("data.safety_mix.inputs is empty: name the file(s) of safety demonstrations")
        if not 0 < self.share < 1:
            raise ConfigError(f"data.safety_mix.share must be in (0, 1), got {self.share}")


@dataclass
class DataConfig:
    """Where the data comes from, where prepared shards go, and how bad rows are handled."""

    inputs: list[str] = field(default_factory=list)
    """Files, globs or directories of JSONL / JSON / Parquet files, or a `datasets` save_to_disk directory."""
    input_format: Literal["auto", "jsonl", "json", "parquet", "hf"] = "auto"
    """auto: by file extension (and `datasets` directories by their state.json)."""
    hf_split: str | None = None
    """Split to read from a saved `datasets.DatasetDict` (required when the directory holds several)."""
    output_dir: str | None = None
    """Prepared Parquet shards and prepare_report.json are written here (atomically)."""
    tokenize: bool = True
    """False writes previewed records only (no chat template / token ids), e.g. for another trainer."""
    on_error: Literal["fail", "skip"] = "fail"
    """fail: stop at the first bad row, naming file, row and field; skip: count it in the report by reason."""
    max_row_bytes: int = 256 * 1024
    """Rows larger than this are bad input (reason row_too_large): no fine-tuning example is this long."""
    batch_size: int = 1024
    """Rows per Ray Data batch in the transform."""
    num_actors: int = 1
    """Transform actors (each loads the tokenizer once)."""
    cpus_per_actor: float = 0.5
    """Fractional so read tasks still get a CPU: an actor pool holding every CPU starves the reads and hangs."""
    rows_per_shard: int = 100_000
    """Target rows per output Parquet shard."""
    read_split_bytes: int = 64 * 2**20
    """A JSONL input larger than this is read by several tasks, in line-aligned byte ranges of about this size."""
    safety_mix: SafetyMixConfig | None = None
    """Mix safety demonstrations into the training data (see SafetyMixConfig)."""

    def __post_init__(self) -> None:
        for name in ("max_row_bytes", "batch_size", "num_actors", "rows_per_shard", "read_split_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"data.cpus_per_actor must be > 0, got {self.cpus_per_actor}")


BUILTIN_TINY_TOKENIZER = "builtin:tiny"


@dataclass
class TinyModelConfig:
    """A small Llama-architecture model built from config (tests, demo, CPU smoke runs)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512


@dataclass
class ModelConfig:
    """The model and tokenizer (a local directory or a Hugging Face Hub id)."""

    name_or_path: str | None = None
    """Model directory or Hub id loaded with from_pretrained; leave unset and set `tiny` to build from config."""
    tiny: TinyModelConfig | None = None
    """Build a small Llama model from this config instead of loading one (random init, seeded by train.seed)."""
    tokenizer: str | None = None
    """Tokenizer path or Hub id; default: model.name_or_path (or "builtin:tiny" with model.tiny). "builtin:tiny"
    builds a small local BPE tokenizer with a chat template."""
    trust_remote_code: bool = False
    """Run code shipped with the model or tokenizer; off unless you trust the source."""
    chat_template: str | None = None
    """A Jinja chat template for tokenizers that ship none (e.g. a bare SentencePiece model)."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "flex_attention", "eager"] | None = None
    """The attention kernel for training (transformers' attn_implementation); default: transformers' choice
    (sdpa). flash_attention_2 needs the flash-attn package and CUDA; flex_attention (torch's, compiled with Triton
    on first use) skips the blocks a packed sequence's examples do not share, where flash-attn is not installed."""
    liger_kernel: bool = False
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy that never materialises the
    fp32 logits): CUDA only, ``pip install 'lookahead-ray[liger]'``."""

    def tokenizer_source(self) -> str:
        """``tokenizer``, else the model's own (``name_or_path``), else the builtin one for ``tiny`` models.

        Raises:
            ConfigError: none of the three is set.
        """
        if self.tokenizer:
            return self.tokenizer
        if self.name_or_path:
            return self.name_or_path
        if self.tiny is not None:
            return BUILTIN_TINY_TOKENIZER
        raise ConfigError("model.tokenizer is not set (nor model.name_or_path to take it from)")


@dataclass
class LoraConfig:
    """LoRA adapters (peft) instead of full fine-tuning: the base weights stay frozen, only the adapters train."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator: the adapter's update is scaled by alpha / r."""
    dropout: float = 0.05
    target_modules: list[str] | None = None
    """Module names that get adapters; default: every attention and MLP projection of the model family (Llama,
    Mistral, Qwen, Gemma, ...), else peft's "all-linear" (every linear layer but the output head)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. embed_tokens, lm_head after adding tokens)."""
    merge: bool = True
    """Also export the base with the adapter merged into it (final/, loadable by plain transformers); the adapter
    itself is in final/adapter/. false: final/ is the adapter alone."""
    quantize: Literal["4bit"] | None = None
    """QLoRA: the frozen base in bitsandbytes NF4 (CUDA GPUs, ZeRO-2, model.name_or_path, merge: false; ``pip install
    'lookahead-ray[qlora]'``)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"train.lora: r must be >= 1, alpha > 0 and 0 <= dropout < 1 (got r={self.r}, "
                              f"alpha={self.alpha}, dropout={self.dropout})")
        if self.quantize and self.merge:
            raise ConfigError("train.lora.quantize: 4bit exports the adapter alone (its base is 4-bit, nothing to merge "
                              "into): set train.lora.merge=false")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("train.lora.target_modules is empty: name the modules, or leave it unset for the default")


@dataclass
class ConstrainedSFTConfig:
    """Constrained SFT (Qi et al. 2024, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep"): each
    answer token's cross-entropy is weighted by how far the policy already moved from the frozen seed model on it,
    w_t = max(2 (1 - sigmoid(beta_t (log p_policy - log p_seed))), min_weight), so the first answer tokens, where
    alignment lives, move least. Defaults: the authors' ConstrainedSFTTrainer."""

    beta: float = 0.1
    """beta_t beyond the first bias_length answer tokens; 0 is plain SFT (every weight 1)."""
    bias_factor: float = 20.0
    """Answer tokens 1 .. bias_length-1 get beta x bias_factor (a tighter constraint)."""
    first_token_bias_factor: float = 5.0
    """The first answer token gets beta x first_token_bias_factor (its loss starts high and would saturate)."""
    bias_length: int = 5
    """Answer tokens under the stronger constraint (0: beta everywhere)."""
    min_weight: float = 1e-3
    """Floor of a token's weight, so no answer token stops training entirely."""

    def __post_init__(self) -> None:
        if min(self.beta, self.bias_factor, self.first_token_bias_factor, self.bias_length, self.min_weight) < 0:
            raise ConfigError(f"train.constrained: beta, bias_factor, first_token_bias_factor, bias_length and "
                              f"min_weight must be >= 0 (got beta={self.beta}, bias_factor={self.bias_factor}, "
                              f"first_token_bias_factor={self.first_token_bias_factor}, bias_length={self.bias_length}, "
                              f"min_weight={self.min_weight})")


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed ZeRO fine-tuning. Batch sizes are explicit: global = micro x accumulation x workers."""

    output_dir: str | None = None
    """Run directory: Ray Train checkpoints under <output_dir>/<run_name>, the HF export in <output_dir>/final."""
    storage_path: str | None = None
    """Ray Train storage (shared or cloud, e.g. s3://bucket/runs) for multi-node runs; default: output_dir."""
    run_name: str = "train"
    """Ray Train run name. Keep it stable (no timestamps): rerunning the same name resumes the run."""
    prepared_dir: str | None = None
    """Train on Parquet shards written by `prepare` instead of streaming the preview pipeline."""
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 2 (optimizer + gradient sharding) or 3 (+ parameter sharding)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    micro_batch_size: int = 4
    """Sequences per worker per forward pass (with packing: packed sequences, each several examples)."""
    packing: bool = False
    """Pack whole examples end to end into sequences of up to tokenization.max_seq_len tokens, none attending to
    another (position ids restart per example): no compute spent on padding. Steps and the schedule follow the
    packed sequence count."""
    group_by_length: bool = False
    """Without packing: micro-batches of examples of similar length (sorted within seeded groups, then shuffled),
    for less padding where an attention kernel cannot pack."""
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    """Optional check: must equal micro_batch_size x gradient_accumulation_steps x num_workers."""
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    max_steps: int | None = None
    """Optimizer steps; when unset, epochs x (rows // global batch)."""
    epochs: int = 1
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    """Train LoRA adapters on a frozen base instead of every weight (see LoraConfig); part of the run's identity."""
    constrained: ConstrainedSFTConfig | None = None
    """Train with Constrained SFT against the frozen seed model (see ConstrainedSFTConfig; ``train.constrained={}``
    takes the paper's defaults) instead of plain cross-entropy; part of the run's identity."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer states to CPU memory."""
    offload_params: bool = False
    """ZeRO-3 only: parameters offloaded to CPU memory."""
    checkpoint_every_steps: int = 0
    """Save a resumable DeepSpeed checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    max_failures: int = 0
    """Worker-group failures Ray Train recovers from (resuming from the latest checkpoint)."""
    worker_start_timeout_s: float = 300.0
    """A worker group still waiting for its resources (e.g. GPUs the cluster does not have) after this long
    fails instead of waiting forever (Ray Train's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)."""
    controller_failure_limit: int = 2
    """Ray Train controller failures (such as worker-group start timeouts) tolerated before the run fails;
    Ray's default retries forever."""
    resume_from: str | None = None
    """A checkpoint directory (e.g. a finished run's) to start from: weights, optimizer, scheduler and step."""
    resume: Literal["auto", "never", "force"] = "auto"
    """A run name that exists already: auto resumes it if its training config is the same (a finished run is
    not trained again) and stops naming the keys that differ otherwise; never moves the old run aside and
    starts fresh; force resumes it whatever changed."""
    seed: int = 0
    report_every_steps: int = 10
    """Steps between ray.train.report calls. Each is a barrier across workers (about 2 s on a 2-core CPU machine
    with Ray 2.60), so not every step; TensorBoard and MLflow get every step from rank 0."""
    mlflow_tracking_uri: str | None = None
    """Also log metrics to MLflow (needs `mlflow` installed)."""
    verify_export: bool = True
    """After the HF export, reload it on rank 0 and check its logits against the engine's (catches empty exports)."""
    workers_per_node: int | None = None
    """For the dry run's cost estimate: workers (GPUs) a node runs; default: all on one node."""
    gpu_memory_gb: float | None = None
    """For the dry run's cost estimate: each GPU's memory; a recipe estimated above it fails the dry run, one above
    90% of it warns."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Expert DeepSpeed keys merged last into the generated config (nested dicts merge)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"train.zero_stage must be 2 or 3, got {self.zero_stage}")
        for name in ("num_workers", "micro_batch_size", "gradient_accumulation_steps", "epochs", "report_every_steps",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        expected = self.micro_batch_size * self.gradient_accumulation_steps * self.num_workers
        if self.global_batch_size is not None and self.global_batch_size != expected:
            raise ConfigError(f"train.global_batch_size {self.global_batch_size} != micro_batch_size "
                              f"{self.micro_batch_size} x gradient_accumulation_steps {self.gradient_accumulation_steps}"
                              f" x num_workers {self.num_workers} = {expected}")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("train.offload_params needs train.zero_stage 3")
        if self.lora is not None and self.lora.quantize and self.zero_stage != 2:
            raise ConfigError("train.lora.quantize: 4bit runs under train.zero_stage 2 (DeepSpeed cannot partition "
                              "bitsandbytes' 4-bit weights); set train.zero_stage=2")
        if self.packing and self.group_by_length:
            raise ConfigError("train.packing and train.group_by_length: choose one (packing leaves no padding to "
                              "group away)")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas must have 2 values, got {self.adam_betas}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.num_workers


@dataclass
class PromptSetConfig:
    """A prompt file for evaluation (never shipped with the package: users point at their own copies)."""

    path: str
    format: Literal["hexphi", "harmful_messages", "advbench", "jsonl"] = "jsonl"
    """hexphi: JSONL {instruction, category}; harmful_messages: JSONL, each line {messages: [user, assistant(harmful)]}
    or the bare turns list (the reference's Harmful-HEx-PHI.jsonl);
    advbench: CSV {goal, target}; jsonl: plain JSONL with prompt_field / answer_field / category_field."""
    prompt_field: str = "instruction"
    answer_field: str | None = None
    """Reference answer (utility) or harmful reply (JSR prefill) for the jsonl format."""
    category_field: str | None = "category"
    task: Literal["gsm8k", "samsum", "exact"] = "exact"
    """Utility sets only: how answers are scored."""
    max_samples: int | None = None
    """Evaluate the first N rows only."""


@dataclass
class JudgeConfig:
    """How harmful-prompt responses are judged. The keyword judge always runs; the LLM judge when `llm` is set."""

    refusal_phrases: list[str] | None = None
    """Substrings that mark a refusal; default: the reference harness's list."""
    keyword_first_n_words: int | None = None
    """Also report a keyword judge that only looks at the first N words of the response."""
    llm: bool = False
    base_url: str | None = None
    """An OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or a local vLLM server."""
    model: str | None = None
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (the key itself never goes in a config)."""
    max_concurrency: int = 4
    max_retries: int = 5
    backoff_seconds: float = 1.0
    max_retry_after_seconds: float = 60.0
    """Longest wait a server's Retry-After header can impose before the next attempt."""
    timeout_seconds: float = 60.0
    cache_dir: str = "~/.cache/lookahead_ray/judge"

    def __post_init__(self) -> None:
        self.cache_dir = str(Path(self.cache_dir).expanduser())
        if self.max_concurrency < 1 or self.max_retries < 0:
            raise ConfigError("eval.judge: max_concurrency must be >= 1 and max_retries >= 0")


@dataclass
class ContinuousBatchingConfig:
    """`eval.engine: hf_continuous`: the KV cache of transformers' continuous batching (paged attention). Explicit
    sizes, since the automatic sizing reads GPU memory and on CPU picks a cache that makes generation ~10x slower."""

    page_size: int = 32
    """Tokens per KV-cache page."""
    num_blocks: int = 512
    """Pages in the cache: num_blocks x page_size tokens in flight at once, across all requests."""
    max_batch_tokens: int = 2048
    """Tokens (prefill and decode) in one forward pass."""
    max_requests_per_batch: int = 64

    def __post_init__(self) -> None:
        if min(self.page_size, self.num_blocks, self.max_batch_tokens, self.max_requests_per_batch) < 1 or (
                self.page_size < 4):
            raise ConfigError("eval.continuous_batching: page_size must be >= 4 and num_blocks, max_batch_tokens and "
                              "max_requests_per_batch >= 1")


@dataclass
class ServerConfig:
    """`eval.engine: openai`: an OpenAI-compatible completions server that is already running (vLLM, SGLang, TGI,
    `transformers serve`); the chat template and JSR prefill are applied here, the server only continues."""

    url: str | None = None
    """Base URL, e.g. http://127.0.0.1:8000/v1 (requests go to <url>/completions)."""
    model: str | None = None
    """The name the server knows the model by; default: the --model path as given."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (the key itself never goes in a config)."""
    prompt_format: Literal["token_ids", "text"] = "token_ids"
    """token_ids: the prompt as a list of ids (vLLM, SGLang); text: the rendered prompt with the prefill decoded
    and appended, for servers that only take strings (`transformers serve`, TGI)."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Sent with every request, e.g. {return_token_ids: true} for vLLM, so the continuation comes back as ids."""
    max_concurrency: int = 8
    max_retries: int = 3
    backoff_seconds: float = 1.0
    timeout_seconds: float = 120.0
    """Per request."""
    cache_dir: str = "~/.cache/lookahead_ray/eval_server"
    """Every completion received is appended here (keyed by URL, model, prompt ids and settings), so a rerun after
    a failure resends only the prompts not yet answered."""

    def __post_init__(self) -> None:
        self.cache_dir = str(Path(self.cache_dir).expanduser())
        if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout_seconds <= 0:
            raise ConfigError("eval.server: max_concurrency must be >= 1, max_retries >= 0 and timeout_seconds > 0")


@dataclass
class VLLMConfig:
    """`eval.engine: vllm`: Ray Data's vLLM processor (`ray.data.llm.vLLMEngineProcessorConfig`), for GPU clusters."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    concurrency: int = 1
    """vLLM engine replicas (data parallelism), each tensor_parallel_size x pipeline_parallel_size GPUs."""
    batch_size: int = 64
    """Rows Ray Data hands an engine at once; vLLM batches continuously inside."""
    accelerator_type: str | None = None
    """e.g. H100: only nodes with that accelerator run the engine."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """More vLLM engine arguments (max_model_len, gpu_memory_utilization, dtype, ...)."""

    def __post_init__(self) -> None:
        if min(self.tensor_parallel_size, self.pipeline_parallel_size, self.concurrency, self.batch_size) < 1:
            raise ConfigError("eval.vllm: tensor_parallel_size, pipeline_parallel_size, concurrency and batch_size "
                              "must be >= 1")


@dataclass
class EvalConfig:
    """`lookahead-ray eval`: safety (RSR, JSR), utility and first-token drift of several models."""

    output_dir: str | None = None
    harmful: PromptSetConfig | None = None
    """Harmful prompts for RSR (e.g. HEx-PHI)."""
    harmful_answers: PromptSetConfig | None = None
    """Harmful prompt + harmful reply pairs for JSR prefills."""
    utility: PromptSetConfig | None = None
    """Task prompts with reference answers (e.g. GSM8K test)."""
    benign: PromptSetConfig | None = None
    """Benign prompts for over-refusal and drift; default: the utility prompts."""
    system_prompt: str | None = None
    """System turn for safety prompts (utility prompts use tokenization.system_prompt and prompt_template)."""
    max_new_tokens: int = 128
    batch_size: int = 16
    jsr_prefill_tokens: int = 3
    """k: harmful-reply tokens prefilled for JSR."""
    jsr_prefill_count: Literal["answer_tokens", "reference_encode"] = "answer_tokens"
    """answer_tokens: k answer tokens, no special tokens. reference_encode: tokenizer.encode(answer)[:k] as the
    reference harness does (includes BOS for Llama tokenizers, so k - 1 answer tokens)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    seed_model: str | None = None
    """The model the others are compared with for drift (KL per answer position); default: the first model."""
    base_model: str | None = None
    """The base of every LoRA adapter directory given as a model (`eval --base`); default: the base each adapter's
    adapter_config.json names."""
    drift_positions: int = 10
    drift_max_prompts: int = 64
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    seed: int = 0
    engine: Literal["hf", "hf_continuous", "vllm", "openai"] = "hf"
    """How responses are generated; every engine takes the same token-id prompts (chat template, JSR prefill) and
    returns greedy ids cut at the model's end tokens. hf: static left-padded batches of batch_size (the reference);
    hf_continuous: transformers' continuous batching in the same actors; vllm: Ray Data's vLLM processor (GPUs, the
    `vllm` extra); openai: a running OpenAI-compatible server (eval.server)."""
    continuous_batching: ContinuousBatchingConfig = field(default_factory=ContinuousBatchingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.jsr_prefill_tokens < 1:
            raise ConfigError("eval: max_new_tokens, batch_size and jsr_prefill_tokens must be >= 1")
        if self.engine == "openai" and not self.server.url:
            raise ConfigError("eval.engine is openai but eval.server.url is not set (e.g. http://127.0.0.1:8000/v1)")


@dataclass
class ObjectiveConfig:
    """What a search maximises (see ``lookahead_ray.tune.objective``)."""

    kind: Literal["constrained", "weighted"] = "constrained"
    """constrained: max utility subject to safety >= seed safety - delta; weighted: a weighted sum."""
    safety: dict[str, float] = field(default_factory=lambda: {"rsr:keyword": 0.5, "jsr:keyword": 0.5})
    """Safe rates mixed into one safety number, "<rsr|jsr>:<judge>" -> weight (e.g. jsr:strict, jsr:llm:MODEL)."""
    delta: float = 0.05
    """constrained: how far below the seed model's safety a trial may fall."""
    utility_weight: float = 1.0
    safety_weight: float = 1.0
    rank_by: Literal["point", "lower_bound"] = "point"
    """point: trials rank by their objective; lower_bound: by the objective with every rate at the lower end of
    its 95% Wilson interval, so a trial scored on few prompts (a wide interval) does not win on one lucky answer."""

    def __post_init__(self) -> None:
        if not self.safety or any(w < 0 for w in self.safety.values()) or sum(self.safety.values()) <= 0:
            raise ConfigError("tune.objective.safety needs at least one rate with a positive weight")


@dataclass
class EarlyStoppingConfig:
    """ASHA early stopping on the trials' intermediate training metrics. Its time unit is one training report
    (every train.report_every_steps steps), so the grace period and rungs count reports, not steps."""

    kind: Literal["none", "asha"] = "none"
    metric: str = "loss"
    """A metric of the training reports (loss, tokens_per_second, ...)."""
    mode: Literal["min", "max"] = "min"
    grace_reports: int = 1
    """No trial is stopped before this many reports."""
    reduction_factor: int = 2
    """At each rung ASHA keeps the best 1/reduction_factor of the trials that reached it."""

    def __post_init__(self) -> None:
        if self.grace_reports < 1 or self.reduction_factor < 2:
            raise ConfigError("tune.early_stopping: grace_reports must be >= 1 and reduction_factor >= 2")


@dataclass
class SearchConfig:
    """`lookahead-ray tune`: the preview (m, P) and training knobs searched, and how."""

    output_dir: str | None = None
    """The search directory (trials, tables, plot, best.yaml); default: <output_dir>/search."""
    modes: list[Literal["vanilla", "real", "virtual"]] = field(default_factory=lambda: ["real", "virtual"])
    m: list[int] = field(default_factory=lambda: [2, 4, 6, 8])
    """Real preview: answer tokens previewed (a trial per value)."""
    prefixes: list[str] = field(default_factory=lambda: ["Let's solve this problem. "])
    """Virtual preview: candidate prefixes P (a trial per value)."""
    learning_rates: list[float] = field(default_factory=list)
    """Optional: train.learning_rate values crossed with the preview settings."""
    epochs: list[int] = field(default_factory=list)
    """Optional: train.epochs values crossed with the preview settings."""
    lora_ranks: list[int] = field(default_factory=list)
    """Optional: train.lora.r values crossed with the preview settings (trials train LoRA adapters; train.lora's
    other settings, alpha included, stay as configured)."""
    methods: list[str] = field(default_factory=list)
    """Optional: compared methods (``lookahead_ray.methods``: constrained_sft, safety_mix, ptst, mixed_preview,
    adaptive_preview, or combinations such as real+safety_mix), a trial each (per knob values), crossed with the
    training knobs; the method's overrides go on the base config before the trial's own."""
    method_knobs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    """Optional: per method, config keys and the values to try, e.g. {constrained_sft: {train.constrained.beta: [0.1,
    0.5]}, mixed_preview: {preview.mix_plain_share: [0.25, 0.5]}}."""
    search: Literal["grid", "random", "optuna"] = "grid"
    """grid: every trial; random: num_samples of them, drawn with seed; optuna: num_samples trials proposed by
    Optuna's TPE sampler (seeded with seed) from the same conditional space (pip install 'lookahead-ray[optuna]')."""
    num_samples: int = 4
    seed: int = 0
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    cpus_per_trial: float = 0.5
    """The trial's own driver process (Ray Tune cannot give a trial 0 CPUs); its Train workers and Ray Data
    tasks take their resources on top of this."""
    keep_trial_checkpoints: bool = False
    """Keep each finished trial's Ray Train checkpoints (the full ZeRO state: ~95 GB for 7B). By default a trial
    keeps only its final/ export once its eval is done, so a search's disk grows by an export per trial."""
    max_concurrent_trials: int | None = None
    """Default: the cluster's CPUs (GPUs) divided by what one trial takes, at least 1."""

    def __post_init__(self) -> None:
        if not self.modes and not self.methods:
            raise ConfigError("tune.modes and tune.methods are both empty: nothing to search")
        if "real" in self.modes and (not self.m or min(self.m) < 0):
            raise ConfigError("tune.m needs at least one value >= 0 when tune.modes has real")
        if "virtual" in self.modes and not self.prefixes:
            raise ConfigError("tune.prefixes needs at least one candidate when tune.modes has virtual")
        if set(self.method_knobs) - set(self.methods):
            raise ConfigError(f"tune.method_knobs names methods not in tune.methods: "
                              f"{sorted(set(self.method_knobs) - set(self.methods))}")
        if self.methods:
            for name in self.methods:
                try:
                    method_parts(name)
                except ConfigError as error:
                    raise ConfigError(f"tune.methods: {error}") from None
        for name, knobs in self.method_knobs.items():
            empty = [key for key, values in knobs.items() if not values]
            if empty:
                raise ConfigError(f"tune.method_knobs.{name}.{empty[0]} is empty: list the values to try")
        if self.methods and self.early_stopping.kind == "asha":
            raise ConfigError("tune.early_stopping: asha compares training losses, which the methods do not share "
                              "(constrained SFT's is weighted, safety rows and previews change the data); set "
                              "tune.early_stopping.kind=none with tune.methods")
        if any(r < 1 for r in self.lora_ranks):
            raise ConfigError(f"tune.lora_ranks must be >= 1, got {self.lora_ranks}")
        if self.num_samples < 1 or self.cpus_per_trial <= 0:
            raise ConfigError("tune.num_samples must be >= 1 and tune.cpus_per_trial > 0")


@dataclass
class ClusterConfig:
    """How the commands treat the Ray cluster they run on."""

    resource_wait_s: float = 15.0
    """On a cluster joined through RAY_ADDRESS: how long prepare, train, eval and tune wait for it to offer the
    CPUs and GPUs they ask for (its nodes' totals, each worker on one node) before failing in one line naming what
    was asked and what it has. Raise it where the cluster autoscales (new nodes take minutes); meanwhile the
    autoscaler is asked for the resources. A local Ray cannot grow: there the check fails at once."""

    def __post_init__(self) -> None:
        if self.resource_wait_s < 0:
            raise ConfigError(f"cluster.resource_wait_s must be >= 0, got {self.resource_wait_s}")


STAGE_SUBDIRS = {"prepare": "prepared", "train": "train", "eval": "eval", "tune": "search"}


@dataclass
class LookaheadConfig:
    """One run of the workflow."""

    output_dir: str | None = None
    """Run directory: prepare, train and eval write into prepared/, train/ and eval/ below it unless
    data.output_dir, train.output_dir or eval.output_dir name another place. One path per run or Tune trial."""
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    records: RecordConfig = field(default_factory=RecordConfig)
    tokenization: TokenizationConfig = field(default_factory=TokenizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: SearchConfig = field(default_factory=SearchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> LookaheadConfig:
        return build(cls, data, source)

    def stage_dir(self, stage: Literal["prepare", "train", "eval", "tune"]) -> str | None:
        """Where ``stage`` writes: its own output_dir if set, else a subdirectory of the run's output_dir."""
        explicit = {"prepare": self.data.output_dir, "train": self.train.output_dir, "eval": self.eval.output_dir,
                    "tune": self.tune.output_dir}
        if explicit[stage]:
            return explicit[stage]
        return os.path.join(self.output_dir, STAGE_SUBDIRS[stage]) if self.output_dir else None
