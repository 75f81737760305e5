"""Wanda and SparseGPT as the reference code runs them (locuslab/wanda `lib/prune.py`, `lib/layerwrapper.py`,
`lib/sparsegpt.py`), re-stated here from that code's order of operations as a test oracle for `model_ops.prune`:

- the first block's inputs are caught one calibration sequence at a time and every block runs one sequence at a time;
- every linear of a block sees the *unpruned* block's inputs (forward hooks on one pass over all sequences), then all of
  the block's linears are pruned, then the block is run again to give the next block its inputs;
- Wanda keeps a running mean of `torch.norm(x, dim=tokens) ** 2` per sequence in float32, scores `|W| * sqrt(mean)`,
  and zeroes the first `int(in * sparsity)` entries of a stable ascending sort of each row (`W[mask] = 0`);
  N:M: `topk(largest=False)` of each group of M;
- SparseGPT keeps `H` as a running mean of `2 x x^T`, and prunes with the lazy-batch OBS loop; its unstructured mask
  of each 128-column block is `score <= sorted(score)[int(numel * sparsity)]`.
Written for the test suite and `bench/prune_bench.py --reference`; not part of the library."""
import math
import torch
from torch import nn
from model_ops.nn import decoder_layers, weight_2d


class _Stop(Exception): pass


def _linears(block):
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


def _first_inputs(model, ids):
    "(hidden, kwargs) entering block 0, one calibration sequence at a time."
    caught = []
    def pre(mod, args, kwargs):
        kw = dict(kwargs)
        h = args[0] if args else kw.pop("hidden_states")
        caught.append((h, kw)); raise _Stop
    hk = decoder_layers(model)[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for row in ids:
            try: model(input_ids=row.unsqueeze(0), use_cache=False)
            except _Stop: pass
    finally: hk.remove()
    return caught


def _block_out(block, h, kw):
    out = block(h, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


class _WandaStats:
    def __init__(self, cols): self.scaler, self.n = torch.zeros(cols), 0
    def add(self, x):
        x = x.unsqueeze(0) if x.dim() == 2 else x
        t = x.shape[0]
        x = x.reshape(-1, x.shape[-1]).t()
        self.scaler *= self.n / (self.n + t)
        self.n += t
        self.scaler += torch.norm(x.float(), p=2, dim=1) ** 2 / self.n


class _Hessian:
    def __init__(self, cols): self.H, self.n = torch.zeros(cols, cols), 0
    def add(self, x):
        x = x.unsqueeze(0) if x.dim() == 2 else x
        t = x.shape[0]
        x = x.reshape(-1, x.shape[-1]).t()
        self.H *= self.n / (self.n + t)
        self.n += t
        x = math.sqrt(2 / self.n) * x.float()
        self.H += x @ x.t()


def _wanda_layer(W, scaler, sparsity, nm):
    metric = W.abs() * torch.sqrt(scaler.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if nm:
        n, m = nm
        for c in range(0, metric.shape[1], m):
            mask.scatter_(1, c + torch.topk(metric[:, c:c + m].float(), n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, :int(metric.shape[1] * sparsity)], True)
    W[mask] = 0


def _sparsegpt_layer(W0, H, sparsity, nm, blocksize=128, percdamp=0.01):
    W = W0.clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(cols)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Q1, E1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), torch.zeros(rows, i2 - i1), Hinv[i1:i2, i1:i2]
        if nm: mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            mask1 = score <= torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if nm and i % nm[1] == 0:
                score = W1[:, i:i + nm[1]] ** 2 / torch.diag(Hinv1)[i:i + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, nm[0], dim=1, largest=False)[1], True)
            q = w.clone(); q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    W0.copy_(W.to(W0.dtype))


@torch.no_grad()
def reference_prune(model, ids, method="wanda", sparsity=0.5, nm=None):
    "Prune `model` in place as the reference code does (`method`: 'wanda' or 'sparsegpt'); `ids`: (n, seqlen) token ids."
    model.eval()
    inps = _first_inputs(model, ids)
    for block in decoder_layers(model):
        lin = _linears(block)
        stats = {n: (_WandaStats if method == "wanda" else _Hessian)(weight_2d(m).shape[1]) for n, m in lin.items()}
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: stats[n].add(a[0].data)) for n, m in lin.items()]
        for h, kw in inps: _block_out(block, h, kw)
        for hk in hooks: hk.remove()
        for n, m in lin.items():
            W = weight_2d(m)
            if method == "wanda": _wanda_layer(W.data, stats[n].scaler, sparsity, nm)
            else: _sparsegpt_layer(W.data, stats[n].H, sparsity, nm)
        inps = [(_block_out(block, h, kw), kw) for h, kw in inps]
    return model
