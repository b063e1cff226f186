"""One typed engine configuration: the options are validated once when the config loads, travel as that
object (copies, never a new validation) and answer for the engine what would otherwise be a branch on its
name: the answering engine, the simulator, where a model goes, the checkpoint, the answer identity and GPU
sharing. The label job's `ray:` section is the Ray pool's own options model."""

import json

import pytest

from densify.config.loading import ConfigError, dict_overrides
from densify.engines import HFOptions, RayOptions, VLLMOptions
from densify.engines.store import model_key_for
from densify.sim.options import SimulatedOptions
from densify.stages.engine import stage_options
from densify.stages.settings import DepthConfig, LabelConfig, RayConfig, load_config


def label(**over):
    return load_config(LabelConfig, None, dict_overrides(over), default_name="label")


def test_the_config_holds_typed_options_and_writes_them_as_given():
    cfg = DepthConfig(engine={"name": "ray", "options": {"engine": "vllm", "num_actors": 4,
                                                          "engine_options": {"quantization": "fp8"}}})
    opts = cfg.engine.options
    assert isinstance(opts, RayOptions) and isinstance(opts.engine_options, VLLMOptions)
    assert opts.engine_options.quantization == "fp8" and opts.num_actors == 4
    # config.yaml records what was set, not every default
    assert cfg.model_dump(mode="json")["engine"]["options"] == {"num_actors": 4, "engine": "vllm",
                                                                "engine_options": {"quantization": "fp8"}}
    assert DepthConfig(**cfg.model_dump()).engine.options == opts  # and reads back the same


def test_a_stage_model_and_the_label_pool_are_copies_of_the_config_options():
    cfg = label(engine={"name": "hf", "options": {"device": "cpu"}}, ray={"num_actors": 3, "cpu_workers": 1})
    pool = stage_options(cfg.engine, None, cfg.ray)
    assert isinstance(pool, RayOptions) and pool.engine == "hf" and pool.engine_options is cfg.engine.options
    assert (pool.num_actors, pool.cpu_workers) == (3, 1)  # the ray: section's own fields, not copied one by one
    with_model = stage_options(cfg.engine, "/ckpt/m", cfg.ray)
    assert with_model.engine_options.model == "/ckpt/m" and cfg.engine.options.model is None  # a copy
    assert with_model.answering().checkpoint("profile-model") == "/ckpt/m"
    off = label(engine={"name": "hf"}, ray={"enabled": False})
    assert stage_options(off.engine, None, off.ray) is off.engine.options  # no pool: the engine itself
    pooled = label(engine={"name": "ray", "options": {"engine": "hf"}})
    assert stage_options(pooled.engine, None, pooled.ray) is pooled.engine.options  # a pool already
    sim = label(engine={"name": "simulated"})
    with pytest.raises(ConfigError, match="--model: the simulated engine .* takes no model"):
        stage_options(sim.engine, "/ckpt/m", sim.ray)


def test_what_the_options_answer():
    pool = RayOptions.parse({"engine": "vllm", "engine_options": {"load_format": "dummy"}})
    assert pool.answering() is pool.engine_options and not pool.needs_checkpoint()
    assert VLLMOptions().needs_checkpoint() and HFOptions().needs_checkpoint()
    assert not SimulatedOptions().needs_checkpoint() and SimulatedOptions().simulated
    assert RayOptions().needs_checkpoint()  # a pool runs the real model's engine unless told otherwise
    assert not RayOptions().answering().simulated and not DepthConfig(engine={"name": "ray"}).engine.simulated
    assert DepthConfig(engine={"name": "ray", "options": {"engine": "simulated"}}).engine.simulated
    assert not pool.answering().simulated
    assert not DepthConfig(engine={"name": "ray", "options": {"engine": "hf"}}).engine.simulated
    assert RayOptions(enabled=False, engine="hf").to_build() == HFOptions()


def test_one_answer_identity_for_fingerprints_and_store_keys_with_unchanged_values():
    """The values are those of the dict formula before the options were typed: stores and results stay valid."""
    assert DepthConfig(engine={"name": "simulated"}).engine.answer_identity() == '["simulated", {}]'
    cfg = DepthConfig(engine={"name": "simulated", "options": {"seed": 3, "answers_per_s": 900}})
    assert cfg.engine.answer_identity() == json.dumps(["simulated", {"seed": 3}])
    lab = label(engine={"name": "vllm", "options": {"max_num_seqs": 8, "dtype": "float16"}}, model="/m")
    key = lab.engine.answer_identity(lab.model)
    assert key == json.dumps(["vllm", {"dtype": "float16", "model": "/m"}], sort_keys=True)
    assert key == model_key_for("vllm", {"max_num_seqs": 8, "dtype": "float16", "model": "/m"})
    pooled = DepthConfig(engine={"name": "ray", "options": {"engine": "vllm", "num_actors": 2,
                                                             "engine_options": {"dtype": "float16"}}})
    assert pooled.engine.answer_identity() == model_key_for("vllm", {"dtype": "float16"})
    assert model_key_for(pooled.engine.options) == pooled.engine.answer_identity()
    # typed options given beside a name are taken as they are (never read as a dict of every default)
    assert model_key_for("ray", pooled.engine.options) == model_key_for("vllm", {"dtype": "float16"})


def test_gpu_sharing_is_asked_of_the_options_and_sized_on_a_copy():
    pool = RayOptions.parse({"engine": "vllm", "num_gpus_per_actor": 1})
    assert pool.engines_per_gpu_for() == 2
    fp8 = pool.model_copy(update={"engine_options": VLLMOptions(quantization="fp8")})
    assert fp8.engines_per_gpu_for() == 3
    assert RayOptions.parse({"engine": "hf", "num_gpus_per_actor": 1}).engines_per_gpu_for() == 1
    inner = VLLMOptions(max_num_seqs=256)
    sized, plan = inner.for_shared_gpu(3, 140.0)
    assert sized is not inner and inner.model_fields_set == {"max_num_seqs"}  # the original is untouched
    assert sized.gpu_memory_utilization == plan["gpu_memory_utilization"] < 0.3
    assert sized.llm_kwargs["compilation_config"]["cudagraph_capture_sizes"][-1] == 256
    assert SimulatedOptions().for_shared_gpu(3, 140.0) == (SimulatedOptions(), None)


def test_the_ray_section_is_the_pool_model():
    assert issubclass(RayConfig, RayOptions)
    cfg = label(ray={"address": "auto", "cpu_workers": 2, "startup_timeout_s": 60})
    assert cfg.ray.address == "auto" and cfg.ray.startup_timeout_s == 60
    assert RayOptions.parse({"ray_address": "auto", "spare_cpus": 1}) == RayOptions(address="auto", cpu_workers=1)
    dumped = cfg.model_dump(mode="json")["ray"]
    assert "engine" not in dumped and "engine_options" not in dumped  # the engine: section's, never this one's
    assert dumped["startup_timeout_s"] == 60 and dumped["start_one_by_one"] is None  # like label.yaml, every key
    assert list(label().model_dump(mode="json")["ray"]) == [  # label.yaml's keys, in its order
        "enabled", "address", "num_actors", "num_gpus_per_actor", "num_cpus_per_actor", "engines_per_gpu",
        "max_in_flight_per_actor", "split_min_queries", "cpu_workers", "max_retries", "actor_max_restarts",
        "runtime_env", "startup_timeout_s", "start_one_by_one"]
    with pytest.raises(ConfigError, match="ray.engine: the pool runs the engine of the engine: section"):
        label(ray={"engine": "vllm"})
    for bad, words in (({"engine": "ray"}, "cannot run itself"), ({"engine": "nope"}, "unknown engine 'nope'"),
                       ({"engine": "vllm", "engine_options": {"nosie": 1}}, "engine.options.engine_options.nosie"),
                       ({"engines_per_gpu": 0}, "engines_per_gpu")):
        with pytest.raises(ConfigError, match=words):
            label(engine={"name": "ray", "options": bad})
