"""Checkpoint benchmarks for model_ops.checkpoint.

1. Save / load throughput of a ~1 GB float32 Llama-shaped state dict (load = the values end up in preallocated model
   tensors, as a resume does): `model_ops.checkpoint.save/load` (SHA-256 of every file, xxh3 of every tensor, fsync,
   atomic rename; load verifies sizes, headers and every tensor's xxh3 by default, every file's SHA-256 with
   verify="full") against `torch.save/torch.load` (weights_only=True) and `safetensors.torch.save_file/load_file`.
   Saves are timed durable on both sides (baselines: fsync of the file and of its folder) and without fsync on both
   sides; every ratio is against the faster baseline. `--profile` adds a per-phase breakdown (thread CPU time of
   SHA-256, xxh3, page-cache copy, read; fsync wait; threads of model_ops' save and load).
2. Peak memory of DCP -> HF conversion: `dcp_to_hf` (streaming, shard budget) against `dcp_to_torch_save`,
   each in a fresh subprocess (peak RSS above the process's RSS after imports).
3. `--zero`: DeepSpeed ZeRO-2 rank files (TP=2 x DP=2, fp32 weights + Adam moments, written by `save_zero`) -> universal
   folder with `ds_to_universal`: time, CPU time and peak RSS of a fresh subprocess. The conversion streams one
   parameter at a time, so the peak is compared with the largest parameter's consolidated states (fp32 + 2 moments).

Run under the shared lock:  flock /tmp/bench.lock python bench/ckpt_bench.py [--gb 1.0] [--reps 3] [--shard 100MB]
"""
import os, sys, json, time, shutil, argparse, tempfile, resource, subprocess, statistics
from pathlib import Path
import torch

def model_state(gb:float=1.0, hidden:int=1024, inter:int=2816, vocab:int=32000) -> dict:
    "A Llama-shaped float32 state dict of about `gb` GB (number of layers chosen to fit)."
    per_layer = 4*hidden*hidden + 3*hidden*inter + 2*hidden
    n = max(1, int((gb*1e9/4 - 2*vocab*hidden) // per_layer))
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(n):
        p = f"model.layers.{i}."
        for k in "qkvo": sd[p+f"self_attn.{k}_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        sd[p+"mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g)
        sd[p+"mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g)
        sd[p+"mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g)
        sd[p+"input_layernorm.weight"] = torch.ones(hidden); sd[p+"post_attention_layernorm.weight"] = torch.ones(hidden)
    sd["model.norm.weight"] = torch.ones(hidden)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return sd

def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try: os.fsync(fd)
    finally: os.close(fd)

def _durable(path):
    "fsync the file and its folder (the new name survives a power cut too), as model_ops' save does for its files."
    _fsync(path); _fsync(Path(path).parent)

def _into(dst, sd):
    "Copy loaded tensors into preallocated model tensors (what resuming does), so mmapped loads pay for their reads."
    for k, t in sd.items(): dst[k].copy_(t)

def _rm(p):
    if p.exists(): shutil.rmtree(p) if p.is_dir() else p.unlink()

def _stats(ts, nbytes):
    return {"s": min(ts), "median_s": statistics.median(ts), "all_s": ts, "GB/s": nbytes/1e9/min(ts)}

def bench_throughput(sd:dict, work:Path, reps:int=3) -> dict:
    """Save and load timings, methods interleaved round-robin within each repetition (so drift on a shared machine hits
    all alike); `os.sync()` before every timed save so no method pays for an earlier one's dirty pages."""
    from safetensors.torch import save_file, load_file
    from model_ops.checkpoint import save, load
    nbytes = sum(t.numel()*t.element_size() for t in sd.values())
    def fs(fn):
        def run(p, sync):
            fn(p)
            if sync: _durable(p)
        return run
    savers = {   # name: (function(path), file name)
        "torch.save":                        (fs(lambda p: torch.save(sd, p)), "x.pt", False),
        "torch.save +fsync":                 (fs(lambda p: torch.save(sd, p)), "x.pt", True),
        "safetensors.save_file":             (fs(lambda p: save_file(sd, p)), "x.safetensors", False),
        "safetensors.save_file +fsync":      (fs(lambda p: save_file(sd, p)), "x.safetensors", True),
        "model_ops save (sha256, fsync, atomic)":        (lambda p, _: save(p, model=sd, rng=False), "ck", True),
        "model_ops save durable=False (sha256, atomic)": (lambda p, _: save(p, model=sd, rng=False, durable=False), "ck-nosync", False),
    }
    ts = {k: [] for k in savers}
    for r in range(reps):
        for name, (fn, fname, sync) in savers.items():
            p = work/fname; _rm(p); os.sync()
            t0 = time.perf_counter(); fn(p, sync); ts[name].append(time.perf_counter() - t0)
    res = {"bytes": nbytes, "save": {k: _stats(v, nbytes) for k, v in ts.items()}, "load": {}}
    for k, v in res["save"].items(): print(f"save  {k:48s} best {v['s']:6.3f}s  median {v['median_s']:6.3f}s  {v['GB/s']:5.2f} GB/s", flush=True)
    _rm(work/"ck-nosync"); os.sync()
    dst = {k: torch.empty_like(v) for k, v in sd.items()}
    loaders = {  # each ends with the values in `dst`, the preallocated model tensors (what a resume does)
        "torch.load + copy into model":        lambda: _into(dst, torch.load(work/"x.pt", weights_only=True)),
        "safetensors.load_file + copy into model": lambda: _into(dst, load_file(work/"x.safetensors")),
        "model_ops load (xxh3 verified, in place)": lambda: load(work/"ck", model=dst, rng=False),
        "model_ops load verify='full' (sha256 + xxh3)": lambda: load(work/"ck", model=dst, rng=False, verify="full"),
        "model_ops load verify=False (in place)": lambda: load(work/"ck", model=dst, rng=False, verify=False),
        "model_ops load, no model (mmap, xxh3) + copy": lambda: _into(dst, load(work/"ck", rng=False)["model"]),
    }
    ts = {k: [] for k in loaders}
    for r in range(reps + 1):                      # the first round warms the page cache for every file alike
        for name, fn in loaders.items():
            for v in dst.values(): v.zero_()
            t0 = time.perf_counter(); fn(); t = time.perf_counter() - t0
            if r: ts[name].append(t)
            else: assert all(torch.equal(dst[k], sd[k]) for k in sd), name
    res["load"] = {k: _stats(v, nbytes) for k, v in ts.items()}
    for k, v in res["load"].items(): print(f"load  {k:48s} best {v['s']:6.3f}s  median {v['median_s']:6.3f}s  {v['GB/s']:5.2f} GB/s", flush=True)
    for f in ("x.pt", "x.safetensors", "ck"): _rm(work/f)
    return res

def profile(sd:dict, work:Path, reps:int=3) -> dict:
    """Where the time goes (best of `reps`): thread CPU of each primitive over all the bytes on one core, then model_ops'
    save and load with the CPU and wall time of their threads, against safetensors' CPU and wall time."""
    import hashlib, xxhash, resource, threading
    import model_ops.checkpoint.core as C, model_ops.io.format as W
    from model_ops.checkpoint import load
    from safetensors.torch import save_file, load_file
    bufs = [memoryview(W.tensor_bytes(t)) for t in sd.values()]
    nb, P = sum(len(b) for b in bufs), W._PIECE
    pieces = lambda: (b[i:i+P] for b in bufs for i in range(0, len(b), P))
    f = work/"prof.bin"
    def best(fn, prep=None):       # (thread CPU, wall) of fn, best of reps
        r = []
        for _ in range(reps):
            if prep: prep()
            c0, t0 = time.thread_time(), time.perf_counter(); fn(); r.append((time.thread_time() - c0, time.perf_counter() - t0))
        return min(r)
    def proc(fn, prep=None):       # (process CPU, wall) of fn, best of reps
        r = []
        for _ in range(reps):
            if prep: prep()
            u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(); fn(); u1 = resource.getrusage(resource.RUSAGE_SELF)
            r.append((u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime, time.perf_counter() - t0))
        return min(r, key=lambda x: x[1])
    def sha():
        h = hashlib.sha256()
        for p in pieces(): h.update(p)
    def xxh():
        h = xxhash.xxh3_64()
        for p in pieces(): h.update(p)
    def write(hash_too=False):
        def run():
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); h, x = hashlib.sha256(), xxhash.xxh3_64()
            for p in pieces():
                if hash_too: h.update(p); x.update(p)
                os.write(fd, p)
            os.close(fd)
        return run
    fresh = lambda: (_rm(f), os.sync())
    rows = {"sha256, 1 thread": best(sha), "xxh3, 1 thread": best(xxh),
            "write to page cache, 1 thread": best(write(), fresh),
            "sha256+xxh3+write per piece (a save worker), 1 thread": best(write(True), fresh)}
    def write_fsync():
        fresh(); write()(); t0 = time.perf_counter(); _fsync(f); return time.perf_counter() - t0
    rows["fsync of a freshly written file (disk wait)"] = (0.0, min(write_fsync() for _ in range(reps)))
    # model_ops save, instrumented: each writer thread's CPU and wall, the final wait for the disk, the commit
    rec, real_w, real_close, real_commit = [], W.write_safetensors, W.Flusher.close, C.atomic_dir.commit
    def timed(name, fn, cpu=True):
        def w(*a, **k):
            c0, t0 = time.thread_time(), time.perf_counter()
            try: return fn(*a, **k)
            finally: rec.append((name, time.thread_time() - c0 if cpu else 0.0, time.perf_counter() - t0))
        return w
    W.write_safetensors, W.Flusher.close, C.atomic_dir.commit = timed("writer thread, one file", real_w), timed("wait for flusher (disk)", real_close, False), timed("commit (fsync folder, rename, fsync parent)", real_commit, False)
    try:
        runs = []
        for _ in range(reps):
            _rm(work/"pck"); os.sync(); rec.clear()
            u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(); C.save(work/"pck", model=sd, rng=False)
            t, u1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            runs.append((t, u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime, list(rec)))
    finally: W.write_safetensors, W.Flusher.close, C.atomic_dir.commit = real_w, real_close, real_commit
    t, cpu, rr = min(runs, key=lambda x: x[0])
    rows["model_ops save: whole (process CPU, wall)"] = (cpu, t)
    for name in dict.fromkeys(n for n, _, _ in rr):
        xs = [(c, w) for n, c, w in rr if n == name]
        rows[f"model_ops save: {name} (sum over {len(xs)})"] = (sum(c for c, _ in xs), sum(w for _, w in xs))
    rows["safetensors save_file + fsync file and folder (process CPU, wall)"] = proc(lambda: (save_file(sd, work/"p.st"), _durable(work/"p.st")), lambda: (_rm(work/"p.st"), os.sync()))
    # load: the copy out of the page cache, with and without xxh3, and the whole loads
    dst = {k: torch.empty_like(v) for k, v in sd.items()}
    header, _, start = C.read_header(work/"p.st")
    jobs = [(memoryview(W.tensor_bytes(dst[k])), start + v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"]
    def rd(check):
        def run():
            fd = os.open(work/"p.st", os.O_RDONLY)
            for mv, off in jobs: C._pread_into(fd, off, mv, check)
            os.close(fd)
        return run
    rows["read page cache -> model tensors, 1 thread"] = best(rd(False))
    rows["read page cache -> model tensors + xxh3 per piece, 1 thread"] = best(rd(True))
    rows["safetensors load_file + copy into model (process CPU, wall)"] = proc(lambda: _into(dst, load_file(work/"p.st")))
    rows["model_ops load, default xxh3 check (process CPU, wall)"] = proc(lambda: load(work/"pck", model=dst, rng=False))
    rows["model_ops load, verify=False (process CPU, wall)"] = proc(lambda: load(work/"pck", model=dst, rng=False, verify=False))
    print(f"profile ({nb/1e9:.2f} GB, {W._NCPU} cores; CPU = thread or process CPU seconds):", flush=True)
    for k, (c, w) in rows.items(): print(f"  {k:72s} CPU {c:6.3f}s  wall {w:6.3f}s", flush=True)
    for p in (f, work/"p.st", work/"pck"): _rm(p)
    return {k: {"cpu_s": c, "wall_s": w} for k, (c, w) in rows.items()}

def ratios(res:dict) -> dict:
    "Throughput of ours / throughput of the faster of torch and safetensors (>= 0.9 is the target), for every comparison."
    s, l = res["save"], res["load"]
    best = lambda d, ks: min(d[k]["s"] for k in ks)
    b_sync, b_nosync = best(s, ["torch.save +fsync", "safetensors.save_file +fsync"]), best(s, ["torch.save", "safetensors.save_file"])
    b_load = best(l, ["torch.load + copy into model", "safetensors.load_file + copy into model"])
    ours = lambda d, k: d[k]["s"]
    return {
        "save (fsync both sides)": b_sync / ours(s, "model_ops save (sha256, fsync, atomic)"),
        "save (no fsync either side)": b_nosync / ours(s, "model_ops save durable=False (sha256, atomic)"),
        "save ours with fsync vs theirs without": b_nosync / ours(s, "model_ops save (sha256, fsync, atomic)"),
        "load xxh3-verified (default)": b_load / ours(l, "model_ops load (xxh3 verified, in place)"),
        "load sha256-verified (verify='full')": b_load / ours(l, "model_ops load verify='full' (sha256 + xxh3)"),
        "load unverified": b_load / ours(l, "model_ops load verify=False (in place)"),
        "load no model given (mmap) + copy": b_load / ours(l, "model_ops load, no model (mmap, xxh3) + copy"),
    }

PEAK = r'''
import sys, resource, time, warnings, json, threading
warnings.simplefilter("ignore")
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from model_ops.checkpoint import dcp_to_hf, ds_to_universal
def status_mb(key):
    with open("/proc/self/status") as f:
        for l in f:
            if l.startswith(key): return int(l.split()[1]) / 1024
# VmHWM (this process's own peak RSS); ru_maxrss would inherit the parent's peak across fork+exec
# (it counts file-backed mapped pages too: clean page cache the kernel can drop). RssAnon -- anonymous memory only, what
# the conversion really holds -- has no high-water mark, so a thread samples it every 10 ms.
base, base_anon = status_mb("VmRSS"), status_mb("RssAnon")
anon, done = [base_anon], threading.Event()
def sample():
    while not done.wait(0.01): anon.append(status_mb("RssAnon"))
th = threading.Thread(target=sample, daemon=True); th.start()
which, src, dst, shard = sys.argv[1:5]
t0 = time.time()
if which == "dcp_to_torch_save": dcp_to_torch_save(src, dst)
elif which == "dcp_to_hf": dcp_to_hf(src, dst, max_shard_size=shard)
else: ds_to_universal(src, dst, latest=False)
s = time.time() - t0
done.set(); th.join(); anon.append(status_mb("RssAnon"))
peak, ru = status_mb("VmHWM"), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"base_mb": base, "peak_mb": peak, "above_base_mb": peak - base, "peak_anon_mb": max(anon) - base_anon,
                  "base_anon_mb": base_anon, "s": s, "cpu_s": ru.ru_utime + ru.ru_stime}))
'''

def bench_dcp_memory(sd:dict, work:Path, shard:str="100MB") -> dict:
    import warnings
    import torch.distributed.checkpoint as dcp
    from model_ops.io import parse_size
    src = work/"dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); dcp.save({"model": sd}, checkpoint_id=str(src), no_dist=True)
    script = work/"peak.py"; script.write_text(PEAK)
    largest = max(t.numel()*t.element_size() for t in sd.values())
    res = {"model_mb": sum(t.numel()*t.element_size() for t in sd.values())/1e6, "largest_tensor_mb": largest/1e6,
           "shard_budget_mb": parse_size(shard)/1e6}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for which in ("dcp_to_torch_save", "dcp_to_hf"):
        dst = work/("out.pt" if which == "dcp_to_torch_save" else "hf")
        r = subprocess.run([sys.executable, str(script), which, str(src), str(dst), shard], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        res[which] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"DCP->HF peak  {which:18s} +{res[which]['above_base_mb']:7.0f} MB above import baseline "
              f"({res[which]['s']:.1f}s)", flush=True)
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    res["target_mb"] = res["largest_tensor_mb"] + res["shard_budget_mb"]
    ok = res["dcp_to_hf"]["above_base_mb"] <= res["target_mb"]
    print(f"DCP->HF target: largest tensor {res['largest_tensor_mb']:.0f} MB + one shard {res['shard_budget_mb']:.0f} MB = "
          f"{res['target_mb']:.0f} MB; dcp_to_hf {'meets' if ok else 'MISSES'} it", flush=True)
    return res

def bench_zero(sd:dict, work:Path) -> dict:
    "ds_to_universal of a TP=2 x DP=2 ZeRO-2 folder holding `sd` with Adam moments: seconds and peak RSS (subprocess)."
    from model_ops.checkpoint import TPLayout, save_zero
    lay = TPLayout(replicated=[r"norm\.weight$"], row_parallel=[r"o_proj\.weight$", r"down_proj\.weight$"])
    g = torch.Generator().manual_seed(1)
    u = {"meta": {k: lay.rule(k, v.ndim) for k,v in sd.items()},
         "states": {"param": sd, "exp_avg": {k: torch.randn(v.shape, generator=g) for k,v in sd.items()},
                    "exp_avg_sq": {k: torch.rand(v.shape, generator=g) for k,v in sd.items()}},
         "step": {k: torch.tensor(10.0) for k in sd}, "groups": [list(sd)],
         "info": {"tp_replicated_parameter_patterns": [r".*norm\.weight$"],
                  "parameter_with_row_parallelism_patterns": [r".*o_proj\.weight$", r".*down_proj\.weight$"]}}
    src = save_zero(u, work/"global_step10", tp=2, dp=2, stage=2); del u
    state = sum(f.stat().st_size for f in src.iterdir())
    script = work/"peak.py"; script.write_text(PEAK)
    r = subprocess.run([sys.executable, str(script), "ds_to_universal", str(src), str(work/"global_step10_universal"), "-"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    big = 3 * max(v.numel() * 4 for v in sd.values())                    # the largest parameter's fp32 + exp_avg + exp_avg_sq
    res = {"zero_files_mb": state/1e6, "largest_param_states_mb": big/1e6, **json.loads(r.stdout.strip().splitlines()[-1])}
    print(f"ds_to_universal  {state/1e9:.2f} GB of ZeRO-2 rank files (tp=2 x dp=2): {res['s']:.1f}s wall ({res['cpu_s']:.1f}s CPU incl. imports), peak RSS "
          f"{res['peak_mb']:.0f} MB (+{res['above_base_mb']:.0f} MB above import baseline), peak anonymous memory "
          f"+{res['peak_anon_mb']:.0f} MB above import baseline (largest parameter's states {big/1e6:.0f} MB)", flush=True)
    shutil.rmtree(src); shutil.rmtree(work/"global_step10_universal")
    return res

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shard", default="100MB")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--profile", action="store_true", help="only the per-phase breakdown")
    ap.add_argument("--zero", action="store_true", help="only DeepSpeed ZeRO -> universal conversion time and peak memory")
    a = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        sd = model_state(a.gb)
        print(f"state dict: {len(sd)} tensors, {sum(t.numel()*t.element_size() for t in sd.values())/1e9:.2f} GB float32", flush=True)
        if a.zero:
            res = {"zero_to_universal": bench_zero(sd, work)}
            if a.out: Path(a.out).write_text(json.dumps(res, indent=1))
            sys.exit(0)
        if a.profile:
            res = {"profile": profile(sd, work, a.reps)}
            if a.out: Path(a.out).write_text(json.dumps(res, indent=1))
            sys.exit(0)
        res = {"throughput": bench_throughput(sd, work, a.reps), "dcp_to_hf_memory": bench_dcp_memory(sd, work, a.shard)}
        res["ratios"] = ratios(res["throughput"])
        print("ratio = ours / faster of torch and safetensors (throughput; target >= 0.9):")
        for k, v in res["ratios"].items(): print(f"  {k:42s} {v:5.2f}  {'meets' if v >= 0.9 else 'MISSES'} 0.9x")
        if a.out: Path(a.out).write_text(json.dumps(res, indent=1))
    finally: shutil.rmtree(work, ignore_errors=True)
