"""Checkpoint benchmarks for model_ops.checkpoint.

1. Save / load throughput (load = read + copy into preallocated model tensors, as a resume does) of a ~1 GB float32 Llama-shaped state dict: `model_ops.checkpoint.save/load`
   (SHA-256 of every tensor and file, fsync, atomic rename; load verifies every hash) against `torch.save/torch.load`
   (weights_only=True) and `safetensors.torch.save_file/load_file`. Baselines are timed without and with an fsync.
2. Peak memory of DCP -> HF conversion: `dcp_to_hf` (streaming, shard budget) against `dcp_to_torch_save`,
   each in a fresh subprocess (peak RSS above the process's RSS after imports).

Run under the shared lock:  flock /tmp/heavy.lock python bench/ckpt_bench.py [--gb 1.0] [--reps 3]
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

def _into(dst, sd):
    "Copy loaded tensors into preallocated model tensors (what resuming does), so mmapped loads pay for their reads."
    for k, t in sd.items(): dst[k].copy_(t)

def bench_throughput(sd:dict, work:Path, reps:int=3) -> dict:
    from safetensors.torch import save_file, load_file
    from model_ops.checkpoint import save, load
    nbytes = sum(t.numel()*t.element_size() for t in sd.values())
    def t_save_torch(p, sync):
        torch.save(sd, p)
        if sync: _fsync(p)
    def t_save_st(p, sync):
        save_file(sd, p)
        if sync: _fsync(p)
    def t_save_ours(p, sync): save(p, model=sd, rng=False)
    savers = {"torch.save": (t_save_torch, "x.pt"), "safetensors.save_file": (t_save_st, "x.safetensors"),
              "model_ops save (sha256+fsync+atomic)": (t_save_ours, "ck")}
    loaders = {"torch.save": lambda p: torch.load(p, weights_only=True),
               "safetensors.save_file": lambda p: load_file(p),
               "model_ops save (sha256+fsync+atomic)": lambda p: load(p, rng=False)["model"]}
    res = {"bytes": nbytes, "save": {}, "load": {}}
    for name, (fn, fname) in savers.items():
        for sync in ((False, True) if "model_ops" not in name else (True,)):
            ts = []
            for r in range(reps):
                p = work/f"{r}-{fname}"
                if p.exists(): shutil.rmtree(p) if p.is_dir() else p.unlink()
                t0 = time.perf_counter(); fn(p, sync); ts.append(time.perf_counter() - t0)
                if r < reps - 1: shutil.rmtree(p) if p.is_dir() else p.unlink()
            key = name + (" +fsync" if sync and "model_ops" not in name else "")
            res["save"][key] = {"s": min(ts), "median_s": statistics.median(ts), "GB/s": nbytes/1e9/min(ts)}
            print(f"save  {key:42s} best {min(ts):6.2f}s  {nbytes/1e9/min(ts):5.2f} GB/s", flush=True)
        p = work/f"{reps-1}-{fname}"
        dst = {k: torch.empty_like(v) for k, v in sd.items()}
        ts = []
        for r in range(reps):
            t0 = time.perf_counter(); out = loaders[name](p); _into(dst, out); ts.append(time.perf_counter() - t0)
            if r == 0: assert all(torch.equal(out[k], sd[k]) for k in sd), name
            del out
        res["load"][name] = {"s": min(ts), "median_s": statistics.median(ts), "GB/s": nbytes/1e9/min(ts)}
        print(f"load  {name:42s} best {min(ts):6.2f}s  {nbytes/1e9/min(ts):5.2f} GB/s (page cache warm, copied into model tensors)", flush=True)
        if "model_ops" in name:                      # the same load without hash checks: what the hashing costs
            ts = []
            for r in range(reps):
                t0 = time.perf_counter(); out = load(p, rng=False, verify=False)["model"]; _into(dst, out); ts.append(time.perf_counter() - t0); del out
            res["load"]["model_ops load verify=False"] = {"s": min(ts), "median_s": statistics.median(ts), "GB/s": nbytes/1e9/min(ts)}
            print(f"load  {'model_ops load verify=False':42s} best {min(ts):6.2f}s  {nbytes/1e9/min(ts):5.2f} GB/s", flush=True)
        del dst
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return res

PEAK = r'''
import sys, resource, time, warnings, json
warnings.simplefilter("ignore")
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from model_ops.checkpoint import dcp_to_hf
def status_mb(key):
    with open("/proc/self/status") as f:
        for l in f:
            if l.startswith(key): return int(l.split()[1]) / 1024
# VmHWM (this process's own peak RSS); ru_maxrss would inherit the parent's peak across fork+exec
base = status_mb("VmRSS")
which, src, dst, shard = sys.argv[1:5]
t0 = time.time()
if which == "dcp_to_torch_save": dcp_to_torch_save(src, dst)
else: dcp_to_hf(src, dst, max_shard_size=shard)
peak = status_mb("VmHWM")
print(json.dumps({"base_mb": base, "peak_mb": peak, "above_base_mb": peak - base, "s": time.time() - t0}))
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
    return res

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shard", default="100MB")
    ap.add_argument("--out", default=None, help="write results JSON here")
    a = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        sd = model_state(a.gb)
        print(f"state dict: {len(sd)} tensors, {sum(t.numel()*t.element_size() for t in sd.values())/1e9:.2f} GB float32", flush=True)
        res = {"throughput": bench_throughput(sd, work, a.reps), "dcp_to_hf_memory": bench_dcp_memory(sd, work, a.shard)}
        s, l = res["throughput"]["save"], res["throughput"]["load"]
        ours_s = s["model_ops save (sha256+fsync+atomic)"]["GB/s"]
        best_s = max(s["torch.save"]["GB/s"], s["safetensors.save_file"]["GB/s"])
        best_s_sync = max(s["torch.save +fsync"]["GB/s"], s["safetensors.save_file +fsync"]["GB/s"])
        ours_l = l["model_ops save (sha256+fsync+atomic)"]["GB/s"]
        best_l = max(l["torch.save"]["GB/s"], l["safetensors.save_file"]["GB/s"])
        res["ratios"] = {"save_vs_best_nosync": ours_s/best_s, "save_vs_best_fsync": ours_s/best_s_sync, "load_vs_best": ours_l/best_l}
        print(json.dumps(res["ratios"], indent=1))
        if a.out: Path(a.out).write_text(json.dumps(res, indent=1))
    finally: shutil.rmtree(work, ignore_errors=True)
