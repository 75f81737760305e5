"""Read a ~1 GB model through WeightStore and write it back through save_model, against plain
safetensors.torch.load_file / save_file on the same shards, in the same run.

Prints throughput (GB/s) of each, their ratio (target >= 0.9), and the peak memory above the process baseline
(target <= 2x the largest shard). Each measurement runs in a fresh subprocess so peak RSS is its own.
Usage: python bench/io_bench.py [--gb 1.0] [--shard 256MB] [--repeat 3]"""
import argparse, json, os, subprocess, sys, tempfile, time, shutil
from pathlib import Path

CHILD = r'''
import json, os, resource, sys, time, torch
from pathlib import Path
def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mode, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
from safetensors.torch import load_file, save_file
from model_ops.io import WeightStore, save_model
torch.zeros(1) + 1
base = rss()
os.system('sync')
t0 = time.perf_counter(); nbytes = 0; tread = 0.0
if mode == 'plain':
    idx = json.loads((src / 'model.safetensors.index.json').read_text())
    dst.mkdir()
    for fn in sorted(set(idx['weight_map'].values())):
        ta = time.perf_counter(); sd = load_file(src / fn); tread += time.perf_counter() - ta
        nbytes += sum(t.numel() * t.element_size() for t in sd.values())
        save_file(sd, dst / fn, metadata={'format': 'pt'}); del sd
    (dst / 'model.safetensors.index.json').write_text(json.dumps(idx))
else:
    s = WeightStore.open(src)
    nbytes = sum(s.nbytes(k) for k in s.keys())
    save_model(s, dst, max_shard_size=sys.argv[4])   # reads ahead one tensor while writing
os.system('sync')
total = time.perf_counter() - t0
print(json.dumps(dict(mode=mode, seconds=total, read_seconds=tread, bytes=nbytes, peak_above_base=peak() - base)))
'''

def run(mode, src, dst, shard):
    if Path(dst).exists(): shutil.rmtree(dst)
    out = subprocess.run([sys.executable, '-c', CHILD, mode, str(src), str(dst), shard], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--gb', type=float, default=1.0); ap.add_argument('--shard', default='256MB')
    ap.add_argument('--repeat', type=int, default=3); ap.add_argument('--dir', default=None)
    a = ap.parse_args()
    import torch
    from model_ops.io import save_model, parse_size
    work = Path(a.dir or tempfile.mkdtemp(prefix='io_bench_'))
    src = work / 'src'
    if not src.exists():
        # a Llama-shaped float32 model: 32k x 1024 embeddings and head, blocks of 4 x (1024 x 1024) + 3 x (1024 x 2816)
        n_layers = max(1, int((a.gb * 1e9 / 4 - 2 * 32000 * 1024) / (4 * 1024 * 1024 + 3 * 1024 * 2816)))
        g = torch.Generator().manual_seed(0)
        def gen():
            yield 'model.embed_tokens.weight', torch.randn(32000, 1024, generator=g)
            for i in range(n_layers):
                for n in 'q k v o'.split(): yield f'model.layers.{i}.self_attn.{n}_proj.weight', torch.randn(1024, 1024, generator=g)
                for n, shp in [('gate', (2816, 1024)), ('up', (2816, 1024)), ('down', (1024, 2816))]:
                    yield f'model.layers.{i}.mlp.{n}_proj.weight', torch.randn(*shp, generator=g)
            yield 'lm_head.weight', torch.randn(32000, 1024, generator=g)
        save_model(gen(), src, max_shard_size=a.shard)
    shards = sorted(src.glob('*.safetensors')); largest = max(p.stat().st_size for p in shards)
    size = sum(p.stat().st_size for p in shards)
    print(f"model: {size / 1e9:.2f} GB in {len(shards)} shards, largest {largest / 1e6:.0f} MB")
    res = {'plain': [], 'model_ops': []}
    for r in range(a.repeat):
        for mode in ('plain', 'model_ops'):
            res[mode].append(run(mode, src, work / f'out_{mode}', a.shard))
    best = {m: min(v, key=lambda x: x['seconds']) for m, v in res.items()}
    for m, b in best.items():
        print(f"{m:>10}: read+write {b['bytes'] / b['seconds'] / 1e9:.2f} GB/s ({b['seconds']:.2f} s), "
              f"peak above baseline {b['peak_above_base'] / 1e6:.0f} MB = {b['peak_above_base'] / largest:.2f} x largest shard")
    ratio = best['plain']['seconds'] / best['model_ops']['seconds']
    print(f"throughput ratio model_ops / plain safetensors: {ratio:.2f} (target >= 0.9)")
    print(f"model_ops peak memory / largest shard: {best['model_ops']['peak_above_base'] / largest:.2f} (target <= 2.0)")
    if not a.dir: shutil.rmtree(work, ignore_errors=True)

if __name__ == '__main__': main()
