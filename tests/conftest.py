import json
import os

# Set before JAX starts: bf16 rounding after every op as `import ring_jax` asks for (whichever test
# module imports JAX first), and, on machines without an NVIDIA GPU (CI's CPU machines), no LLVM
# optimisation of the compiled programs: the suite compiles hundreds of programs and runs each
# briefly, and it runs about 20% faster so. Results may differ in the last bit from default-flag
# runs (LLVM forms fewer FMAs), which no test relies on: tests compare with tolerances, or two
# programs compiled alike. GPU hosts keep XLA's defaults, under which the GPU tests were run. The
# command lines the tests start inherit these flags.
FLAGS = ["--xla_allow_excess_precision=false"]
if not os.path.exists("/dev/nvidiactl"):
    FLAGS.append("--xla_backend_optimization_level=0")
for flag in FLAGS:
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

# One OpenMP thread (PyTorch, for the tests' float64 reference, and numpy's BLAS) unless told
# otherwise: their operands are tiny, and with the suite's two workers on two cores a second
# thread mostly waits for a core that the other worker holds (a reference forward then takes
# seconds instead of milliseconds). Set before either library loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The command lines and `import ring_jax` keep compiled steps in ~/.cache unless told otherwise:
# not from the tests (tests/test_cli_notebook.py points the command lines at a folder of its own).
os.environ["RING_JAX_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)
# Eight CPU devices for the sharding tests (unsharded tests use device 0; on a GPU host this only
# concerns the host platform), in this process only: the command lines the tests start run on one
# device, as on a user's machine, rather than splitting a tiny model over eight fake ones on two
# cores. (The multi-process job test gives its processes devices of their own.)
CPU_DEVICES = 8
jax.config.update("jax_num_cpu_devices", CPU_DEVICES)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def load_config_dict(name: str) -> dict:
    with open(os.path.join(CONFIGS, name)) as f:
        return json.load(f)


@pytest.fixture
def tiny_dict() -> dict:
    return load_config_dict("tiny.json")


@pytest.fixture(params=["values", "pairs"])
def reads(request, monkeypatch):
    """How the matvec kernel reads FP8 stacks: as their values, or as uint16 pairs of them, as it
    reads a stack of 2-4 GiB (`pallas_kernels.backend.triton_offsets_overflow`), here on small
    ones. The jit caches are cleared around the pairs, so that no kernel traced one way serves the
    other."""
    from pallas_kernels.matvec import gpu

    if request.param == "pairs":
        monkeypatch.setattr(gpu, "triton_offsets_overflow", lambda a: True)
        jax.clear_caches()
    yield request.param
    if request.param == "pairs":
        jax.clear_caches()


def tiny_model_folder(work) -> str:
    """The tiny random model with a small tokenizer, written in the HF layout to work/hf and
    converted to work/jax (float32). Returns the converted folder."""
    from ring_jax.io.conversion import convert_hf_to_jax
    from ring_jax.io.random_checkpoint import write_random_hf_checkpoint, write_small_tokenizer

    config = load_config_dict("tiny.json")
    write_random_hf_checkpoint(os.path.join(work, "hf"), config, dtype="float32")
    write_small_tokenizer(os.path.join(work, "hf"), config["vocab_size"])
    convert_hf_to_jax(os.path.join(work, "hf"), os.path.join(work, "jax"), progress=False)
    return os.path.join(work, "jax")


def rel_err(got, want) -> float:
    """max |got - want| / max |want|: relative to the tensor's scale, not elementwise."""
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def scan_depth(jaxpr) -> int:
    """How deep scans nest in a jaxpr (0: none), looking into every sub-jaxpr."""
    depth = 0
    for eqn in jaxpr.eqns:
        subs = [getattr(p, "jaxpr", p) for p in eqn.params.values() if hasattr(p, "eqns") or hasattr(p, "jaxpr")]
        inner = max((scan_depth(s) for s in subs), default=0)
        depth = max(depth, inner + (eqn.primitive.name == "scan"))
    return depth


def attention64(q, keys, values, cursor, start):
    """float64 truth: query t of sequence b reads slots [start[b], cursor + t] (only its own slot
    when it is padding). q: [B, T, H, D]; keys, values: [B, L, Hkv, D] -> [B, T, H, D]."""
    import numpy as np

    q, keys, values = (np.asarray(x, np.float64) for x in (q, keys, values))
    B, T, H, D = q.shape
    G = H // keys.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            slot = cursor + t
            lo = slot if slot < start[b] else start[b]
            k, v = keys[b, lo:slot + 1], values[b, lo:slot + 1]            # [n, Hkv, D]
            for h in range(H):
                s = k[:, h // G] @ q[b, t, h] / np.sqrt(D)
                p = np.exp(s - s.max())
                out[b, t, h] = p @ v[:, h // G] / p.sum()
    return out


# The slowest modules first (by their test time in a 2-core run), then the rest in file order:
# `pytest -n 2 --dist loadfile` hands whole modules to the two workers, and a long module left for
# the end runs alone on one core.
SLOW_MODULES = ("test_sharding.py", "test_train.py", "test_linear_attention_tpu.py", "test_generate.py", "test_parity.py",
                "test_fp8.py", "test_convert.py", "test_cli_notebook.py", "test_job.py", "test_router.py", "test_gmm_tpu.py",
                "test_matvec.py", "test_user_errors.py", "test_compile.py", "test_damaged_checkpoints.py",
                "test_gradients.py", "test_kernel_gradients.py", "test_eval.py", "test_gmm_gpu.py")


def pytest_configure(config):
    # xdist: hand out modules in collection order, not the most tests first (this overrides
    # --loadscope-reorder).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))   # stable: module order kept
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def recurrence64(q, k, v, g, state=None, scale=None):
    """Lightning attention in float64 numpy, token by token: S = exp(g) S + k^T v; o = scale q S.

    q, k: [B, T, H, D]; v: [B, T, H, Dv]; g: [H]; state: [B, H, D, Dv] or None.
    """
    import numpy as np

    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    S = np.zeros((B, H, D, v.shape[-1])) if state is None else np.array(state, np.float64)
    decay = np.exp(np.asarray(g, np.float64))[None, :, None, None]
    o = np.zeros(v.shape)
    for t in range(T):
        S = decay * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhd,bhde->bhe", q[:, t], S)
    return o, S


def as_if_on_hopper(monkeypatch, record=None) -> list:
    """"auto" answers as on a Hopper GPU (`pallas_kernels.backend.platform`), with the Pallas
    Triton kernels run in interpret mode, and the rest as on this CPU: the Mosaic GPU kernels
    refuse their operands (the linear-attention one has no interpret mode; the grouped matmul's is
    seconds a call, tested on its own in tests/test_gmm_gpu.py) and cuDNN's flash attention is
    absent (the jnp attention runs). The decode loop keeps its scans (`backends.decode_unrolled`):
    unrolled, every layer's interpret-mode kernels would compile apart (tests/test_compile.py tests
    the unrolling). record: {kernel function name: label}: each call of those kernels appends
    label(*args, **kwargs) to the list returned."""
    from pallas_kernels import backend
    from pallas_kernels.linear_attention import api as linear_attention_api, decode_gpu as linear_decode
    from pallas_kernels.matvec import gpu as matvec_gpu
    from pallas_kernels.moe import gather_gpu, gmm_gpu, quantize_gpu
    from pallas_kernels.router import gpu as router_gpu
    from pallas_kernels.softmax_attention import decode_gpu as softmax_decode
    from ring_jax import backends

    monkeypatch.setattr(backend, "platform", lambda: "hopper")
    monkeypatch.setattr(gmm_gpu, "supports", lambda *a, **k: False)
    monkeypatch.setattr(linear_attention_api, "GPU_MIN_JAX", (1 << 30, 0))
    monkeypatch.setattr(backends, "cudnn_attention", lambda: None)
    monkeypatch.setattr(backends, "decode_unrolled", lambda batch: False)
    calls = []
    for module, name in ((matvec_gpu, "matvec"), (router_gpu, "select_experts"), (linear_decode, "decode_step"),
                         (softmax_decode, "decode_attention"), (gather_gpu, "take_rows"),
                         (quantize_gpu, "quantize_rows")):
        def interpreted(*args, _kernel=getattr(module, name), _label=(record or {}).get(name), **kwargs):
            if _label is not None:
                calls.append(_label(*args, **kwargs))
            return _kernel(*args, **{**kwargs, "interpret": True})
        monkeypatch.setattr(module, name, interpreted)
    jax.clear_caches()
    return calls
