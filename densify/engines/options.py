"""Typed options of the engines (`engine.options` in a config): validated once, when the config loads, and
then handed as they are to the engine (`create_engine(options, profile=...)`), never checked again.

One pydantic model per engine, named by its registry line (densify.engines.registry). They live apart from
the engines, so validating a config imports no torch, vLLM, Ray or openai SDK; the simulator's model lives
with the simulator (densify.sim.options). Each model answers what the rest of densify would otherwise ask
by the engine's name: whether it loads a checkpoint (`needs_checkpoint`), where a stage's model goes
(`with_model`), which engine answers (`answering`: a Ray pool's actors' engine), whether that is the
simulator (`simulated`), the identity of its answers (`answer_identity`: result fingerprints and answer-store
keys), and how it shares a GPU (`auto_engines_per_gpu`, `for_shared_gpu`). Changes are copies
(`model_copy`), never a new validation. README's option tables are checked against these models.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, ClassVar, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from densify.engines.registry import options_model, pool_default_engine
from densify.engines.vllm_memory import AUTO_ENGINES_PER_GPU, AUTO_ENGINES_PER_GPU_FP8, apply_memory_plan


class OptionsError(ValueError):
    """A bad engine option; the message names its key (`engine.options.<key>`)."""


class EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    engine_name: ClassVar[str] = ""
    """The registry's name of the engine these options are for."""
    transport: ClassVar[frozenset[str]] = frozenset()
    """Options that change how answers are obtained (memory, scheduling, network), never what they are:
    left out of the answer identity (result fingerprints, answer-store keys), so changing them re-asks
    nothing. May name old option names too, so that keys made with them stay valid."""
    runtime: ClassVar[frozenset[str]] = frozenset()
    """Python-only arguments of the engine besides its options (objects, never config values)."""
    simulated: ClassVar[bool] = False
    """Answers from ground truth (tests and demos), never from a model."""
    loads_checkpoint: ClassVar[bool] = False
    """Loads a checkpoint when it starts (so a stage checks that the model exists first)."""

    # -- from config values and keyword arguments
    @classmethod
    def parse(cls, options: dict | None, where: str = "engine.options"):
        """The options as this model; an OptionsError names the bad key (`where`.key)."""
        options = dict(options or {})
        known = set(cls.model_fields) | {a for f in cls.model_fields.values()
                                         for a in getattr(f.validation_alias, "choices", ())}
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, cls.model_fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise OptionsError(f"{where}.{key}: not an option of the {cls.engine_name} engine{hint}; its options: "
                                   f"{', '.join(cls.model_fields) or 'none'}")
        try:
            return cls.model_validate(options, context={"where": where})
        except ValidationError as exc:
            err = exc.errors()[0]
            inner = (err.get("ctx") or {}).get("error")
            if isinstance(inner, OptionsError):  # raised by a validator, already naming its key
                raise OptionsError(str(inner)) from None
            key = ".".join(str(p) for p in err["loc"])
            raise OptionsError(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})") from None

    @classmethod
    def given(cls, options: "EngineOptions | None", kwargs: dict):
        """An engine constructor's options: the typed object as it is, else its keyword options checked now."""
        if options is None:
            return cls.parse(kwargs)
        if kwargs:
            raise TypeError(f"the {cls.engine_name} engine takes typed options or keyword options, not both "
                            f"(got {', '.join(sorted(kwargs))})")
        if not isinstance(options, cls):
            raise TypeError(f"the {cls.engine_name} engine takes {cls.__name__}, not {type(options).__name__}")
        return options

    def set_values(self) -> dict:
        """The options that were given (not defaulted), as given: what a config or a store key records."""
        return {k: getattr(self, k) for k in type(self).model_fields if k in self.model_fields_set}

    # -- what the rest of densify asks of an engine's options
    def answering(self) -> "EngineOptions":
        """The options of the engine that answers (a pool's: its actors' engine)."""
        return self

    def to_build(self) -> "EngineOptions":
        """The options of the engine to build (a pool that is not enabled: its engine's, in this process)."""
        return self

    def with_model(self, model: str | None):
        """A copy with a stage's model put where the answering engine takes it (ValueError: it takes none)."""
        if model is None:
            return self
        if "model" not in type(self).model_fields:
            raise ValueError(f"the {self.engine_name} engine takes no model")
        return self.model_copy(update={"model": model})

    def needs_checkpoint(self) -> bool:
        """Whether starting the engine loads a checkpoint that must exist (checked before it starts)."""
        return self.loads_checkpoint

    def checkpoint(self, default: str) -> str:
        """The checkpoint it loads (the profile's model, `default`, unless the options name one)."""
        return getattr(self, "model", None) or default

    @classmethod
    def identity_of(cls, values: dict, model: str | None = None) -> str:
        """The answer identity of these option values (see `identity`)."""
        return identity(cls.engine_name, values, cls.transport, model)

    def answer_identity(self, model: str | None = None) -> str:
        """What identifies this engine's answers: result fingerprints and answer-store keys both use it."""
        inner = self.answering()
        return type(inner).identity_of(inner.set_values(), model)

    def auto_engines_per_gpu(self, num_gpus_per_actor: float, num_actors: int | None) -> int:
        """Engines per GPU of `engines_per_gpu: auto` in a Ray pool: one, unless the engine says otherwise."""
        return 1

    def for_shared_gpu(self, engines_per_gpu: int, gpu_total_gib: float) -> tuple["EngineOptions", dict | None]:
        """A copy sized to be one of `engines_per_gpu` engines on a card, and the plan (None: nothing to size)."""
        return self, None


def identity(engine: str, values: dict, transport: frozenset = frozenset(), model: str | None = None) -> str:
    """The one formula of an answer identity: the engine and the options that change its answers (the
    `transport` ones left out; an unknown option stays in, on the safe side). `model`, the model the started
    engine actually serves, fills in an unset `model` option."""
    kept = {k: v for k, v in values.items() if k not in transport}
    if model is not None and kept.get("model") is None:
        kept["model"] = model
    return json.dumps([engine, kept], sort_keys=True, default=str)


class HFOptions(EngineOptions):
    """transformers `generate`, greedy, batched with left padding (the slow, simple baseline)."""
    engine_name: ClassVar[str] = "hf"
    loads_checkpoint: ClassVar[bool] = True
    model: str | None = Field(None, description="checkpoint folder or hub name (default: the profile's)")
    device: str = Field("auto", description="auto (cuda when available), cuda, cuda:1, cpu")
    dtype: str = Field("auto", description="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32")
    batch_size: int = Field(16, ge=1, description="queries per generate call")
    attn_implementation: str | None = Field(None, description="transformers attention backend (e.g. sdpa)")
    load_format: Literal["auto", "dummy"] = Field("auto", description="'dummy': random weights built from the "
                                                  "checkpoint's config, on the device (benchmarks)")
    transport: ClassVar[frozenset[str]] = frozenset({"device", "batch_size", "attn_implementation"})


class VLLMOptions(EngineOptions):
    """An in-process vllm.LLM on one GPU (or one tensor-parallel group)."""
    engine_name: ClassVar[str] = "vllm"
    loads_checkpoint: ClassVar[bool] = True
    runtime: ClassVar[frozenset[str]] = frozenset({"llm"})
    model: str | None = Field(None, description="checkpoint folder or hub name (default: the profile's)")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1, description="share of the GPU's memory vLLM may take")
    max_model_len: int | None = Field(8192, ge=1, description="longest prompt + answer, tokens")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans")
    dtype: str = Field("auto", description="weights and activations dtype")
    max_num_seqs: int = Field(1024, ge=1, description="requests decoded together")
    max_num_batched_tokens: int | None = Field(32768, ge=1, description="tokens per engine step")
    enable_prefix_caching: bool = Field(True, description="reuse an image's KV across its queries")
    load_format: str = Field("auto", description="'dummy': random weights (benchmarks)")
    enforce_eager: bool = Field(False, description="no CUDA graphs")
    limit_mm_per_prompt: dict | None = Field(None, description="default {image: images per query, video: 0}")
    quantization: str | None = Field(None, description="e.g. fp8 (online fp8 weights)")
    cascade_attention: bool | None = Field(None, description="None: vLLM's default (off)")
    queries_in_flight: int | None = Field(None, ge=0, description="stream: submit the next batch below this many "
                                          "unfinished queries (default 2 x max_num_seqs)")
    batches_in_flight: int = Field(16, ge=1, description="at most this many batches submitted at once")
    min_tokens: int = Field(0, ge=0, description="benchmarks: force answers to at least this many tokens")
    ignore_eos: bool = Field(False, description="benchmarks: answers run to max tokens")
    read_prefix_cache: bool = Field(True, description="false: skip prefix-cache reads (benchmarks)")
    fast_prompts: bool = Field(True, description="derive an image's prompt token ids from two rendered ones "
                               "(checked against vLLM's rendering)")
    detokenize: bool = Field(True, description="false: vLLM returns token ids and the engine decodes each "
                             "finished batch at once")
    mm_uuids: bool = Field(True, description="pass each image's content hash as multi_modal_uuids (vLLM then "
                           "skips hashing every request's image)")
    llm_kwargs: dict = Field(default_factory=dict, description="passed to vllm.LLM as is (e.g. seed, kv_cache_dtype)")
    transport: ClassVar[frozenset[str]] = frozenset({
        "gpu_memory_utilization", "max_model_len", "tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens",
        "enable_prefix_caching", "enforce_eager", "limit_mm_per_prompt", "cascade_attention", "queries_in_flight",
        "batches_in_flight", "read_prefix_cache", "fast_prompts", "mm_uuids"})

    def needs_checkpoint(self) -> bool:
        return self.load_format != "dummy"  # random weights: the folder's config is enough

    def auto_engines_per_gpu(self, num_gpus_per_actor: float, num_actors: int | None) -> int:
        """AUTO_ENGINES_PER_GPU (AUTO_ENGINES_PER_GPU_FP8 with fp8 weights) on whole GPUs (one GPU per engine,
        no tensor parallelism), unless the options size the memory themselves (gpu_memory_utilization given)
        or num_actors is given (a count meant as one per GPU); else 1."""
        if (num_gpus_per_actor == 1 and num_actors is None and "gpu_memory_utilization" not in self.model_fields_set
                and self.tensor_parallel_size == 1):
            return AUTO_ENGINES_PER_GPU_FP8 if self.quantization == "fp8" else AUTO_ENGINES_PER_GPU
        return 1

    def for_shared_gpu(self, engines_per_gpu: int, gpu_total_gib: float) -> tuple["VLLMOptions", dict | None]:
        """The memory plan's gpu_memory_utilization, step and CUDA-graph sizes wherever the options left them
        unset (densify.engines.vllm_memory)."""
        if engines_per_gpu <= 1:
            return self, None
        return apply_memory_plan(self, engines_per_gpu, gpu_total_gib)


class OpenAIOptions(EngineOptions):
    """A running OpenAI-compatible server (e.g. `vllm serve MODEL`), through the openai SDK."""
    engine_name: ClassVar[str] = "openai"
    base_url: str = Field("http://127.0.0.1:8000/v1", description="the server's .../v1 URL")
    model: str | None = Field(None, description="served model (default: the server's only one, else the profile's)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key (never logged)")
    concurrency: int = Field(64, ge=1, description="requests in flight")
    timeout_s: float = Field(120.0, gt=0, description="wall-clock deadline of one attempt: connect, send and the "
                             "whole answer")
    connect_timeout_s: float = Field(10.0, gt=0, description="the connect alone (capped at timeout_s)")
    retries: int = Field(4, ge=0, description="further attempts after a timeout, connection error, 408/409/425/429 "
                         "or 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first wait between attempts, doubled each retry, with jitter")
    max_backoff_s: float = Field(20.0, ge=0, description="longest wait between attempts (Retry-After honoured up "
                                 "to it)")
    structured_field: Literal["structured_outputs", "guided_regex"] = Field(
        "structured_outputs", description="request field for the structured-output regex")
    send_uuids: bool = Field(True, description="send image uids as vLLM `uuid` fields")
    batches_in_flight: int = Field(2, ge=1, description="batches `stream` keeps queued")
    extra_body: dict | None = Field(None, description="merged into every request")
    check_server: bool = Field(True, description="probe /models at start")
    transport: ClassVar[frozenset[str]] = frozenset({
        "base_url", "api_key_env", "concurrency", "timeout_s", "connect_timeout_s", "retries", "backoff_s",
        "max_backoff_s", "structured_field", "send_uuids", "batches_in_flight", "check_server",
        # the names before timeout_s, retries, ...: keys made with them stay valid
        "timeout", "connect_timeout", "max_retries", "backoff", "max_backoff"})


class RayOptions(EngineOptions):
    """A pool of Ray actors, each running one engine; whole images go to actors.

    The same model is the label job's `ray:` section (densify.stages.settings.RayConfig), which wraps the
    engine of its `engine:` section (`around`)."""
    engine_name: ClassVar[str] = "ray"
    enabled: bool = Field(True, description="run the engine in Ray actors; false: in this process, no pool")
    address: str | None = Field(None, validation_alias=AliasChoices("address", "ray_address"),
                                description="an existing cluster ('auto', ray://host:port); default a local Ray "
                                            "(also accepted as ray_address)")
    num_actors: int | None = Field(None, ge=1, description="default: one per GPU, else one per CPU")
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor (1 for a GPU engine, 0.5: two per GPU)")
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs per actor")
    engines_per_gpu: int | Literal["auto"] = Field("auto", description="vLLM engines sharing each GPU, each sized "
                                                   "to fit (auto: 2 for vllm at one GPU per actor, 3 with fp8 "
                                                   "weights, else 1)")
    max_in_flight_per_actor: int = Field(2, ge=1, description="images queued per actor")
    split_min_queries: int = Field(128, ge=0, description="split an image's batch between idle actors, at least "
                                   "this many queries each (one image at a time keeps every engine busy; 0: never)")
    cpu_workers: int = Field(0, ge=0, validation_alias=AliasChoices("cpu_workers", "spare_cpus"),
                             description="CPUs the default actor count of a CPU-only pool leaves free for the "
                                         "stage's Ray CPU workers; the label job prepares, plans (adaptive "
                                         "rounds) and densifies images in this many Ray CPU tasks instead of the "
                                         "driver (0: in the driver; also accepted as spare_cpus)")
    max_retries: int = Field(2, ge=0, description="resubmissions of an image whose actor died or failed")
    actor_max_restarts: int = Field(4, ge=0, description="times Ray restarts a dead actor")
    runtime_env: dict | None = Field(None, description="Ray runtime_env for the actors (working_dir, pip) when the "
                                                       "cluster's workers lack densify")
    engine: str = Field(default_factory=pool_default_engine,
                        description="the engine each actor runs (default: the real model's, vllm when "
                                    "installed, else hf)")
    engine_options: SerializeAsAny[EngineOptions] | None = Field(None, description="that engine's options")
    startup_timeout_s: float = Field(900.0, gt=0, description="seconds to wait for the actors to start")
    start_one_by_one: bool | None = Field(None, description="start actors one at a time (default: when they "
                                          "share a GPU)")
    transport: ClassVar[frozenset[str]] = frozenset({
        "enabled", "address", "num_actors", "num_gpus_per_actor", "num_cpus_per_actor", "engines_per_gpu",
        "max_in_flight_per_actor", "split_min_queries", "cpu_workers", "max_retries", "actor_max_restarts",
        "runtime_env", "startup_timeout_s", "start_one_by_one", "ray_address", "spare_cpus"})

    @field_validator("engines_per_gpu")
    @classmethod
    def _whole(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"must be 'auto' or a whole number >= 1, got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _typed_engine_options(cls, data: Any, info: ValidationInfo) -> Any:
        """The actors' engine's options as its own typed model (their errors name engine_options.<key>)."""
        if not isinstance(data, dict):
            return data
        where = (info.context or {}).get("where", "engine.options")
        name = data.get("engine", None)
        if name is not None and name == cls.engine_name:
            raise OptionsError(f"{where}.engine: the Ray pool cannot run itself; name the engine each actor runs")
        inner = data.get("engine_options")
        if isinstance(inner, dict):
            name = name if name is not None else pool_default_engine()
            try:
                model = options_model(name)
            except KeyError as exc:
                raise OptionsError(f"{where}.engine: {exc.args[0]}") from None
            data = {**data, "engine_options": model.parse(inner, f"{where}.engine_options")}
        return data

    @model_validator(mode="after")
    def _engine_matches(self, info: ValidationInfo):
        where = (info.context or {}).get("where", "engine.options")
        try:
            options_model(self.engine)
        except KeyError as exc:
            raise OptionsError(f"{where}.engine: {exc.args[0]}") from None
        if self.engine_options is not None and self.engine_options.engine_name != self.engine:
            raise OptionsError(f"{where}.engine_options: {type(self.engine_options).__name__} given for the "
                               f"{self.engine} engine")
        return self

    @classmethod
    def identity_of(cls, values: dict, model: str | None = None) -> str:
        """A pool's answers are those of the engine its actors run, with that engine's options."""
        inner, options = values.get("engine", pool_default_engine()), values.get("engine_options") or {}
        if isinstance(options, EngineOptions):
            options = options.set_values()
        if not isinstance(inner, str):  # a factory (Python only)
            return identity(getattr(inner, "__qualname__", repr(inner)), options, frozenset(), model)
        return options_model(inner).identity_of(options, model)

    @property
    def inner(self) -> EngineOptions:
        """The typed options of the engine each actor runs."""
        if self.engine_options is not None:
            return self.engine_options
        return options_model(self.engine)()

    def answering(self) -> EngineOptions:
        return self.inner.answering()

    def to_build(self) -> EngineOptions:
        return self if self.enabled else self.inner.to_build()

    def with_model(self, model: str | None):
        if model is None:
            return self
        return self.model_copy(update={"engine_options": self.inner.with_model(model)})

    def needs_checkpoint(self) -> bool:
        return self.inner.needs_checkpoint()

    def checkpoint(self, default: str) -> str:
        return self.inner.checkpoint(default)

    def wraps(self, options: EngineOptions) -> bool:
        """Whether `around` puts these options in this pool (it is enabled, and they are no pool already)."""
        return self.enabled and not isinstance(options, RayOptions)

    def around(self, options: EngineOptions) -> EngineOptions:
        """`options` run by this pool; unchanged when the pool is not enabled or they are a pool already."""
        if not self.wraps(options):
            return options
        return self.model_copy(update={"engine": options.engine_name, "engine_options": options})

    def engines_per_gpu_for(self) -> int:
        """Engines sharing each GPU: `engines_per_gpu`, or for "auto" what the actors' engine says."""
        k = self.engines_per_gpu
        if k == "auto":
            return self.inner.auto_engines_per_gpu(self.num_gpus_per_actor, self.num_actors)
        if k < 1:
            raise ValueError(f"engines_per_gpu must be 'auto' or a whole number >= 1, got {k!r}")
        if k > 1 and self.num_gpus_per_actor != 1:
            raise ValueError(f"engines_per_gpu={k} shares each GPU between {k} actors: leave num_gpus_per_actor at 1 "
                             f"(got {self.num_gpus_per_actor})")
        return k
