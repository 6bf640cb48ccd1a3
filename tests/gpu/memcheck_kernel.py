"""Drive the fused RoPE + KV-cache store kernel over its feature grid, one synchronised launch per case.

Made to run under NVIDIA compute-sanitizer (memcheck, racecheck; see README.md next to this file): every
input is its own allocation of exactly its size, every launch is followed by a device synchronisation,
and the case is printed before it runs, so a report or a crash names the case. Each case is also
checked against the float64 reference (``fx_fusion.kernels.rope_kv_cache.reference``):

* q_out (and k_out), filled with NaN before the launch, within the output dtype's tolerance;
* both caches whole, written rows within the cache dtype's tolerance, every other element unchanged
  (caches start as NaN, or random bytes for fp8, so a stray or a missing write shows up).

Grid: layouts token / paged / sequence x NeoX / GPT-J x head_dim 64 / 80 / 128 x (Hq, Hkv) 7/1 and 64/8 x
T in {1, 3, 333, 1000}. Every case also draws (deterministically) a mix of: partial rotary, model dtype,
fp8 caches with scales, a sliding-window table with negative entries, negative and out-of-range slots,
negative_wraps, return_k, per-token cos/sin instead of position-indexed tables, 2-D slices of one fused
qkv projection instead of separate tensors, one fused k/v cache buffer, and the custom op
(``fx_fusion.kernels.rope_kv_store``) instead of ``prepare`` + ``launch``. A coverage table is printed at the end.

    python tests/gpu/memcheck_kernel.py                   # the full grid (CUDA)
    python tests/gpu/memcheck_kernel.py --only paged      # cases whose description contains "paged"
    python tests/gpu/memcheck_kernel.py --smoke           # a small subset; runs on CPU (Triton interpreter)

Exit status 0 when every case matches ("memcheck grid: N cases ok"), 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import random
import sys
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

from fx_fusion.kernels import rope_kv_store  # noqa: E402
from fx_fusion.kernels.rope_kv_cache import FP8_DTYPES, launch, prepare, reference  # noqa: E402

BLOCK_SIZE = 16  # paged layout
N_POSITIONS = 4096  # rows of the position-indexed rotary tables
# (atol, rtol): the kernel rounds an fp32 result once, the reference a float64 one (one ulp apart at most)
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float8_e4m3fn: (2.0**-8, 0.13),  # 3 mantissa bits
    torch.float8_e5m2: (2.0**-15, 0.26),  # 2 mantissa bits
}
FEATURES = ("partial", "fp8", "swa", "neg_slots", "wraps", "return_k", "per_token", "fused_qkv", "fused_kv", "op")


@dataclasses.dataclass(frozen=True)
class Case:
    layout: str
    neox: bool
    head_dim: int
    heads: tuple[int, int]
    tokens: int
    dtype: torch.dtype
    features: frozenset[str]

    @property
    def rotary_dim(self) -> int:
        return self.head_dim // 2 if "partial" in self.features else self.head_dim

    def batch_seq(self) -> tuple[int, int]:
        """(B, S) of the sequence layout: decode-like batches for small T, a few long sequences for large T."""
        if self.layout != "sequence":
            return 1, self.tokens
        return {1: (1, 1), 3: (3, 1), 333: (3, 111), 1000: (2, 500)}.get(self.tokens, (1, self.tokens))

    def describe(self) -> str:
        b, s = self.batch_seq()
        shape = f"T={self.tokens}" + (f" (B={b} S={s})" if self.layout == "sequence" else "")
        return (f"{self.layout:8s} {'neox' if self.neox else 'gptj'} D={self.head_dim} rot={self.rotary_dim} "
                f"H={self.heads[0]}/{self.heads[1]} {shape} {str(self.dtype).replace('torch.', '')} "
                f"[{' '.join(f for f in FEATURES if f in self.features)}]")


def grid(smoke: bool) -> list[Case]:
    layouts = ("token", "paged", "sequence")
    styles = (True, False)
    head_dims = (64, 80) if smoke else (64, 80, 128)
    heads = ((7, 1), (4, 2)) if smoke else ((7, 1), (64, 8))
    tokens = (1, 3, 33) if smoke else (1, 3, 333, 1000)
    cases = []
    for i, (layout, neox, d, h, t) in enumerate(itertools.product(layouts, styles, head_dims, heads, tokens)):
        rng = random.Random(i)
        features = {f for f in FEATURES if rng.random() < 0.45}
        if "wraps" in features:
            features.add("neg_slots")  # wrapping only matters with negative entries
        dtype = rng.choice((torch.bfloat16, torch.bfloat16, torch.float16, torch.float32))
        cases.append(Case(layout, neox, d, h, t, dtype, frozenset(features)))
    if smoke:  # a third of the smoke grid, spread over every axis
        keep = sorted(random.Random(0).sample(range(len(cases)), k=len(cases) // 3))
        cases = [cases[i] for i in keep]
    return cases


# --------------------------------------------------------------------------------------------------
# Building one case
# --------------------------------------------------------------------------------------------------


def poison(t: torch.Tensor, gen: torch.Generator) -> None:
    """NaN for float tensors, random bytes (NaN encodings included) for fp8."""
    if t.dtype in FP8_DTYPES:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=gen).to(t.device))
    else:
        t.fill_(float("nan"))


def unique_slots(n: int, n_slots: int, case: Case, gen: torch.Generator) -> torch.Tensor:
    """``n`` distinct slots in [0, n_slots); with ``neg_slots`` some skipped (negative or too large), and with
    ``wraps`` some spelled as their negative alias (``slot - n_slots``), which must land on the same row."""
    slots = torch.randperm(n_slots, generator=gen)[:n]
    if "neg_slots" in case.features and n > 1:
        pick = torch.randperm(n, generator=gen)[: max(1, n // 4)]
        half = pick[: len(pick) // 2 + 1]
        if "wraps" in case.features:
            slots[half] -= n_slots  # aliases: still distinct rows after wrapping
            slots[pick[len(half):]] = n_slots + torch.arange(len(pick) - len(half))  # out of range: skipped
        else:
            slots[half] = -1 - torch.arange(len(half))  # negative: skipped
            slots[pick[len(half):]] = n_slots + 3  # out of range: skipped
    return slots


def build(case: Case, device: str, seed: int) -> dict:
    """Arguments of ``prepare`` (and of the custom op) for one case, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = case.heads
    d, rot = case.head_dim, case.rotary_dim
    batch, seq = case.batch_seq()
    sequence = case.layout == "sequence"
    dt = case.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dt).to(device)

    lead = (batch, seq) if sequence else (seq,)
    if "fused_qkv" in case.features:  # slices of one projection: 2-D [T, H*D] (flat) or views of [B, S, *]
        qkv = randn(*lead, (hq + 2 * hkv) * d)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        if sequence:
            q, k, v = (x.unflatten(-1, (x.shape[-1] // d, d)) for x in (q, k, v))
    else:
        q, k, v = randn(*lead, hq, d), randn(*lead, hkv, d), randn(*lead, hkv, d)

    # the caches: rows a slot addresses, plus some that no slot does
    n_rows = seq + 37 if sequence else case.tokens + 77
    if case.layout == "paged":
        n_rows = BLOCK_SIZE * math.ceil(n_rows / BLOCK_SIZE)
    shape = {"token": (n_rows, hkv, d), "paged": (n_rows // BLOCK_SIZE, BLOCK_SIZE, hkv, d),
             "sequence": (batch, hkv, n_rows, d)}[case.layout]
    cache_dtype = dt
    scales = (None, None)
    if "fp8" in case.features:
        cache_dtype = torch.float8_e4m3fn if case.head_dim != 80 else torch.float8_e5m2
        scales = (torch.tensor([0.5], device=device), torch.tensor([1.5], device=device))
    if "fused_kv" in case.features:  # one allocation, k and v interleaved along a size-2 axis
        both = torch.empty((*shape[:-2], 2, *shape[-2:]), dtype=cache_dtype, device=device)
        k_cache, v_cache = both.unbind(-3)
    else:
        both = None
        k_cache = torch.empty(shape, dtype=cache_dtype, device=device)
        v_cache = torch.empty(shape, dtype=cache_dtype, device=device)
    for c in ((both,) if both is not None else (k_cache, v_cache)):
        poison(c, gen)

    n_slot_entries = seq if sequence else case.tokens
    swa_table = None
    if "swa" in case.features:
        n_swa = n_slot_entries + 29  # <= n_rows: the table's entries are distinct cache rows
        table = torch.randperm(n_rows, generator=gen)[:n_swa]
        dead = torch.randperm(n_swa, generator=gen)[: max(1, n_swa // 6)]
        # negative entries: skipped, or with negative_wraps aliases of their row (distinct rows either way)
        table[dead] = (table[dead] - n_rows) if "wraps" in case.features else -1
        swa_table = table.to(device)
        slot_mapping = unique_slots(n_slot_entries, n_swa, case, gen)
    else:
        slot_mapping = unique_slots(n_slot_entries, n_rows, case, gen)
    slot_mapping = slot_mapping.to(torch.int32 if seed % 2 else torch.int64).to(device)

    # rotary tables: indexed by positions, or one row per token
    half = rot // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    if "per_token" in case.features:
        pos = torch.randint(0, N_POSITIONS, lead, generator=gen)
        ang = pos.double()[..., None] * inv_freq
        per_pair = seed % 3 == 0  # one value per pair [.., rot/2], else per feature [.., rot] as HF builds it
        if not per_pair:
            ang = torch.cat((ang, ang), -1) if case.neox else ang.repeat_interleave(2, -1)
        cos, sin = ang.cos().to(dt).to(device), ang.sin().to(dt).to(device)
        if sequence and seed % 2:
            cos, sin = cos[:1].contiguous(), sin[:1].contiguous()  # [1, S, R] shared by the batch
        positions = None
        cos_sin_cache = None
    else:
        ang = torch.arange(N_POSITIONS, dtype=torch.float64)[:, None] * inv_freq
        cos_sin_cache = torch.cat((ang.cos(), ang.sin()), -1).to(torch.float32 if seed % 2 else dt).to(device)
        cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
        pos_shape = lead if not (sequence and seed % 2) else (seq,)
        positions = torch.randint(0, N_POSITIONS, pos_shape, generator=gen)
        if "neg_slots" in case.features and positions.numel() > 1:
            positions.view(-1)[0] = -3  # clamped to row 0, or row N - 3 with negative_wraps
        positions = positions.to(device)
    del ang
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping, cos=cos, sin=sin,
                positions=positions, swa_table=swa_table, k_scale=scales[0], v_scale=scales[1],
                cos_sin_cache=cos_sin_cache, fused_kv_buffer=both)


# --------------------------------------------------------------------------------------------------
# Running and checking one case
# --------------------------------------------------------------------------------------------------


def run_case(case: Case, device: str, seed: int) -> str | None:
    """Run the kernel and the reference; return None when they agree, else what differs."""
    a = build(case, device, seed)
    return_k = "return_k" in case.features
    wraps = "wraps" in case.features
    kw = dict(is_neox=case.neox, rotary_dim=case.rotary_dim, layout=case.layout, negative_wraps=wraps)
    args = (a["q"], a["k"], a["v"])
    ref_kc, ref_vc = a["k_cache"].clone(), a["v_cache"].clone()
    p_ref = prepare(*args, ref_kc, ref_vc, a["slot_mapping"], a["cos"], a["sin"], a["positions"], a["swa_table"],
                    a["k_scale"], a["v_scale"], **kw)
    q_ref, k_ref = reference(p_ref, return_k, compute_dtype=torch.float64)

    if "op" in case.features:
        tables = (dict(cos_sin_cache=a["cos_sin_cache"], positions=a["positions"]) if a["positions"] is not None
                  else dict(cos=a["cos"], sin=a["sin"]))
        q_out, k_out = rope_kv_store(*args, a["k_cache"], a["v_cache"], a["slot_mapping"], **tables,
                                     k_scale=a["k_scale"], v_scale=a["v_scale"], swa_table=a["swa_table"],
                                     return_k=return_k, **kw)
    else:
        p = prepare(*args, a["k_cache"], a["v_cache"], a["slot_mapping"], a["cos"], a["sin"], a["positions"],
                    a["swa_table"], a["k_scale"], a["v_scale"], **kw)
        q_out = torch.full(p.q_shape, float("nan"), dtype=case.dtype, device=device)
        k_out = torch.full(p.k_shape, float("nan"), dtype=case.dtype, device=device) if return_k else None
        launch(p, q_out, k_out)
    if device == "cuda":
        torch.cuda.synchronize()

    problems = [compare("q_out", q_out, q_ref), compare("k_cache", a["k_cache"], ref_kc),
                compare("v_cache", a["v_cache"], ref_vc)]
    if return_k:
        problems.append(compare("k_out", k_out, k_ref))
    problems = [p for p in problems if p]
    return "; ".join(problems) or None


def compare(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when equal within the dtype's tolerance (identical bytes always pass: untouched poison)."""
    if got is None or want is None:
        return f"{name}: missing"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{name}: {tuple(got.shape)} {got.dtype} vs reference {tuple(want.shape)} {want.dtype}"
    same_bytes = _bytes(got) == _bytes(want)
    if got.dtype not in FP8_DTYPES:  # NaN poison: a NaN on one side only is a missed or stray write
        same_bytes |= got.isnan() & want.isnan()
    if bool(same_bytes.all()):
        return None
    atol, rtol = TOL[got.dtype]
    g, w = got.double(), want.double()
    ok = same_bytes | ((g - w).abs() <= atol + rtol * w.abs())
    if bool(ok.all()):
        return None
    bad = (~ok).nonzero()
    first = tuple(bad[0].tolist())
    return (f"{name}: {len(bad)} of {got.numel()} elements differ, first at {first}: "
            f"{g[first].item():.6g} vs {w[first].item():.6g}")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Element bits as integers, for exact comparison (NaN payloads included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


def exact_fp8_casts_in_interpreter() -> None:
    """On CPU: cast fp32 -> fp8 in the Triton interpreter through torch (round to nearest even, as the
    hardware does). Some interpreter versions drop the carry when rounding up to the next power of two,
    which is an emulation bug, not the kernel's."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_convert_float", None)
    if original is None:
        return
    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}

    def convert(x, src, dst, rounding):
        if src == tl.float32 and dst in fp8:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(fp8[dst])
            return t.view(torch.uint8).numpy().reshape(x.shape)
        return original(x, src, dst, rounding)

    interpreter._convert_float = convert


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--smoke", action="store_true", help="a small subset (head_dim 64/80, T <= 33), CPU ok")
    ap.add_argument("--only", default="", help="run the cases whose description contains this text")
    ap.add_argument("--max-cases", type=int, default=None, help="stop after this many cases")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        exact_fp8_casts_in_interpreter()
    cases = [c for c in grid(args.smoke) if args.only in c.describe()][: args.max_cases]
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter"
    print(f"memcheck grid: {len(cases)} cases on {where}; torch {torch.__version__}", flush=True)
    failures = []
    coverage = Counter()
    for i, case in enumerate(cases):
        desc = case.describe()
        print(f"[{i + 1:3d}/{len(cases)}] {desc} ...", end=" ", flush=True)
        problem = run_case(case, device, seed=i)
        print("ok" if problem is None else f"MISMATCH: {problem}", flush=True)
        if problem is not None:
            failures.append(desc)
        for f in case.features:
            coverage[(f, case.layout)] += 1
    print("\ncoverage (cases per feature and layout):")
    print("| feature | token | paged | sequence |\n|---|---|---|---|")
    for f in FEATURES:
        print(f"| {f} | " + " | ".join(str(coverage[(f, lay)]) for lay in ("token", "paged", "sequence")) + " |")
    if failures:
        print(f"\nmemcheck grid: {len(failures)} of {len(cases)} cases MISMATCH:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nmemcheck grid: {len(cases)} cases ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
