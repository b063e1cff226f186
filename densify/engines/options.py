"""Typed options of every engine (`engine.options` in a config), validated when the config loads.

One pydantic model per engine, registered with it in `densify.engines`. They live here, apart from the
engines, so validating a config never imports torch, vLLM, Ray or the openai SDK. Every default equals the
engine constructor's (a test checks), and README's option tables are checked against these models.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    transport: ClassVar[frozenset[str]] = frozenset()
    """Options that change how answers are obtained (memory, scheduling, network), never what they are:
    left out of result fingerprints and answer-store keys (densify.engines.store.model_key_for), so changing them
    re-asks nothing."""


class SimulatedOptions(EngineOptions):
    """Answers from ground truth through an error model: a test and demo tool, never a model."""
    seed: int = Field(0, description="seed of the error model (answers depend on it, on the images and the prompt)")
    noise: bool = Field(True, description="false: exact answers (checks the pipeline, not a model)")
    error: str | dict | None = Field(None, description="error preset (iid, the default; structured; exact) or "
                                     "ErrorModel parameters (densify.sim.errors)")
    object_error: dict | None = Field(None, description="object-question error model "
                                      "(densify.sim.objects.ObjectErrorModel)")
    answers_per_s: float | None = Field(None, gt=0, description="pace answers to at most this many queries per "
                                        "second per engine (benchmarks: stands in for a GPU engine's rate); "
                                        "None: as fast as the CPU allows")
    transport: ClassVar[frozenset[str]] = frozenset({"answers_per_s"})


class HFOptions(EngineOptions):
    """transformers `generate`, greedy, batched with left padding (the slow, simple baseline)."""
    model: str | None = Field(None, description="checkpoint folder or hub name (default: the profile's)")
    device: str = Field("auto", description="auto (cuda when available), cuda, cuda:1, cpu")
    dtype: str = Field("auto", description="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32")
    batch_size: int = Field(16, ge=1, description="queries per generate call")
    attn_implementation: str | None = Field(None, description="transformers attention backend (e.g. sdpa)")
    transport: ClassVar[frozenset[str]] = frozenset({"device", "batch_size", "attn_implementation"})


class VLLMOptions(EngineOptions):
    """An in-process vllm.LLM on one GPU (or one tensor-parallel group)."""
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


class OpenAIOptions(EngineOptions):
    """A running OpenAI-compatible server (e.g. `vllm serve MODEL`), through the openai SDK."""
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
        "max_backoff_s", "structured_field", "send_uuids", "batches_in_flight", "check_server"})


class RayOptions(EngineOptions):
    """A pool of Ray actors, each running one engine; whole images go to actors."""
    engine: str = Field("simulated", description="the engine each actor runs")
    engine_options: dict | None = Field(None, description="that engine's options")
    num_actors: int | None = Field(None, ge=1, description="default: one per GPU, else one per CPU")
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor (1 for a GPU engine, 0.5: two per GPU)")
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs per actor")
    ray_address: str | None = Field(None, description="an existing cluster ('auto', ray://host:port); default local")
    max_in_flight_per_actor: int = Field(2, ge=1, description="images queued per actor")
    max_retries: int = Field(2, ge=0, description="resubmissions of an image whose actor died or failed")
    runtime_env: dict | None = Field(None, description="Ray runtime_env for the actors")
    actor_max_restarts: int = Field(4, ge=0, description="times Ray restarts a dead actor")
    startup_timeout_s: float = Field(900.0, gt=0, description="seconds to wait for the actors to start")
    start_one_by_one: bool | None = Field(None, description="start actors one at a time (default: when they "
                                          "share a GPU)")
    engines_per_gpu: int | Literal["auto"] = Field("auto", description="vLLM engines sharing each GPU, each sized "
                                                   "to fit (auto: 2 for vllm at one GPU per actor, 3 with fp8 "
                                                   "weights, else 1)")
    split_min_queries: int = Field(128, ge=0, description="split an image's batch between idle actors, at least "
                                   "this many queries each (0: never)")
    spare_cpus: int = Field(0, ge=0, description="CPUs the default actor count of a CPU-only pool leaves free")
    transport: ClassVar[frozenset[str]] = frozenset({
        "num_actors", "num_gpus_per_actor", "num_cpus_per_actor", "ray_address", "max_in_flight_per_actor",
        "max_retries", "runtime_env", "actor_max_restarts", "startup_timeout_s", "start_one_by_one",
        "engines_per_gpu", "split_min_queries", "spare_cpus"})

