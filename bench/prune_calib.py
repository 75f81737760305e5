"""How much calibration Wanda and SparseGPT need: SmolLM2-135M at 50% unstructured, perplexity on unseen English.

    OMP_NUM_THREADS=1 python bench/prune_calib.py                      # the table of nbs/40b_prune_calib.ipynb, "Calibration defaults"
    python bench/prune_calib.py --runs wanda:32x128,sparsegpt:128x128:0.01

Calibration comes from the offline default text (`calib_texts()`, `--calib text`), from text sampled from the model itself
(`--calib self`, the pruners' default: `self_calib_ids`, generated once and cached) or half of each (`--calib mix`);
perplexity is measured on license texts Debian ships (`--unseen`, comma list; GPL-3 by default), 4,096 tokens of each in
512-token windows, a kind of English the calibration text does not contain. Each run prints its perplexities and the
seconds the pruning took (calibration forwards included; not the one-off generation of the self-calibration text).

    OMP_NUM_THREADS=1 python bench/prune_calib.py --calib self --runs wanda:128x128,sparsegpt:128x128 \
        --unseen /usr/share/common-licenses/GPL-3,/usr/share/common-licenses/Apache-2.0,/usr/share/common-licenses/MPL-2.0,/usr/share/common-licenses/GFDL-1.3
"""
import argparse, json, time
import torch
from model_ops.eval import perplexity
from model_ops.nn import load_model
from model_ops.prune import PRUNERS, calib_ids, calib_texts, self_calib_ids

DEFAULT_RUNS = ("magnitude,wanda:32x128,sparsegpt:32x128,wanda:32x512,sparsegpt:32x512,sparsegpt:32x512:0.1,"
                "wanda:128x128,sparsegpt:128x128")

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="comma list of method[:NxL[:percdamp]]")
    ap.add_argument("--unseen", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--calib", default="text", choices=["text", "self", "mix"], help="calibration source (see above)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2")
    unseen = {f.rsplit("/", 1)[-1]: [tok.decode(tok(open(f).read())["input_ids"][:4096])] for f in a.unseen.split(",")}
    def ppl(): return {k: round(perplexity(model, tok, t, max_length=512), 2) for k, t in unseen.items()}
    def source(n, L):
        if a.calib == "text": return calib_ids(tok, calib_texts(), n, L)
        if a.calib == "self": return self_calib_ids(model, tok, n, L)
        return torch.cat([calib_ids(tok, calib_texts(), n - n // 2, L), self_calib_ids(model, tok, n // 2, L)])
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = [dict(run="dense", ppl=ppl(), seconds=0.0)]
    print(json.dumps(rows[-1]), flush=True)
    for run in a.runs.split(","):
        method, *rest = run.split(":")
        kw = {}
        if rest:
            n, L = map(int, rest[0].split("x"))
            kw["calib"] = source(n, L)
        if len(rest) > 1: kw["percdamp"] = float(rest[1])
        t0 = time.perf_counter()
        PRUNERS[method](model, tok, sparsity=0.5, progress=False, **kw)
        rows.append(dict(run=run, ppl=ppl(), seconds=round(time.perf_counter() - t0, 1)))
        model.load_state_dict(dense)
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M, 50% unstructured, calibration {a.calib!r}, perplexity on 4,096 tokens in 512-token windows of")
    print(f"{'':24s}" + "".join(f"{k:>12s}" for k in unseen) + f"{'prune':>10s}")
    for r in rows: print(f"{r['run']:24s}" + "".join(f"{v:12.2f}" for v in r["ppl"].values()) + f"{r['seconds']:8.1f} s")

if __name__ == "__main__":
    main()
