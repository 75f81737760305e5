"""Benchmark: streaming `model_ops.transfer.transfer` vs a plain in-memory state-dict script.

Builds three synthetic Llama-shaped models of about `--size-gb` GB each (float32, HF sharded safetensors),
then runs, each in a fresh subprocess so peak memory is measured separately:

* `streaming`: model_ops.transfer.transfer(src_base, src_tuned, tgt_base, out=..., max_shard_size=...)
* `in-memory`: safetensors load_file of all three, out = tgt + alpha * (tuned - base) in float64 per tensor,
  save_file of the result (the usual hand-written script).

It prints wall time, peak RSS (VmHWM) and peak anonymous memory (RssAnon, sampled every 20 ms) for both,
and checks that the two outputs are bit-identical.

Run (heavy; takes the shared lock):  flock /tmp/heavy.lock python bench/transfer_bench.py --size-gb 1
"""
import argparse, json, math, os, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path


def _mem():
    out = {}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'): out[k] = int(v.split()[0]) * 1024
    return out


class PeakAnon:
    "Samples RssAnon in a thread; `.peak` is the largest value seen"
    def __init__(self, every=0.02): self.every, self.peak, self._stop = every, 0, threading.Event()
    def __enter__(self):
        self.t = threading.Thread(target=self._run, daemon=True); self.t.start(); return self
    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _mem()['RssAnon']); time.sleep(self.every)
    def __exit__(self, *a):
        self._stop.set(); self.t.join(); self.peak = max(self.peak, _mem()['RssAnon'])


def make_models(root: Path, size_gb: float, seed: int = 0):
    "Three Llama-shaped float32 models (~size_gb each): src_base, src_tuned = base + small noise, tgt_base = base + other noise"
    import torch
    from model_ops.io import save_model
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    n_layers = max(1, round((size_gb * 1e9 / 4 - 2 * vocab * hidden - hidden) / per_layer))
    shapes = [('model.embed_tokens.weight', (vocab, hidden))]
    for i in range(n_layers):
        p = f'model.layers.{i}.'
        shapes += [(p + 'self_attn.q_proj.weight', (hidden, hidden)), (p + 'self_attn.k_proj.weight', (hidden, hidden)),
                   (p + 'self_attn.v_proj.weight', (hidden, hidden)), (p + 'self_attn.o_proj.weight', (hidden, hidden)),
                   (p + 'mlp.gate_proj.weight', (inter, hidden)), (p + 'mlp.up_proj.weight', (inter, hidden)),
                   (p + 'mlp.down_proj.weight', (hidden, inter)), (p + 'input_layernorm.weight', (hidden,)),
                   (p + 'post_attention_layernorm.weight', (hidden,))]
    shapes += [('model.norm.weight', (hidden,)), ('lm_head.weight', (vocab, hidden))]
    cfg = dict(model_type='llama', architectures=['LlamaForCausalLM'], hidden_size=hidden, intermediate_size=inter,
               num_hidden_layers=n_layers, num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab,
               tie_word_embeddings=False)

    def gen(kind):
        for k, (name, shp) in enumerate(shapes):
            g = torch.Generator().manual_seed(seed * 1000 + k)
            t = torch.randn(shp, generator=g) * 0.02
            if kind != 'base':
                g2 = torch.Generator().manual_seed(seed * 1000 + k + (10**6 if kind == 'tuned' else 2 * 10**6))
                t.add_(torch.randn(shp, generator=g2), alpha=1e-3)
            yield name, t
    paths = {}
    for kind in ('base', 'tuned', 'tgt'):
        done = root / kind / 'model.safetensors.index.json'
        if done.exists() and json.loads((root / kind / 'config.json').read_text()) == cfg: paths[kind] = root / kind; continue
        paths[kind] = save_model(gen(kind), root / kind, config=cfg, max_shard_size='500MB', overwrite=True)
    total = sum(math.prod(s) for _, s in shapes) * 4
    return paths, total, n_layers


def run_streaming(b, t, g, out, alpha, shard):
    from model_ops.transfer import transfer
    transfer(b, t, g, out=out, alpha=alpha, max_shard_size=shard, overwrite=True)


def run_inmemory(b, t, g, out, alpha):
    import torch
    from safetensors.torch import load_file, save_file

    def load(folder):
        sd = {}
        for f in sorted(Path(folder).glob('*.safetensors')): sd.update(load_file(f))
        return sd
    B, T, G = load(b), load(t), load(g)
    res = {k: (G[k].double() + alpha * (T[k].double() - B[k].double())).to(G[k].dtype) for k in G}
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(res, str(Path(out) / 'model.safetensors'), metadata={'format': 'pt'})


def child(args):
    "Run one method in this process and print JSON with time and memory"
    import torch
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with PeakAnon() as pk:
        if args.child == 'streaming': run_streaming(args.b, args.t, args.g, args.out, args.alpha, args.shard)
        else: run_inmemory(args.b, args.t, args.g, args.out, args.alpha)
    dt = time.perf_counter() - t0
    m = _mem()
    print(json.dumps(dict(method=args.child, seconds=dt, peak_rss=m['VmHWM'], peak_anon=pk.peak)))


def compare(out_a, out_b):
    "True if every tensor is bit-identical in the two outputs"
    import torch
    from model_ops.io import WeightStore
    A, B = WeightStore.open(out_a), WeightStore.open(out_b)
    if set(A.keys()) != set(B.keys()): return False
    return all(torch.equal(A[k].view(-1).view(torch.uint8), B[k].view(-1).view(torch.uint8)) for k in A.keys())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size-gb', type=float, default=1.0, help='approximate size of each model')
    ap.add_argument('--alpha', type=float, default=1.0)
    ap.add_argument('--shard', default='500MB', help='output shard size of the streaming writer')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeat', type=int, default=1, help='runs of each method (the best time is reported)')
    ap.add_argument('--dir', default=None, help='work folder (default: a temp folder, removed at the end)')
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    for k in ('b', 't', 'g', 'out'): ap.add_argument('--' + k, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child: return child(args)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix='transfer_bench_'))
    try:
        t0 = time.perf_counter()
        paths, total, n_layers = make_models(root, args.size_gb)
        print(f"models: 3 x {total/1e9:.2f} GB float32 ({n_layers} layers, hidden 2048, vocab 32000), "
              f"built in {time.perf_counter()-t0:.0f}s; largest tensor {32000*2048*4/1e6:.0f} MB", flush=True)
        res = {}
        for r in range(args.repeat):
            for method in ('streaming', 'in-memory'):
                out = root / f'out_{method}'
                if out.exists(): shutil.rmtree(out)
                cmd = [sys.executable, __file__, '--child', method, '--b', str(paths['base']), '--t', str(paths['tuned']),
                       '--g', str(paths['tgt']), '--out', str(out), '--alpha', str(args.alpha), '--shard', args.shard,
                       '--threads', str(args.threads)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode: print(p.stdout, p.stderr); raise SystemExit(f'{method} failed')
                d = json.loads(p.stdout.strip().splitlines()[-1])
                if method not in res or d['seconds'] < res[method]['seconds']: res[method] = d
                print(f"  run {r+1} {method:10s} {d['seconds']:7.1f} s   peak RSS {d['peak_rss']/1e9:5.2f} GB   "
                      f"peak anon {d['peak_anon']/1e9:5.2f} GB", flush=True)
        same = compare(root / 'out_streaming', root / 'out_in-memory')
        s, m = res['streaming'], res['in-memory']
        print(f"\nstreaming transfer : {s['seconds']:.1f} s, peak RSS {s['peak_rss']/1e9:.2f} GB, peak anonymous {s['peak_anon']/1e9:.2f} GB")
        print(f"in-memory script   : {m['seconds']:.1f} s, peak RSS {m['peak_rss']/1e9:.2f} GB, peak anonymous {m['peak_anon']/1e9:.2f} GB")
        print(f"speed ratio (in-memory / streaming): {m['seconds']/s['seconds']:.2f}x; "
              f"memory ratio (anon): {m['peak_anon']/max(s['peak_anon'],1):.1f}x; outputs bit-identical: {same}")
        print(f"bound for streaming: output shard {args.shard} + a few tensors (largest {32000*2048*4/1e6:.0f} MB); model size {total/1e9:.2f} GB")
    finally:
        if not args.dir: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
