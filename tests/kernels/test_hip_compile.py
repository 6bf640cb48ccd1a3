"""The fused kernels compile for AMD GPUs (gfx942, gfx950) without register spills or scratch memory (the RoPE + KV
store kernel's configurations, and the MLA kernel's, ``MLA_CONFIGS``).

Triton wheels compile for AMD targets on any machine, so this runs in CI without an AMD GPU. The
kernel's signature is not written down here: a subprocess (without ``TRITON_INTERPRET``, so that
``@triton.jit`` yields a real ``JITFunction``) runs the real launcher, ``prepare()`` + ``launch()``, on
small CPU tensors with ``JITFunction.run`` patched to record its bound arguments instead of launching.
Each argument becomes an ``ASTSource`` signature entry the way Triton specialises it at launch
(``native_specialize_impl``: pointer dtype, ints by magnitude, ints equal to 1 and ``None`` as
constexprs, 16-divisibility hints), and the launcher's HIP options (``num_warps``, ``waves_per_eu``)
become compile options. Without a GPU ``n_regs``/``n_spills`` stay unset, so the numbers come from the
AMDGCN assembly's metadata.

``python tests/kernels/test_hip_compile.py --table`` prints a markdown table of NumVgprs, NumSgprs,
ScratchSize and Occupancy per configuration and target, with and without the launcher's
``waves_per_eu``, and each compile's wall time. A ``-k`` selection compiles only the selected configurations.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

ARCHS = ("gfx942", "gfx950")


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch of the kernel: the features that change its code, and a token count (the tile size)."""

    is_neox: bool = True
    rot: int | None = None  # None: full rotary
    layout: str = "token"
    fp8: bool = False
    table: str = "packed"  # "packed": [P, R/2] tables with positions; "hf": per-token [T, R]
    return_k: bool = False
    D: int = 128
    T: int = 4096  # large enough for the launcher's largest tiles
    # QK-norm (each head's RMSNorm before the RoPE), its weights (or none), Gemma's weight offset, Qwen3's rounding
    q_norm: bool = False
    k_norm: bool = False
    norm_weight: bool = True
    norm_offset: float = 0.0
    norm_round: bool = False
    q_fp8: bool = False  # q_out in float8_e4m3fn (with a q_scale)
    # the scale read rounded to the bf16 quotient's dtype, as the pass launches eager CUDA's 0-d scale (the quotient
    # is then one multiply by the reciprocal: casts._bf16_quotient)
    q_scale_round: bool = False
    norm_full_width: bool = False  # OLMo 2's norm over all of a token's heads (weights [H * D])
    norm_after_rope: bool = False  # HunYuan / Llama 4: the norm of the rotated head

    @property
    def name(self) -> str:
        parts = ["neox" if self.is_neox else "gptj", f"D{self.D}", f"rot{self.rot}" if self.rot else "full",
                 self.layout, "fp8" if self.fp8 else "bf16", self.table, "k" if self.return_k else "nok",
                 f"T{self.T}"]
        if self.q_norm or self.k_norm:
            parts.append(("q" if self.q_norm else "") + ("k" if self.k_norm else "") + "norm"
                         + ("" if self.norm_weight else "-nowt")
                         + (f"-off{self.norm_offset:g}" if self.norm_offset else "")
                         + ("-round" if self.norm_round else "") + ("-full" if self.norm_full_width else "")
                         + ("-after" if self.norm_after_rope else ""))
        if self.q_fp8:
            parts.append("fp8q" + ("-sround" if self.q_scale_round else ""))
        return "-".join(parts)


# Every value of every feature, the costly ones (fp8, partial rotary, return_k, per-token tables) in
# several combinations, both head dims in each layout, and a small token count (small tiles).
CONFIGS = (
    Config(),
    Config(D=64),
    Config(is_neox=False, D=64, return_k=True),
    Config(is_neox=False, rot=64, fp8=True, return_k=True),
    Config(rot=32, D=64, table="hf"),
    Config(layout="paged", fp8=True),
    Config(layout="paged", is_neox=False, D=64, rot=32, table="hf", return_k=True),
    Config(layout="sequence", table="hf"),
    Config(layout="sequence", is_neox=False, D=64, fp8=True, rot=32),
    Config(layout="sequence", rot=64, return_k=True, table="hf", fp8=True),
    Config(T=1),
    Config(D=64, fp8=True, table="hf", T=1),
    # AMD's 5-D layouts (k [blocks, Hkv, D // x, bs, x]): the 4-D v in bf16 (x = 8), the shuffled v in fp8 (x = 16)
    Config(layout="paged_x", is_neox=False, rot=64, table="hf"),
    Config(layout="paged_x_shuffled", fp8=True, return_k=True),
)

# QK-norm and fp8 q, compiled here and (all of them) for sm_90 in test_cuda_compile: Qwen3 (weights, the normalised
# value rounded to bf16), Gemma 3 (1 + w, no rounding; head dims 128 and 256), the norm with partial rotary (the
# tail features normalised too), without weights, and what a Qwen3 fp8 deployment launches (fp8 q and cache).
QWEN3 = dict(q_norm=True, k_norm=True, norm_round=True)
GEMMA3 = dict(q_norm=True, k_norm=True, norm_offset=1.0)
NORM_CONFIGS = (
    Config(**QWEN3),
    Config(**GEMMA3),
    Config(**GEMMA3, D=256),
    Config(**QWEN3, rot=64),
    Config(**QWEN3, norm_weight=False),
    Config(**QWEN3, fp8=True, q_fp8=True),
    Config(q_norm=True, k_norm=True, norm_full_width=True),  # OLMo 2: fp32 norm times w, rounded once
    Config(q_norm=True, k_norm=True, norm_full_width=True, rot=64, layout="sequence", table="hf"),
    Config(q_fp8=True),
    Config(q_fp8=True, q_scale_round=True),  # vLLM's 0-d scale on CUDA, as the pass launches it
    Config(**QWEN3, fp8=True, q_fp8=True, q_scale_round=True),
    Config(**QWEN3, norm_after_rope=True),  # HunYuan: the norm of the rotated head
    Config(q_norm=True, k_norm=True, norm_weight=False, norm_after_rope=True, rot=64),  # Llama 4's (whole heads)
)


@dataclasses.dataclass(frozen=True)
class MlaConfig:
    """One launch of the MLA kernel (``mla_rope_store``; DeepSeek-V3's L = 512, R = 64 by default): q heads, q_nope's
    width (512: decode with absorbed weights, 128: prefill, 0: none), the cache's layout and dtype ("bf16", "fp8":
    float8_e4m3fn with a k_scale, "uint8": SGLang's pool of fp8 bits written as eager writes it)."""

    Hq: int = 16
    LQ: int = 512
    layout: str = "token"
    cache: str = "bf16"
    is_neox: bool = True
    return_k: bool = False
    T: int = 4096
    L: int = 512
    R: int = 64

    @property
    def name(self) -> str:
        return "-".join(["mla", f"hq{self.Hq}", f"lq{self.LQ}", f"L{self.L}", f"R{self.R}", self.layout, self.cache,
                         "neox" if self.is_neox else "gptj", "k" if self.return_k else "nok", f"T{self.T}"])


MLA_CONFIGS = (
    MlaConfig(),
    MlaConfig(Hq=128, layout="paged"),
    MlaConfig(LQ=128, cache="fp8", return_k=True),
    MlaConfig(Hq=128, layout="paged", cache="fp8", is_neox=False),
    MlaConfig(Hq=128, LQ=0, T=1),
    MlaConfig(Hq=128, cache="uint8", return_k=True),
)

# fp8 q and eager fp8 stores are refused on HIP (``eager_fp8_cast``: eager's cast there is not measured), so the AMD
# targets compile the configurations without them
CONFIGS += tuple(c for c in NORM_CONFIGS if not c.q_fp8)
CONFIGS += tuple(c for c in MLA_CONFIGS if c.cache != "uint8")

# --------------------------------------------------------------------------------------------------
# Subprocess side: record the launch, compile it for each target
# --------------------------------------------------------------------------------------------------


def _make_args(cfg: Config):
    import torch

    from fx_fusion.kernels.rope_kv_cache import prepare

    torch.manual_seed(0)
    Hq, Hkv, rot = 8, 2, cfg.rot or cfg.D
    sequence = cfg.layout == "sequence"
    batch, S = (2, cfg.T // 2 or 1) if sequence else (1, cfg.T)
    n_tok = batch * S
    dt = torch.bfloat16
    if sequence:
        q, k, v = (torch.randn(batch, S, h, cfg.D, dtype=dt) for h in (Hq, Hkv, Hkv))
    else:  # slices of a fused qkv projection, as engines pass them
        qkv = torch.randn(n_tok, (Hq + 2 * Hkv) * cfg.D, dtype=dt)
        q, k, v = qkv.split([Hq * cfg.D, Hkv * cfg.D, Hkv * cfg.D], dim=-1)
    rows = S + 16
    blocks, x = (n_tok + 16 + 15) // 16, 16 if cfg.fp8 else 8  # x: 16 bytes of the cache's elements
    shape = {"token": (n_tok + 16, Hkv, cfg.D), "paged": (blocks, 16, Hkv, cfg.D),
             "sequence": (batch, Hkv, rows, cfg.D), "paged_x": (blocks, Hkv, cfg.D // x, 16, x),
             "paged_x_shuffled": (blocks, Hkv, cfg.D // x, 16, x)}[cfg.layout]
    v_shape = {"paged_x": (blocks, Hkv, cfg.D, 16), "paged_x_shuffled": (blocks, Hkv, 16 // x, cfg.D, x)}.get(
        cfg.layout, shape)
    cache_dt = torch.float8_e4m3fn if cfg.fp8 else dt
    k_cache, v_cache = (torch.zeros(s, dtype=cache_dt) for s in (shape, v_shape))
    slots = torch.arange(S if sequence else n_tok, dtype=torch.int64)
    if cfg.table == "packed":
        cos, sin = torch.randn(4096, rot // 2), torch.randn(4096, rot // 2)
        positions = torch.randint(0, 4096, (batch, S) if sequence else (n_tok,))
    else:
        cos, sin = (torch.randn(batch, S, rot) if sequence else torch.randn(n_tok, rot) for _ in range(2))
        positions = None
    scales = (torch.ones(1), torch.ones(1)) if cfg.fp8 else (None, None)
    q_scale = torch.full((1,), 0.05) if cfg.q_fp8 else None
    weights = (torch.randn(cfg.D * (h if cfg.norm_full_width else 1), dtype=dt) if norm and cfg.norm_weight else None
               for norm, h in ((cfg.q_norm, Hq), (cfg.k_norm, Hkv)))
    norm = dict(q_norm=cfg.q_norm, k_norm=cfg.k_norm, norm_offset=cfg.norm_offset, norm_round=cfg.norm_round,
                norm_full_width=cfg.norm_full_width, norm_after_rope=cfg.norm_after_rope)
    p = prepare(q, k, v, k_cache, v_cache, slots, cos, sin, positions, None, *scales, q_scale, *weights,
                is_neox=cfg.is_neox, rotary_dim=rot, layout=cfg.layout,
                q_fp8_dtype=torch.float8_e4m3fn if cfg.q_fp8 else None, q_scale_round=cfg.q_scale_round, **norm)
    q_out = torch.empty_like(q, dtype=p.q_out_dtype)
    k_out = torch.empty_like(k) if cfg.return_k else None
    return p, q_out, k_out


def _make_mla_args(cfg: MlaConfig):
    """(problem, q_out, k_out or None) of an MLA configuration; the tensors' values are never read (only the launch
    is recorded), so the large ones are left unfilled."""
    import torch

    from fx_fusion.kernels import mla

    torch.manual_seed(0)
    dt = torch.bfloat16
    q = torch.empty(cfg.T, cfg.Hq, cfg.LQ + cfg.R, dtype=dt)
    q_nope, q_pe = q.split([cfg.LQ, cfg.R], dim=-1) if cfg.LQ else (None, q)
    kv_c, k_pe = torch.empty(cfg.T, cfg.L + cfg.R, dtype=dt).split([cfg.L, cfg.R], dim=-1)  # kv_a_proj's split
    n_slots = cfg.T + 16
    rows = (n_slots,) if cfg.layout == "token" else ((n_slots + 15) // 16, 16)
    cache_dt = {"bf16": dt, "fp8": torch.float8_e4m3fn, "uint8": torch.uint8}[cfg.cache]
    kv_cache = torch.zeros((*rows, 1, cfg.L + cfg.R), dtype=cache_dt)
    cos, sin = torch.randn(4096, cfg.R // 2), torch.randn(4096, cfg.R // 2)
    positions = torch.randint(0, 4096, (cfg.T,))
    k_scale = torch.ones(1) if cfg.cache != "bf16" else None
    eager = dict(fp8_dtype=torch.float8_e4m3fn, quant_dtype=dt) if cfg.cache == "uint8" else {}
    p = mla.prepare_mla(q_pe, q_nope, k_pe, kv_c, kv_cache, torch.arange(cfg.T), cos, sin, positions, k_scale,
                        is_neox=cfg.is_neox, layout=cfg.layout, return_k=cfg.return_k, **eager)
    q_out, k_out = mla.outputs(p)
    return p, q_out, (k_out if cfg.return_k else None)


def launcher(cfg):
    """A function that launches ``cfg``'s kernel once (the fused RoPE + KV store's, or the MLA kernel's)."""
    if isinstance(cfg, MlaConfig):
        from fx_fusion.kernels import mla

        p, q_out, k_out = _make_mla_args(cfg)
        return lambda: mla.launch(p, q_out, k_out)
    from fx_fusion.kernels import rope_kv_cache as rkc

    p, q_out, k_out = _make_args(cfg)
    return lambda: rkc.launch(p, q_out, k_out)


def record_launch(launch):
    """(kernel, bound arguments by name, launch options) of the one @triton.jit launch ``launch()`` makes, with
    ``JITFunction.run`` patched to record it instead of launching."""
    import triton.runtime.jit as jit

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        options = {n: kwargs.pop(n) for n in list(kwargs) if n not in self.arg_names}
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        launches.append((self, dict(bound.arguments), options))

    saved = jit.JITFunction.run
    jit.JITFunction.run = record
    try:
        launch()
    finally:
        jit.JITFunction.run = saved
    if len(launches) != 1:
        raise RuntimeError(f"expected the launcher to launch one @triton.jit kernel, saw {len(launches)}")
    return launches[0]


def _record_launch(cfg: Config):
    """``record_launch`` of the launcher's one kernel launch for ``cfg``, as on HIP."""
    import torch

    launch = launcher(cfg)
    saved = torch.version.hip
    # the launcher picks HIP options for HIP builds of torch and GPU tensors: pretend both
    torch.version.hip = "6.0"
    torch.Tensor.is_cuda = property(lambda self: True)
    try:
        return record_launch(launch)
    finally:
        torch.version.hip = saved
        del torch.Tensor.is_cuda  # back to torch._C.TensorBase's


def _specialise(fn, arguments: dict):
    """ASTSource (signature, constexprs, attrs) for these arguments, specialised as a launch would be."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    dont = set(getattr(fn, "do_not_specialize", ()))
    for i, param in enumerate(fn.params):
        value = arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, i not in dont and param.name not in dont, True)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif key and (parsed := BaseBackend.parse_attr(key)):
            attrs[(i,)] = parsed
    return signature, constexprs, attrs


def _amdgcn_stats(asm: str) -> dict:
    def field(pattern: str) -> int:
        m = re.search(pattern, asm)
        if m is None:
            raise RuntimeError(f"no {pattern!r} in the AMDGCN assembly")
        return int(m.group(1))

    return dict(vgprs=field(r";\s*NumVgprs:\s*(\d+)"), sgprs=field(r";\s*(?:Total)?NumSgprs:\s*(\d+)"),
                scratch=field(r";\s*ScratchSize:\s*(\d+)"), occupancy=field(r";\s*Occupancy:\s*(\d+)"),
                vgpr_spills=field(r"\.vgpr_spill_count:\s*(\d+)"), sgpr_spills=field(r"\.sgpr_spill_count:\s*(\d+)"))


def _compile_all(names=None) -> dict:
    """{(config name, arch, with waves_per_eu): stats, "options": {config name: HIP launch options}}, for the
    configurations named in ``names`` (None: all). The stats hold the compile's wall time ("seconds")."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out: dict = {"options": {}}
    for cfg in (c for c in CONFIGS if names is None or c.name in names):
        fn, arguments, options = _record_launch(cfg)
        signature, constexprs, attrs = _specialise(fn, arguments)
        out["options"][cfg.name] = options
        variants = [True, False] if "waves_per_eu" in options else [True]
        for arch in ARCHS:
            for with_waves in variants:
                opts = {n: v for n, v in options.items() if with_waves or n != "waves_per_eu"}
                src = ASTSource(fn, signature, constexprs, attrs)
                start = time.perf_counter()
                compiled = triton.compile(src, target=GPUTarget("hip", arch, 64), options=opts)
                seconds = time.perf_counter() - start
                out[(cfg.name, arch, with_waves)] = _amdgcn_stats(compiled.asm["amdgcn"]) | dict(seconds=seconds)
    return out


def unavailable_reason(backend: str) -> str | None:
    """Why this Triton cannot compile ahead of time for ``backend`` ("amd", "nvidia"), or None."""
    try:
        import triton
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"Triton cannot compile ahead of time here: {e}"
    if backend not in backends:
        return f"this Triton {triton.__version__} has no {backend} backend"
    return None


# --------------------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------------------


def selected_configs(request) -> list[str] | None:
    """Names of the configurations (the ``cfg`` parameter) of the session's tests in the requesting module, so that
    a ``-k`` selection compiles only its own; None (all) where none is selected."""
    params = (getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items
              if getattr(item, "module", None) is request.module)
    return sorted({p["cfg"].name for p in params if "cfg" in p}) or None


def _run_subprocess(tmp: Path, names: list[str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    root = Path(__file__).resolve().parents[2]
    out = tmp / "stats.pkl"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--pickle", str(out), *(names or ())],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling for HIP failed:\n{proc.stdout}\n{proc.stderr}")
    return pickle.loads(out.read_bytes())


@pytest.fixture(scope="module")
def stats(tmp_path_factory, request) -> dict:
    reason = unavailable_reason("amd")
    if reason:
        pytest.skip(reason)
    return _run_subprocess(tmp_path_factory.mktemp("hip"), selected_configs(request))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_no_spills_no_scratch(stats, cfg, arch):
    s = stats[(cfg.name, arch, True)]
    print(f"{cfg.name} {arch}: {s}")
    assert s["vgpr_spills"] == 0 and s["sgpr_spills"] == 0, s
    assert s["scratch"] == 0, s
    assert s["occupancy"] >= 1 and s["vgprs"] > 0, s


def test_launcher_options_reach_the_compiler(stats):
    """The recorded HIP options are the ones the launcher passes (num_warps at least)."""
    for name, options in stats["options"].items():
        assert "num_warps" in options, (name, options)


def markdown_table(stats: dict) -> str:
    lines = ["| config | arch | launch options | NumVgprs | NumSgprs | ScratchSize | Occupancy | spills (v/s) "
             "| without waves_per_eu: NumVgprs / Occupancy | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cfg in CONFIGS:
        options = stats["options"][cfg.name]
        for arch in ARCHS:
            s = stats[(cfg.name, arch, True)]
            plain = stats.get((cfg.name, arch, False))
            other = f"{plain['vgprs']} / {plain['occupancy']}" if plain else "(not set)"
            opts = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
            lines.append(f"| {cfg.name} | {arch} | {opts} | {s['vgprs']} | {s['sgprs']} | {s['scratch']} | "
                         f"{s['occupancy']} | {s['vgpr_spills']}/{s['sgpr_spills']} | {other} | {s['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "TRITON_INTERPRET" in os.environ:
        sys.exit("run without TRITON_INTERPRET: the kernel must be a JITFunction")
    if len(sys.argv) >= 3 and sys.argv[1] == "--pickle":  # then the configurations' names, or none: all
        Path(sys.argv[2]).write_bytes(pickle.dumps(_compile_all(sys.argv[3:] or None)))
    elif sys.argv[1:] == ["--table"]:
        reason = unavailable_reason("amd")
        if reason:
            sys.exit(reason)
        print(markdown_table(_compile_all()))
    else:
        sys.exit(f"usage: {sys.argv[0]} --table")
