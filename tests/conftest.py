"""Shared fixtures for every test folder: tiny random PyTorch BLIP-Diffusion models (the parity reference) built
offline, their conversion and the Flax pipelines; the test run's environment (fake CPU devices, caches); the
markers' skips. Helpers to import are in tests/support/."""

import os
import shutil
import tempfile

# Four fake CPU devices for the multi-device tests; must be set before jax is imported anywhere. LLVM's
# optimisation level 0 compiles the tiny test programs ~25% faster (the suite is mostly compilation); XLA's own
# HLO passes (fusion, layout, buffer assignment) are unchanged, so the programs are the ones users run, and every
# parity tolerance holds as at the default level.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The plain JAX path GPUs and TPUs run: the CPU layer rewrites (models/cpu_rewrites.py, the decoder in strips)
# make the tiny programs' compiles ~1.7x longer for nothing a tiny model needs. The tests of the rewrites build
# their pipelines with `cpu_rewrites=True` (runtime/, and a parity test per mode: `flax_pipeline_cpu_rewrites`);
# `BLIPDIFF_JAX_CPU_REWRITES=1 ./run test` runs every test on them, as CPU users run by default.
os.environ.setdefault("BLIPDIFF_JAX_CPU_REWRITES", "0")
# Conversion and compilation caches of this test run, not the user's. Made once, in the pytest process that
# starts the xdist workers, which inherit it, as do the CLI and notebook subprocesses: the tiny programs recur
# across test files, and each is compiled once per run.
_RUN_CACHE_OWNER = "BLIPDIFF_TEST_RUN_CACHE" not in os.environ  # this process made it, and removes it at the end
if _RUN_CACHE_OWNER:
    os.environ["BLIPDIFF_TEST_RUN_CACHE"] = tempfile.mkdtemp(prefix="blipdiff-jax-cache-")
os.environ["BLIPDIFF_JAX_CACHE"] = os.environ["BLIPDIFF_TEST_RUN_CACHE"]
# Every program goes into that cache, however fast it compiles: most of the suite's ~2000 compiles are small
# ones that each worker and subprocess would otherwise compile again. The variable, not only the config below,
# so that the CLI (run in-process and in subprocesses), which keeps JAX's setting when one is given, keeps it.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["BLIPDIFF_JAX_CACHE"], "jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
# On a GPU, JAX's default fp32 matmuls and convolutions use TF32 (a 10-bit mantissa): errors of ~1e-3 against
# the fp32 references, where the parity tolerances are 1e-5 (seen on an H100). Full fp32 there, as
# on CPU, where this changes nothing.
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")

import pytest
from support.torch_reference import build_torch_pipeline, torch_controlnet

from blipdiff_jax import tiny


def pytest_unconfigure(config):
    if _RUN_CACHE_OWNER and not hasattr(config, "workerinput"):  # the xdist workers share it until the end
        shutil.rmtree(os.environ["BLIPDIFF_TEST_RUN_CACHE"], ignore_errors=True)


# The files that take longest on 2 CPU cores, longest first (whole-suite seconds from ~230 down to ~20).
# `--dist loadfile` hands the files out in this order, then the rest in collection order, so both workers
# end on short files; xdist's own order (most tests first) started the notebooks and the two-process test
# last, leaving one worker idle for a minute.
LONGEST_FILES = (
    "parity/test_editing.py", "training/test_sharding.py", "system/test_new_user.py", "training/test_pretrain.py",
    "training/test_finetune.py", "system/test_notebooks.py", "system/test_cli.py", "runtime/test_vae_decode.py",
    "parity/test_pipeline.py", "conversion/test_convert.py", "evaluation/test_evaluate.py", "parity/test_controlnet.py",
    "system/test_multiprocess.py", "training/test_lora_finetune.py", "parity/test_subject_encoder.py",
    "system/test_multidevice.py", "parity/test_context_clip.py", "runtime/test_attention.py", "parity/test_bf16.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below, not "most tests first"
        config.option.loadscopereorder = False


def _file_rank(item) -> int:
    path = os.path.relpath(str(item.path), os.path.dirname(os.path.abspath(__file__))).replace(os.sep, "/")
    return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run on a GPU backend only, `cpu_only` tests (XLA-CPU programs, the host allocator) on CPU only.
    The longest files first (LONGEST_FILES); each file's tests keep their order."""
    backend = jax.default_backend()
    for item in items:
        if item.get_closest_marker("gpu") and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU (JAX's backend is {backend})"))
        if item.get_closest_marker("cpu_only") and backend != "cpu":
            item.add_marker(pytest.mark.skip(reason=f"checks the CPU backend's programs or the host allocator (backend: {backend})"))
    items.sort(key=_file_rank)  # stable: the other files, and each file's tests, stay in collection order


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"clip": tiny.write_clip_tokenizer(str(root / "clip")), "bert": tiny.write_bert_tokenizer(str(root / "bert"))}


@pytest.fixture(scope="session")
def torch_pipeline(tokenizer_dirs):
    return build_torch_pipeline(tokenizer_dirs)


@pytest.fixture(scope="session")
def torch_pipeline_dir(torch_pipeline, tmp_path_factory):
    """The directory `save_pretrained` writes (safetensors), as users have it on disk."""
    path = tmp_path_factory.mktemp("pt") / "blipdiffusion-tiny"
    torch_pipeline.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def converted_model(torch_pipeline_dir):
    from convert.pytorch_dir import read_pytorch_directory

    return read_pytorch_directory(torch_pipeline_dir)


@pytest.fixture(scope="session")
def flax_pipeline(converted_model):
    from blipdiff_jax import FlaxBlipDiffusionPipeline

    return FlaxBlipDiffusionPipeline.from_converted(converted_model)


@pytest.fixture(scope="session")
def flax_pipeline_cpu_rewrites(converted_model):
    """The pipeline CPU users get by default: the CPU layer rewrites on (the suite runs without them)."""
    from blipdiff_jax import FlaxBlipDiffusionPipeline

    pipeline, params = FlaxBlipDiffusionPipeline.from_converted(converted_model, cpu_rewrites=True)
    assert pipeline.runtime.cpu_rewrites == (jax.default_backend() == "cpu")
    return pipeline, params


@pytest.fixture(scope="session")
def torch_controlnet_pipeline(torch_pipeline):
    from diffusers import BlipDiffusionControlNetPipeline

    p = torch_pipeline
    return BlipDiffusionControlNetPipeline(
        tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, unet=p.unet, scheduler=p.scheduler,
        qformer=p.qformer, controlnet=torch_controlnet(p.unet), image_processor=p.image_processor,
        ctx_begin_pos=2, mean=p.config.mean, std=p.config.std,
    )


@pytest.fixture(scope="session")
def torch_controlnet_pipeline_dir(torch_controlnet_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("pt") / "blipdiffusion-controlnet-tiny"
    torch_controlnet_pipeline.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def flax_controlnet_pipeline(torch_controlnet_pipeline_dir):
    from blipdiff_jax import FlaxBlipDiffusionControlNetPipeline

    return FlaxBlipDiffusionControlNetPipeline.from_pretrained(torch_controlnet_pipeline_dir, from_pt=True)
