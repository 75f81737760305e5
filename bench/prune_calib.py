"""How much calibration Wanda and SparseGPT need: SmolLM2-135M at 50% unstructured, perplexity on unseen English.

    OMP_NUM_THREADS=1 python bench/prune_calib.py                      # the table of nbs/40_prune.ipynb, "Calibration defaults"
    python bench/prune_calib.py --runs wanda:32x128,sparsegpt:128x128:0.01

Calibration comes from the offline default text (`calib_texts()`); perplexity is measured on the GPL-3 text Debian ships
(`--unseen`), 4,096 tokens in 512-token windows, a kind of English the calibration text does not contain. Each run prints
its perplexity and the seconds the pruning took (calibration forwards included).
"""
import argparse, json, time
import torch
from model_ops.eval import perplexity
from model_ops.nn import load_model
from model_ops.prune import PRUNERS, calib_ids, calib_texts

DEFAULT_RUNS = ("magnitude,wanda:32x128,sparsegpt:32x128,wanda:32x512,sparsegpt:32x512,sparsegpt:32x512:0.1,"
                "wanda:128x128,sparsegpt:128x128")

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="comma list of method[:NxL[:percdamp]]")
    ap.add_argument("--unseen", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2")
    ids = tok(open(a.unseen).read())["input_ids"][:4096]
    unseen = [tok.decode(ids)]
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = [dict(run="dense", ppl=perplexity(model, tok, unseen, max_length=512), seconds=0.0)]
    print(json.dumps(rows[-1]), flush=True)
    for run in a.runs.split(","):
        method, *rest = run.split(":")
        kw = {}
        if rest:
            n, L = map(int, rest[0].split("x"))
            kw["calib"] = calib_ids(tok, calib_texts(), n, L)
        if len(rest) > 1: kw["percdamp"] = float(rest[1])
        t0 = time.perf_counter()
        PRUNERS[method](model, tok, sparsity=0.5, progress=False, **kw)
        rows.append(dict(run=run, ppl=perplexity(model, tok, unseen, max_length=512), seconds=round(time.perf_counter() - t0, 1)))
        model.load_state_dict(dense)
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M, 50% unstructured, perplexity on {a.unseen} (4,096 tokens, 512-token windows)")
    for r in rows: print(f"{r['run']:24s} {r['ppl']:10.2f} {r['seconds']:8.1f} s")

if __name__ == "__main__":
    main()
