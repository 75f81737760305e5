"""Adversarial tests (issue #16, "Trust"): every file kind we write is corrupted, every reader that could meet a pickle is
handed a malicious one, every writer is killed at random moments and at every rename, made to fail by a file-size limit,
pointed at its own inputs and raced by a second writer.

A damaged input must give a clean error of our own types (ModelIOError / CheckpointError / another ValueError, not a
JSON or Unicode one) whose message names the file or its folder, or, where the damage hits bytes no checksum covers,
the very data that was written. Never a crash (KeyError, struct.error, RecursionError, ...), never a hang, never
silently different data, never code run from a file, never a complete-looking broken output, never a lost input.

Each test counts its trials, clean errors, correct answers and failures; the counts of the whole run are printed at the
end of the module (`pytest tests/test_adversarial.py -q`) and written as JSON to $ADVERSARIAL_SUMMARY when it is set.
Writers run in forked children (`os.fork`): the tensors are made in the parent, so a child does no multi-threaded torch
compute."""
import os, sys, json, time, random, signal, shutil, struct, pickle, select, hashlib, resource, itertools
import contextlib, collections
from pathlib import Path
import numpy as np
import pytest, torch
from torch import nn

from model_ops.io import WeightStore, save_model, verify_store, clean_tmp, restore_aside
from model_ops import checkpoint as C
from model_ops.checkpoint.core import _manifest_hash
from model_ops.checkpoint.deepspeed import _ds_load, _ds_write
from model_ops.delta import Delta, Sparse

pytestmark = pytest.mark.filterwarnings("ignore")
SEED, TIMEOUT = 16, 30          # every random choice comes from Random(SEED + ...); one read may take at most TIMEOUT s

# --------------------------------------------------------------------------- counting

TALLY = collections.OrderedDict()   # category -> Counter(trials, clean, ok, failures)
FAILURES = []

class Hang(BaseException): "A reader took longer than its deadline."
class _Read(BaseException): "An input's tensor data were read (by an operation that had to refuse before reading)."
_ANY, _REFUSE = object(), object()

@contextlib.contextmanager
def _deadline(s):
    def on_alarm(*_): raise Hang()
    old = signal.signal(signal.SIGALRM, on_alarm); signal.setitimer(signal.ITIMER_REAL, s)
    try: yield
    finally: signal.setitimer(signal.ITIMER_REAL, 0); signal.signal(signal.SIGALRM, old)

def _ename(e): return f"{type(e).__module__}.{type(e).__qualname__}".replace("builtins.", "")
def _line(e): return (str(e).strip().splitlines() or [""])[0][:300]

def _is_clean(e, names=()):
    "Our kind of error: a ValueError (ModelIOError, CheckpointError, ...) that is not a JSON/Unicode one, naming one of `names`."
    if not isinstance(e, ValueError) or isinstance(e, (json.JSONDecodeError, UnicodeError)): return False
    return not names or any(str(n) in str(e) for n in names)

class Rec:
    "One test's trials in one category; on exit the counts go to TALLY and the test fails if any trial failed."
    def __init__(self, cat): self.cat, self.n, self.clean, self.ok, self.fails = cat, 0, 0, 0, []
    def __enter__(self): return self
    def fail(self, case, why):
        self.fails.append(f"[{self.cat}] {case}: {why}"); return "fail"
    def good(self, kind="ok"):
        setattr(self, kind, getattr(self, kind) + 1); return kind
    def demote(self, kind, case, why):
        "A trial already counted as `kind` turns out to have failed after all (e.g. it changed its inputs)."
        if kind in ("ok", "clean"): setattr(self, kind, getattr(self, kind) - 1); return self.fail(case, why)
        self.fails[-1] += f"; and {why}"; return "fail"
    def __exit__(self, typ, val, tb):
        c = TALLY.setdefault(self.cat, collections.Counter())
        c.update(trials=self.n, clean=self.clean, ok=self.ok, failures=len(self.fails))
        FAILURES.extend(self.fails)
        if typ is None:
            assert not self.fails, f"{len(self.fails)} of {self.n} trials failed:\n" + "\n".join(self.fails[:40])
        return False

def probe(rec, case, fn, want=_ANY, names=(), timeout=TIMEOUT, must_work=False):
    """One trial: `fn()` must raise a clean error naming one of `names`, or return data whose `_canon` is `want`
    (`_ANY`: anything; `_REFUSE`: it must raise); with `must_work`, any error is a failure."""
    rec.n += 1
    try:
        with _deadline(timeout): got = fn()
    except KeyboardInterrupt: raise
    except Hang: return rec.fail(case, f"hang: no answer within {timeout} s")
    except _Read as e: return rec.fail(case, f"read the input before refusing ({e})")
    except BaseException as e:
        if _is_clean(e, names) and not must_work: return rec.good("clean")
        return rec.fail(case, f"{_ename(e)}: {_line(e)}")
    if want is _REFUSE: return rec.fail(case, "accepted (no error)")
    if want is not _ANY and (g := _canon(got)) != want: return rec.fail(case, f"returned different data without an error ({_where(g, want)})")
    return rec.good()

def _canon(x):
    "A comparable, bit-exact form of tensors, arrays, modules and containers of them."
    if isinstance(x, nn.Module): x = x.state_dict()
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous().reshape(-1)
        return ("T", str(x.dtype), tuple(x.shape), t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if isinstance(x, np.ndarray): return ("A", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, dict): return ("D", tuple(sorted((str(k), _canon(v)) for k, v in x.items())))
    if isinstance(x, (list, tuple)): return ("L", tuple(_canon(v) for v in x))
    return x

def _where(a, b, path=""):
    "Where two `_canon` forms first differ, e.g. `config/rms_norm_eps`."
    if isinstance(a, tuple) and isinstance(b, tuple) and a[:1] == b[:1] == ("D",):
        da, db = dict(a[1]), dict(b[1])
        for k in sorted(set(da) | set(db)):
            if da.get(k) != db.get(k): return _where(da.get(k), db.get(k), f"{path}/{k}")
    if isinstance(a, tuple) and isinstance(b, tuple) and a[:1] == b[:1] == ("L",) and len(a[1]) == len(b[1]):
        for i, (x, y) in enumerate(zip(a[1], b[1])):
            if x != y: return _where(x, y, f"{path}/{i}")
    if isinstance(a, tuple) and isinstance(b, tuple) and a[:1] == b[:1] == ("T",): return f"tensor {path.lstrip('/')} differs"
    return f"{path.lstrip('/') or 'value'}: {str(a)[:60]} instead of {str(b)[:60]}"

@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    rows = [(c, t["trials"], t["clean"], t["ok"], t["failures"]) for c, t in TALLY.items()]
    tot = [sum(r[i] for r in rows) for i in range(1, 5)]
    lines = ["", "adversarial summary (issue #16): category / trials / clean errors / correct answers / failures"]
    lines += [f"  {c:<14}{n:>7}{cl:>8}{ok:>8}{f:>8}" for c, n, cl, ok, f in rows]
    lines += [f"  {'total':<14}{tot[0]:>7}{tot[1]:>8}{tot[2]:>8}{tot[3]:>8}"]
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    cm = request.config.pluginmanager.get_plugin("capturemanager")
    with (cm.global_and_fixture_disabled() if cm is not None else contextlib.nullcontext()):
        for l in lines:
            if tr is not None: tr.write_line(l)
            else: print(l)
    if os.environ.get("ADVERSARIAL_SUMMARY"):
        Path(os.environ["ADVERSARIAL_SUMMARY"]).write_text(json.dumps({"categories": {r[0]: dict(zip(("trials", "clean", "ok", "failures"), r[1:])) for r in rows},
                                                                     "failures": FAILURES}, indent=1))

# --------------------------------------------------------------------------- small inputs (no transformers: fast)

H, V, L = 8, 32, 2
CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "num_hidden_layers": L,
       "vocab_size": V, "tie_word_embeddings": False, "rms_norm_eps": 1e-06}

def lm_sd(seed):
    "A two-layer Llama-named state dict of 2,600 parameters."
    g = torch.Generator().manual_seed(seed); r = lambda *s: torch.randn(*s, generator=g)
    sd = {"model.embed_tokens.weight": r(V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        for n in "qkvo": sd[p + f"self_attn.{n}_proj.weight"] = r(H, H)
        sd.update({p + "mlp.gate_proj.weight": r(2 * H, H), p + "mlp.up_proj.weight": r(2 * H, H), p + "mlp.down_proj.weight": r(H, 2 * H),
                   p + "input_layernorm.weight": 1 + r(H) / 10, p + "post_attention_layernorm.weight": 1 + r(H) / 10})
    sd["model.norm.weight"] = 1 + r(H) / 10; sd["lm_head.weight"] = r(V, H)
    return sd

def mixed_sd(seed=0):
    "Several dtypes, a scalar and an empty tensor."
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(24, 16, generator=g), "b.bf16": torch.randn(40, 8, generator=g).bfloat16(),
            "c.f16": torch.randn(33, generator=g).half(), "d.int": torch.randint(-9, 9, (7, 5), generator=g),
            "e.bool": torch.rand(13, generator=g) > 0.5, "f.scalar": torch.tensor(3.5), "g.empty": torch.zeros(0, 4),
            "h.f64": torch.randn(6, 6, generator=g, dtype=torch.float64)}

class Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed); self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 4)

def _store(p):
    "Everything a reader of model folder `p` gets: its tensors, tied names and config, after `verify_store`."
    verify_store(p)
    s = WeightStore.open(p)
    return {"t": {k: s[k] for k in s.keys()}, "tied": dict(s.tied), "config": s.config}

def _tree(*roots):
    "{path: (kind, size, sha256 or link target)} of everything under `roots` (links not followed): has anything changed?"
    out = {}
    for r in roots:
        r = Path(r)
        for dp, dns, fns in os.walk(r):
            for n in dns + fns:
                p = Path(dp) / n
                if p.is_symlink(): out[str(p)] = ("link", os.readlink(p))
                elif p.is_file(): out[str(p)] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
                else: out[str(p)] = ("dir",)
    return out

def _hidden(d): return sorted(p.name for p in Path(d).iterdir() if p.name.startswith("."))

def _rehash_manifest(d, *files):
    "What whoever writes a folder can do: update the manifest entries of `files` and the manifest's own hash."
    m = json.loads((Path(d) / "manifest.json").read_text())
    for f in files:
        b = (Path(d) / f).read_bytes()
        m["files"][f] = {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
    m["manifest_sha256"] = _manifest_hash(m)
    (Path(d) / "manifest.json").write_text(json.dumps(m, indent=1))

@pytest.fixture(scope="module")
def root(tmp_path_factory): return tmp_path_factory.mktemp("adv")

@pytest.fixture(scope="module")
def models(root):
    "Base and two fine-tunes as sharded model folders (4 shards + index + config), and a linear merge of a and b."
    d = root / "models"
    P = {k: save_model(lm_sd(i), d / k, config=CFG, max_shard_size="3KB") for i, k in enumerate(["base", "a", "b"])}
    P["cfg"] = {"merge_method": "linear", "models": [{"model": str(P["a"]), "parameters": {"weight": 0.5}},
                                                     {"model": str(P["b"]), "parameters": {"weight": 0.5}}]}
    from model_ops.merge import merge_config
    P["merged"] = merge_config(P["cfg"], d / "merged", workers=1, max_shard_size="3KB", progress=False)
    P["yml"] = d / "linear.yml"; P["yml"].write_text(json.dumps(P["cfg"]))      # (JSON is YAML)
    return P

def _universal():
    g = torch.Generator().manual_seed(3)
    lay = C.TPLayout(replicated=[r"norm\.weight$"], row_parallel=[r"o\.weight$"])
    p = {"blk.q.weight": torch.randn(8, 6, generator=g), "blk.o.weight": torch.randn(6, 8, generator=g), "blk.norm.weight": torch.randn(6, generator=g)}
    states = {"param": p, "exp_avg": {k: torch.randn(v.shape, generator=g) for k, v in p.items()},
              "exp_avg_sq": {k: torch.rand(v.shape, generator=g) for k, v in p.items()}}
    return {"meta": {k: lay.rule(k, v.ndim) for k, v in p.items()}, "states": states, "layout": lay.to_dict()}, lay

@pytest.fixture(scope="module")
def ckpts(root):
    "One folder of each checkpoint kind we write: training (sharded), TP, universal, DCP, ZeRO, DeepSpeed universal, delta."
    d = root / "ckpts"; d.mkdir()
    K = {}
    K["sd"] = {**mixed_sd(1), **{f"layer{i}.w": torch.randn(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)}}
    K["extra"] = {"lr": 0.125, "name": "run-1", "ema": {"w": torch.arange(6.0)}, "tup": (1, 2.5), "arr": np.arange(4, dtype=np.int16)}
    K["training"] = C.save(d / "training", model=K["sd"], step=7, extra=K["extra"], rng=False, max_shard_size="2KB")
    u, lay = _universal(); K["u"], K["lay"] = u, lay
    K["ranks"] = C.from_universal(u, 2)
    K["tp"] = C.save_tp(K["ranks"], d / "tp", lay)
    K["universal"] = C.save_universal(u, d / "universal")
    K["net"] = Net(0)
    K["dcp"] = C.dcp_save(d / "dcp", K["net"], extra={"lr": 0.25, "t": torch.arange(3.0)}, step=4)
    K["zero"] = C.save_zero({**u, "groups": [sorted(u["meta"])]}, d / "zero" / "global_step4", tp=1, dp=2)
    K["dsu"] = C.ds_to_universal(K["zero"], d / "zero" / "global_step4_universal", latest=False)
    K["delta"] = Delta({"w": torch.randn(6, 5), "b": torch.randn(5),
                        "s": Sparse((4, 4), {"index": torch.tensor([1, 5, 9], dtype=torch.int32), "value": torch.tensor([1.0, -2.0, 3.0])})},
                       {"operation": "test", "k": 3}, "0123abcd").save(d / "delta")
    return K

# --------------------------------------------------------------------------- 1. byte flips and truncations of every file kind

def _corrupt(rec, rng, path, readers, n_flip, n_cut, hot=None):
    """Flip one random bit at `n_flip` random positions of `path` (plus as many inside `hot` = (start, stop), e.g. a
    header) and cut it at `n_cut` random lengths; after each, every (label, reader, want, names) must raise cleanly or
    return `want`."""
    raw = path.read_bytes()
    pos = [rng.randrange(len(raw)) for _ in range(n_flip)]
    if hot: pos += [rng.randrange(hot[0], min(hot[1], len(raw))) for _ in range(n_flip)]
    cuts = sorted({0, 1, 7, 8, len(raw) - 1} | {rng.randrange(len(raw)) for _ in range(n_cut)})
    def flipped(p):
        b = bytearray(raw); b[p] ^= 1 << rng.randrange(8); return bytes(b)
    try:
        for what, bad in [(f"bit flip at byte {p}", flipped(p)) for p in pos] + [(f"cut to {c} of {len(raw)} bytes", raw[:c]) for c in cuts]:
            path.write_bytes(bad)
            for label, fn, want, names in readers: probe(rec, f"{path.parent.name}/{path.name}: {what}: {label}", fn, want, names)
    finally: path.write_bytes(raw)

def _st_header_span(p):
    raw = Path(p).read_bytes(); return (0, 8 + int.from_bytes(raw[:8], "little"))

def test_corrupt_model_folders(root, models):
    "save_model shards (data, header, length prefix) and its index; a merge_config output; every reader verifies."
    rng = random.Random(SEED)
    with Rec("corruption") as rec:
        for key in ("a", "merged"):
            p = models[key]; want = _canon(_store(p))
            rd = [("verify_store + read", lambda p=p: _store(p), want, (str(p),))]
            shards = sorted(p.glob("*.safetensors"))
            for f in [shards[0], shards[-1]]: _corrupt(rec, rng, f, rd, 40, 8, _st_header_span(f))
            _corrupt(rec, rng, p / "model.safetensors.index.json", rd, 40, 6)
            # (config.json is left out on purpose: users edit it by hand, and no checksum covers it; see the io Guarantees)
        p = save_model(mixed_sd(), root / "mixed", config=CFG, metadata={"operation": "test"})
        want = _canon(_store(p))
        _corrupt(rec, rng, p / "model.safetensors", [("verify_store + read", lambda: _store(p), want, (str(p),))], 80, 10,
                 _st_header_span(p / "model.safetensors"))

def test_corrupt_training_checkpoint(ckpts):
    "checkpoint.save: model shards, state shard, index, state.json, manifest.json; `verify` then `load`, and `load` alone."
    rng = random.Random(SEED + 1)
    d = ckpts["training"]
    got = lambda r: {"step": r["step"], "extra": r["extra"], "model": r["model"]}
    want = _canon(got(C.load(d, rng=False)))
    rd = [("verify + load", lambda: (C.verify(d), got(C.load(d, rng=False)))[1], want, (str(d),)),
          ("load", lambda: got(C.load(d, rng=False)), want, (str(d),))]
    with Rec("corruption") as rec:
        for f in sorted(d.glob("*.safetensors"))[:2] + [d / "state.safetensors"]: _corrupt(rec, rng, f, rd, 25, 5, _st_header_span(f))
        for f in ("model.safetensors.index.json", "state.json", "manifest.json"): _corrupt(rec, rng, d / f, rd, 25, 4)

def test_corrupt_tp_universal_dcp_delta(ckpts, root):
    "save_tp and save_universal folders, a dcp_save folder (dcp_load, dcp_to_hf) and a Delta.save file."
    rng = random.Random(SEED + 2)
    tp, un, dc, de = ckpts["tp"], ckpts["universal"], ckpts["dcp"], ckpts["delta"]
    rtp = lambda: (lambda r: {"ranks": r[0], "layout": r[1].to_dict()})(C.load_tp(tp))
    run = lambda: C.load_universal(un)
    def rdcp():
        m = Net(99); r = C.dcp_load(dc, m); return {"m": m, "extra": r["extra"], "step": r["step"]}
    hf = root / "dcp_hf"
    def rhf():
        shutil.rmtree(hf, ignore_errors=True); C.dcp_to_hf(dc, hf, prefix="model."); return _store(hf)
    rde = lambda: (lambda x: {"t": {n: x[n] for n in x.keys()}, "meta": x.meta, "fp": x.base_fingerprint})(Delta.load(de))
    with Rec("corruption") as rec:
        for f in sorted(tp.iterdir()):
            _corrupt(rec, rng, f, [("load_tp", rtp, _canon(rtp()), (str(tp),))], 20, 4, _st_header_span(f) if f.suffix == ".safetensors" else None)
        for f in sorted(un.iterdir()):
            _corrupt(rec, rng, f, [("load_universal", run, _canon(run()), (str(un),))], 20, 4, _st_header_span(f) if f.suffix == ".safetensors" else None)
        w1, w2 = _canon(rdcp()), _canon(rhf())
        for f in sorted(dc.iterdir()):
            _corrupt(rec, rng, f, [("dcp_load", rdcp, w1, (str(dc),)), ("dcp_to_hf", rhf, w2, (str(dc),))], 25, 4)
        _corrupt(rec, rng, de, [("Delta.load", rde, _canon(rde()), (str(de),))], 60, 8, _st_header_span(de))

def test_corrupt_deepspeed_folders(ckpts):
    "save_zero rank files (read_zero) and a DeepSpeed universal folder (load_deepspeed_universal, with its manifest)."
    rng = random.Random(SEED + 3)
    z, dsu = ckpts["zero"], ckpts["dsu"]
    rz = lambda: (lambda u: {"meta": u["meta"], "states": u["states"]})(C.read_zero(z))
    ru = lambda: (lambda u: {"meta": u["meta"], "states": u["states"]})(C.load_deepspeed_universal(dsu))
    with Rec("corruption") as rec:
        wz, wu = _canon(rz()), _canon(ru())
        for f in sorted(z.iterdir()): _corrupt(rec, rng, f, [("read_zero", rz, wz, (str(z),))], 30, 4)
        for f in sorted(p for p in dsu.rglob("*") if p.is_file())[:6]: _corrupt(rec, rng, f, [("load_deepspeed_universal", ru, wu, (str(dsu),))], 15, 3)
        # well-formed rank files missing a record DeepSpeed always writes
        f = z / "zero_pp_rank_0_mp_rank_00_optim_states.pt"; raw = f.read_bytes()
        for key in ("param_slice_mappings", "base_optimizer_state", "single_partition_of_fp32_groups"):
            try:
                obj = _ds_load(f); del obj["optimizer_state_dict"][key]; _ds_write(f, obj)
                probe(rec, f"{f.name} without optimizer_state_dict[{key!r}]: read_zero", rz, wz, (f.name,))
            finally: f.write_bytes(raw)

# --------------------------------------------------------------------------- 2. header edits that keep the file well-formed, deep headers

def _rewrite_header(f, edit):
    "Re-serialise the header of safetensors file `f` after `edit(header)` (length prefix adjusted, data untouched)."
    raw = f.read_bytes(); n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + n]); edit(hdr)
    hb = json.dumps(hdr, separators=(",", ":")).encode(); hb += b" " * (-(8 + len(hb)) % 8)
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])

def test_header_entry_edits_are_caught(root):
    "Issue #16: F32->I32, a transposed or flattened shape, two names swapped, checksums stripped: verify_store refuses them."
    sd = {"embed.weight": torch.randn(261, 64), "other.weight": torch.randn(261, 64), "n.weight": torch.randn(64)}
    src = save_model(sd, root / "hdr_src")
    def swap(h): h["embed.weight"], h["other.weight"] = h["other.weight"], h["embed.weight"]
    def strip(h): h["__metadata__"].pop("model_ops.xxh3", None)
    edits = {"F32 -> I32": lambda h: h["embed.weight"].update(dtype="I32"), "[261,64] -> [64,261]": lambda h: h["embed.weight"].update(shape=[64, 261]),
             "[261,64] -> [16704]": lambda h: h["embed.weight"].update(shape=[16704]), "names swapped": swap, "checksums stripped": strip,
             "metadata changed": lambda h: h["__metadata__"].update(format="np")}
    with Rec("header-edit") as rec:
        for what, ed in edits.items():
            d = root / "hdr_edit"; shutil.rmtree(d, ignore_errors=True); shutil.copytree(src, d)
            _rewrite_header(d / "model.safetensors", ed)
            probe(rec, f"save_model output, {what}: verify_store", lambda: verify_store(d), _REFUSE, (str(d),))
            if what == "checksums stripped": continue        # (checkpoint files keep theirs in the manifest)
            ck = root / "hdr_ck"; shutil.rmtree(ck, ignore_errors=True); C.save(ck, model=sd, rng=False)
            _rewrite_header(ck / "model.safetensors", ed)
            probe(rec, f"checkpoint, {what}: verify", lambda: C.verify(ck), _REFUSE, (str(ck),))
            probe(rec, f"checkpoint, {what}: load", lambda: C.load(ck, rng=False), _REFUSE, (str(ck),))

def _deep(f, depth=100_000, obj=False):
    hb = (b'{"a":' * depth + b"1" + b"}" * depth) if obj else (b"[" * depth + b"]" * depth)
    f.write_bytes(struct.pack("<Q", len(hb)) + hb)

def test_deep_and_odd_headers_are_clean_errors(root, models, capsys):
    "Issue #16: a header nested 100k deep, over-long and NUL shard names, link loops: clean errors from every reader and the CLI."
    d = root / "deep"; d.mkdir()
    _deep(d / "deep.safetensors"); _deep(d / "deepobj.safetensors", obj=True)
    ck = root / "deep_ck"; C.save(ck, model={"w": torch.ones(3)}, rng=False); _deep(ck / "model.safetensors")
    folder = root / "deep_folder"; folder.mkdir(); _deep(folder / "model.safetensors")
    with Rec("clean-error") as rec:
        for f in ("deep.safetensors", "deepobj.safetensors"):
            p = d / f
            probe(rec, f"{f}: WeightStore.open", lambda: WeightStore.open(p), _REFUSE, (f,))
            probe(rec, f"{f}: verify_store", lambda: verify_store(p), _REFUSE, (f,))
            probe(rec, f"{f}: read_header", lambda: C.read_header(p), _REFUSE, (f,))
        probe(rec, "folder with a deep header: WeightStore.open", lambda: WeightStore.open(folder), _REFUSE, (str(folder),))
        probe(rec, "checkpoint with a deep header: verify", lambda: C.verify(ck), _REFUSE, (str(ck),))
        probe(rec, "checkpoint with a deep header: load", lambda: C.load(ck, rng=False), _REFUSE, (str(ck),))
        cfg = dict(models["cfg"], models=[{"model": str(folder), "parameters": {"weight": 1.0}}, models["cfg"]["models"][1]])
        from model_ops.merge import merge_config
        probe(rec, "merge_config with a deep-header input", lambda: merge_config(cfg, root / "deep_out", workers=1, progress=False), _REFUSE, (str(folder),))
        _cli(rec, capsys, "model-ops inspect on a deep header", ["inspect", str(d / "deep.safetensors")], "deep.safetensors")
        _cli(rec, capsys, "model-ops ckpt verify on a deep header", ["ckpt", "verify", str(ck)], str(ck), one_line=False)
        # shard names: over-long, NUL, a link loop, the index itself, a folder
        m = models["a"]
        for what, name in [("300-character shard name", "x" * 300 + ".safetensors"), ("NUL in shard name", "model\x00.safetensors"),
                           ("shard is a link loop", "loop.safetensors"), ("shard is the index", "model.safetensors.index.json"),
                           ("shard is a folder", "sub"), ("absolute shard name", "/etc/passwd")]:
            t = root / "names"; shutil.rmtree(t, ignore_errors=True); shutil.copytree(m, t)
            os.symlink("loop.safetensors", t / "loop.safetensors"); (t / "sub").mkdir()
            j = json.loads((t / "model.safetensors.index.json").read_text()); k = next(iter(j["weight_map"]))
            j["weight_map"][k] = name; (t / "model.safetensors.index.json").write_text(json.dumps(j))
            probe(rec, f"index with {what}: WeightStore.open", lambda: WeightStore.open(t), _REFUSE, (str(t),))
        t = root / "loopdir"; t.mkdir(); os.symlink("model.safetensors", t / "model.safetensors")
        probe(rec, "model.safetensors is a link to itself", lambda: WeightStore.open(t), _REFUSE, (str(t),))

def _cli(rec, capsys, case, argv, name, one_line=True, code=2):
    "`model-ops ARGV` must exit with `code` and print, without a traceback, a first line naming `name` (and only one line)."
    from model_ops.cli import main
    rec.n += 1
    capsys.readouterr()
    old = sys.argv; sys.argv = ["model-ops", *argv]
    try:
        with _deadline(TIMEOUT): main()
        got = None
    except SystemExit as e: got = e.code
    except Hang: sys.argv = old; return rec.fail(case, "hang")
    except BaseException as e: sys.argv = old; return rec.fail(case, f"traceback ({_ename(e)}: {_line(e)})")
    finally: sys.argv = old
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    if got != code: return rec.fail(case, f"exit status {got}, not {code}; stderr: {err[:300]!r}")
    if "Traceback" in err or not lines or name not in lines[0]: return rec.fail(case, f"first line does not name {name!r}: {err[:300]!r}")
    if one_line and len(lines) != 1: return rec.fail(case, f"{len(lines)} lines, not one: {err[:300]!r}")
    return rec.good("clean")

# --------------------------------------------------------------------------- 3. malicious pickles: no code ever runs

class Evil:
    "Unpickling this creates the file `path` (a stand-in for any code)."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (open, (self.path, "w"))

def _no_code(rec, case, fn, marker, names=()):
    "`fn` may refuse (cleanly) or succeed, but the marker file must never appear."
    if marker.exists(): marker.unlink()
    r = probe(rec, case, fn, _ANY, names)
    if marker.exists():
        marker.unlink()
        if r == "fail": rec.fails[-1] = rec.fails[-1].replace(f"{case}: ", f"{case}: RAN CODE from the file (the marker file appeared), then ", 1)
        else: rec.fail(case, "RAN CODE from the file (the marker file appeared)")

def test_malicious_pickles_never_run(root, ckpts, models):
    "Issue #16: .bin/.pt weights, DCP .metadata (with and without a re-hashed manifest), DCP extra, DeepSpeed rank and universal files, deltas, YAML tags."
    from model_ops.cli import run_cli
    from model_ops.merge import merge_config
    from model_ops.transfer import transfer
    d = root / "evil"; d.mkdir(); mk = root / "MARKER"
    ev = {"w": torch.ones(2), "x": Evil(mk)}
    with Rec("code-exec") as rec:
        # .bin / .pt / .pth weights, plain and through an index
        b = d / "bin"; b.mkdir(); torch.save(ev, b / "pytorch_model.bin")
        for ext in (".bin", ".pt", ".pth"): torch.save(ev, d / f"w{ext}"); _no_code(rec, f"WeightStore.open(w{ext})", lambda ext=ext: WeightStore.open(d / f"w{ext}"), mk, (f"w{ext}",))
        bi = d / "binidx"; bi.mkdir(); torch.save(ev, bi / "pytorch_model-00001-of-00001.bin")
        (bi / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin", "x": "pytorch_model-00001-of-00001.bin"}}))
        for what, p in [("folder with pytorch_model.bin", b), ("folder with a .bin index", bi)]:
            _no_code(rec, f"WeightStore.open({what})", lambda p=p: WeightStore.open(p), mk, (str(p),))
            _no_code(rec, f"verify_store({what})", lambda p=p: verify_store(p), mk, (str(p),))
        _no_code(rec, "model-ops inspect on a .bin", lambda: run_cli(["inspect", str(b)]), mk, (str(b),))
        _no_code(rec, "merge_config with a .bin input", lambda: merge_config(dict(models["cfg"], models=[{"model": str(b), "parameters": {"weight": 1.0}}, models["cfg"]["models"][1]]),
                                                                           root / "evil_merge", workers=1, progress=False), mk)
        _no_code(rec, "transfer from a .bin", lambda: transfer(b, models["a"], models["b"]), mk)
        # DCP: a .metadata that runs code, with the manifest re-hashed by whoever wrote the folder, and without one
        for man in (True, False):
            p = d / f"dcp_{man}"; shutil.copytree(ckpts["dcp"], p)
            (p / ".metadata").write_bytes(pickle.dumps(Evil(mk)))
            if man: _rehash_manifest(p, ".metadata")
            else: (p / "manifest.json").unlink()
            tag = "with a re-hashed manifest" if man else "without a manifest"
            _no_code(rec, f"dcp_load {tag}", lambda p=p: C.dcp_load(p, Net(1)), mk, (str(p),))
            _no_code(rec, f"dcp_load (no model) {tag}", lambda p=p: C.dcp_load(p), mk, (str(p),))
            _no_code(rec, f"dcp_to_hf {tag}", lambda p=p: C.dcp_to_hf(p, root / "evil_hf"), mk, (str(p),))
            _no_code(rec, f"model-ops ckpt convert --to hf {tag}", lambda p=p: run_cli(["ckpt", "convert", str(p), "--out", str(root / "evil_hf2")]), mk, (str(p),))
            _no_code(rec, f"checkpoint.load on the DCP folder {tag}", lambda p=p: C.load(p), mk, (str(p),))
            _no_code(rec, f"checkpoint.verify on the DCP folder {tag}", lambda p=p: C.verify(p), mk, (str(p),))
        # DCP extra: an object that runs code when loaded, in a folder dcp_save itself wrote (its manifest is genuine)
        p = C.dcp_save(d / "dcp_extra", Net(0), extra={"lr": 0.1, "x": Evil(mk)})
        assert not mk.exists()
        _no_code(rec, "dcp_load of an extra object", lambda: C.dcp_load(p, Net(1)), mk, (str(p),))
        # DeepSpeed ZeRO rank files and DeepSpeed universal files, without trust
        z = d / "zero" / "global_step4"; shutil.copytree(ckpts["zero"], z)
        for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
            orig = (z / f).read_bytes()
            obj = _ds_load(z / f); obj["evil"] = Evil(mk); _ds_write(z / f, obj)
            _no_code(rec, f"read_zero, evil {f}", lambda: C.read_zero(z), mk, (f,))
            _no_code(rec, f"ds_to_universal, evil {f}", lambda: C.ds_to_universal(z, d / "zu", overwrite=True, latest=False), mk, (f,))
            _no_code(rec, f"reshard, evil {f}", lambda: C.reshard(z, d / "zr", tp=1, overwrite=True), mk, (f,))
            _no_code(rec, f"model-ops ckpt convert --to universal, evil {f}", lambda: run_cli(["ckpt", "convert", str(z), "--out", str(d / "zc"), "--to", "universal", "--overwrite"]), mk, (f,))
            (z / f).write_bytes(orig)
        u = d / "dsu"; shutil.copytree(ckpts["dsu"], u)
        f = next(sorted(u.glob("zero/*/fp32.pt")).__iter__()); rel = str(f.relative_to(u))
        obj = _ds_load(f); obj["evil"] = Evil(mk); _ds_write(f, obj); _rehash_manifest(u, rel)
        for what, fn in [("load_deepspeed_universal", lambda: C.load_deepspeed_universal(u)), ("checkpoint.load", lambda: C.load(u)),
                         ("to_universal(folder)", lambda: C.to_universal(u)), ("reshard", lambda: C.reshard(u, d / "ur", tp=2, overwrite=True)),
                         ("load_universal_into", lambda: C.load_universal_into(u, nn.Module(), strict=False))]:
            _no_code(rec, f"{what}, evil {rel} (manifest re-hashed)", fn, mk, (str(u),))
        # deltas and recipes
        torch.save(ev, d / "delta.pt"); (d / "dd").mkdir(); torch.save(ev, d / "dd" / "delta.safetensors")
        _no_code(rec, "Delta.load of a pickle", lambda: Delta.load(d / "delta.pt"), mk, ("delta.pt",))
        _no_code(rec, "Delta.load of a pickle named delta.safetensors", lambda: Delta.load(d / "dd"), mk, ("delta.safetensors",))
        y = d / "tag.yml"; y.write_text(f"merge_method: !!python/object/apply:builtins.open [{str(mk)!r}, w]\nmodels: []\n")
        _no_code(rec, "merge_config of a !!python YAML tag", lambda: merge_config(str(y), root / "evil_yml"), mk, ("tag.yml",))
    assert not mk.exists()

# --------------------------------------------------------------------------- forked writers

def _child(fn, setup=None, names=()):
    "Fork; the child runs `setup()` then `fn()` and reports {'kind': 'ok'} or the error it raised; returns the child's pid and the pipe."
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r); torch.set_num_threads(1)
            if setup: setup()
            try: fn(); res = {"kind": "ok"}
            except BaseException as e: res = {"kind": "raise", "type": _ename(e), "msg": str(e)[:3000], "clean": _is_clean(e, names)}
            os.write(w, json.dumps(res).encode())
        except BaseException: code = 3
        finally: os._exit(code)
    os.close(w)
    return pid, r

def _wait(pid, r, timeout=60):
    "The child's report (or {'kind': 'hang'} / {'kind': 'died'})."
    buf, t0 = b"", time.time()
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, timeout - (time.time() - t0)))
        if not ready: os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); os.close(r); return {"kind": "hang"}
        chunk = os.read(r, 65536)
        if not chunk: break
        buf += chunk
    os.close(r); _, st = os.waitpid(pid, 0)
    if not buf: return {"kind": "died", "status": st}
    return json.loads(buf)

def _run_child(fn, setup=None, names=(), timeout=60): return _wait(*_child(fn, setup, names), timeout)

def _verdict(rec, case, res, must_fail=False):
    "Count a child's report: ok, or a clean error."
    rec.n += 1
    if res["kind"] == "ok": return rec.fail(case, "accepted (no error)") if must_fail else rec.good()
    if res["kind"] == "raise" and res["clean"]: return rec.good("clean")
    if res["kind"] == "raise": return rec.fail(case, f"{res['type']}: {res['msg'].strip().splitlines()[0][:300] if res['msg'].strip() else ''}")
    return rec.fail(case, f"child {res['kind']} {res.get('status', '')}")

def _kill_after(loop, delay):
    pid, r = _child(loop); time.sleep(delay); os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); os.close(r)

_FS_CALLS = ("rename", "replace")

def _count_calls(once):
    "How many os.rename / os.replace calls one write makes."
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r); torch.set_num_threads(1); n = [0]
            for name in _FS_CALLS:
                real = getattr(os, name)
                def wrap(*a, _real=real, **k): n[0] += 1; return _real(*a, **k)
                setattr(os, name, wrap)
            once(); os.write(w, str(n[0]).encode())
        finally: os._exit(0)
    os.close(w); out = os.read(r, 100); os.close(r); os.waitpid(pid, 0)
    return int(out or 0)

def _kill_at(once, k, after):
    "Run one write in a child that kills itself with SIGKILL just before (or just after) its k-th rename/replace."
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1); n = [0]
            for name in _FS_CALLS:
                real = getattr(os, name)
                def wrap(*a, _real=real, **kw):
                    n[0] += 1
                    if n[0] == k and not after: os.kill(os.getpid(), signal.SIGKILL)
                    res = _real(*a, **kw)
                    if n[0] == k and after: os.kill(os.getpid(), signal.SIGKILL)
                    return res
                setattr(os, name, wrap)
            once()
        finally: os._exit(0)
    os.waitpid(pid, 0)

# --------------------------------------------------------------------------- 4. kill -9

N_VER = 12

def _versions(sd, n=N_VER):
    "n versions of `sd`, each tagged: version i has tensor 'tag' = [i] and every float tensor shifted by i."
    return [{**{k: (v + i if v.is_floating_point() else v) for k, v in sd.items()}, "tag": torch.tensor([i])} for i in range(n)]

def _kill_checks(rec, case, out, check, reload_first=None):
    """After a killed write: the output exists and is whole, or it comes back (as the previous version) with
    `reload_first()` (a reader that must restore it itself) or `restore_aside`; no hidden leftovers after clean_tmp."""
    rec.n += 1
    try:
        if reload_first is not None:
            try:
                with _deadline(TIMEOUT): reload_first(out)
            except BaseException as e:
                restore_aside(out); clean_tmp(out.parent)
                return rec.fail(case, f"reading the output right after the kill: {_ename(e)}: {_line(e)}")
        if not out.exists() and not restore_aside(out): return rec.fail(case, "the output and its previous version are both gone")
        with _deadline(TIMEOUT): check(out)
    except Hang: return rec.fail(case, "hang")
    except BaseException as e: return rec.fail(case, f"complete-looking broken output: {_ename(e)}: {_line(e)}")
    clean_tmp(out.parent)
    left = _hidden(out.parent)
    if left: return rec.fail(case, f"clean_tmp left hidden folders {left}")
    return rec.good()

def _writers(root, models, ckpts):
    "(name, output folder, write(i) that writes version i over the output, check(out) that the output is one whole version)."
    sd = {**lm_sd(5), "big": torch.randn(256, 256, generator=torch.Generator().manual_seed(5))}      # 270 KB
    vs = _versions(sd)
    def tagged(get):      # `get(out)` -> dict with 'tag'; all other tensors must be that version's
        def check(out):
            t = get(out); i = int(t["tag"][0])
            bad = [k for k in vs[i] if k != "tag" and _canon(t[k]) != _canon(vs[i][k])]
            assert not bad and set(t) == set(vs[i]), f"mixed versions: {bad[:3]}"
        return check
    def st(out): verify_store(out); s = WeightStore.open(out); return {k: s[k] for k in s.keys()}
    def ck(out): r = C.load(out, rng=False); assert r["step"] == int(r["model"]["tag"][0]); return r["model"]
    lay = C.TPLayout()
    def tp(out): ranks, _ = C.load_tp(out); return {k.split("/", 1)[-1]: v for k, v in C.to_universal(ranks, lay)["states"]["param"].items()}
    ref_hf = root / "kill_ref_hf"; C.dcp_to_hf(ckpts["dcp"], ref_hf); ref_hf = _canon(_store(ref_hf))
    def hf(out): assert _canon(_store(out)) == ref_hf
    ref_m = _canon(_store(models["merged"]))
    def mg(out): assert _canon(_store(out)) == ref_m
    from model_ops.cli import run_cli
    k = root / "kill"
    return [
        ("save_model", k / "sm" / "out", lambda i, o: save_model(vs[i % N_VER], o, config=CFG, max_shard_size="40KB", overwrite=True), tagged(st), None),
        ("checkpoint.save", k / "ck" / "step-00000001", lambda i, o: C.save(o, model=vs[i % N_VER], step=i % N_VER, extra={"i": i}, rng=False, max_shard_size="40KB", overwrite=True),
         tagged(ck), lambda o: C.load(o, rng=False)),
        ("save_tp", k / "tp" / "out", lambda i, o: C.save_tp([{"param": {n: t for n, t in vs[i % N_VER].items()}}], o, lay, overwrite=True), tagged(tp), None),
        ("dcp_to_hf", k / "hf" / "out", lambda i, o: C.dcp_to_hf(ckpts["dcp"], o, overwrite=True), hf, None),
        ("model-ops merge", k / "mg" / "out", lambda i, o: run_cli(["merge", str(models["yml"]), str(o), "--overwrite", "--workers", "1", "--max_shard_size", "3KB"]), mg, None),
    ]

def test_kill9_writers(root, models, ckpts):
    "kill -9 at random moments and just before/after every rename: never a broken output, the previous version always comes back."
    rng = random.Random(SEED + 4)
    with Rec("kill-9") as rec:
        for name, out, write, check, reload_first in _writers(root, models, ckpts):
            out.parent.mkdir(parents=True, exist_ok=True)
            write(0, out); check(out)                                     # the previous version
            t0 = time.time(); write(1, out); dt = time.time() - t0        # how long one write takes
            def loop(): [write(i, out) for i in itertools.count(2)]
            for trial in range(5):
                delay = rng.uniform(0, 3 * dt + 0.05)
                _kill_after(loop, delay)
                _kill_checks(rec, f"{name}: kill -9 after {delay:.3f} s (one write takes {dt:.3f} s)", out, check, reload_first)
            n = _count_calls(lambda: write(3, out))
            for j in range(1, n + 1):
                for after in (False, True):
                    _kill_at(lambda: write(4 + j, out), j, after)
                    _kill_checks(rec, f"{name}: kill -9 {'after' if after else 'before'} rename {j} of {n}", out, check, reload_first)

def test_killed_rename_window_next_write_and_readers_restore(root):
    "Issue #16: a writer killed between setting the old folder aside and renaming the new one in: load, latest and the next plain write bring it back."
    dead = os.fork()
    if dead == 0: os._exit(0)
    os.waitpid(dead, 0)                                                   # a pid that no longer runs
    def aside(p):
        os.rename(p, p.parent / f".{p.name}.old-{dead}-abcd1234"); (p.parent / f".{p.name}.tmp-{dead}-abcd1234").mkdir(exist_ok=True)
    def fresh(p):
        if not p.exists(): restore_aside(p)
        aside(p); return p
    r = root / "window"
    ck = C.save(r / "ck" / "step-00000005", model={"w": torch.ones(3)}, step=5, rng=False)
    sm = save_model({"w": torch.ones(3)}, r / "sm" / "m")
    with Rec("kill-9") as rec:
        fresh(ck)
        probe(rec, "checkpoint.load of a folder set aside", lambda: C.load(ck, rng=False)["step"], _canon(5), must_work=True)
        fresh(ck)
        probe(rec, "checkpoint.latest of a root whose newest is set aside", lambda: C.latest(ck.parent), _canon(ck), must_work=True)
        fresh(ck)
        probe(rec, "a Checkpointer's next save keeps the set-aside step", lambda: (C.Checkpointer(ck.parent, keep=3).save(6, model={"w": torch.zeros(3)}, rng=False),
                                                                                  sorted(p.name for p in ck.parent.iterdir() if not p.name.startswith(".")))[1],
              _canon(["step-00000005", "step-00000006"]), must_work=True)
        fresh(ck)
        probe(rec, "the next plain checkpoint.save of another step in the root", lambda: (C.save(ck.parent / "step-00000007", model={"w": torch.zeros(3)}, rng=False),
                                                                                       C.load(ck, rng=False)["step"])[1], _canon(5), must_work=True)
        fresh(sm)
        probe(rec, "clean_tmp of the folder puts it back (a write elsewhere in the folder leaves it: only its own path is restored)", lambda: (clean_tmp(sm.parent), verify_store(sm))[1], _canon(1), must_work=True)
        fresh(sm)
        probe(rec, "the next save_model to the same folder (overwrite=False) finds it back", lambda: save_model({"w": torch.zeros(3)}, sm), _REFUSE, (str(sm),))
        probe(rec, "... with its old content", lambda: WeightStore.open(sm)["w"], _canon(torch.ones(3)), must_work=True)
        fresh(sm)
        probe(rec, "the next save_model to the same folder (overwrite=True)", lambda: (save_model({"w": torch.zeros(3)}, sm, overwrite=True), clean_tmp(sm.parent), _hidden(sm.parent))[2], _canon([]), must_work=True)

# --------------------------------------------------------------------------- 5. write failures (RLIMIT_FSIZE)

def _fsize(limit):
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return setup

def test_write_failures_are_clean_and_keep_the_previous_version(root, models, capsys):
    "save_model, merge_config, checkpoint.save and `model-ops merge` under a file-size limit: a clean error naming the output, the previous version intact, no leftovers."
    from model_ops.merge import merge_config
    from model_ops.cli import main
    sd = {**lm_sd(7), "big": torch.randn(128, 256, generator=torch.Generator().manual_seed(7))}    # largest file ~140 KB
    r = root / "fsize"
    writers = [("save_model", r / "sm" / "out", lambda o: save_model(sd, o, config=CFG, max_shard_size="200KB", overwrite=True)),
               ("merge_config", r / "mc" / "out", lambda o: merge_config(models["cfg"], o, workers=1, overwrite=True, progress=False)),
               ("checkpoint.save", r / "ck" / "out", lambda o: C.save(o, model=sd, step=1, rng=False, overwrite=True))]
    prev = lambda name, out: save_model({"prev": torch.arange(5.0)}, out) if name != "checkpoint.save" else C.save(out, model={"prev": torch.arange(5.0)}, rng=False)
    with Rec("write-failure") as rec:
        for name, out, write in writers:
            out.parent.mkdir(parents=True); prev(name, out)
            for limit in (0, 100, 4096, 20_000, 60_000):
                before, case = _tree(out), f"{name} under RLIMIT_FSIZE={limit}"
                res = _run_child(lambda: write(out), _fsize(limit), names=(str(out),))
                k = _verdict(rec, case, res, must_fail=limit <= 4096)
                if res["kind"] != "ok" and _tree(out) != before: rec.demote(k, case, "the previous version changed")
                elif res["kind"] != "ok" and _hidden(out.parent): rec.demote(k, case, f"left hidden folders {_hidden(out.parent)}")
                if res["kind"] == "ok": shutil.rmtree(out); prev(name, out)      # the limit was large enough: the previous version back
        # the CLI: exit status 2 and one line naming the output
        out = r / "cli" / "out"; out.parent.mkdir()
        for limit in (0, 2000):
            rd, wr = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(rd); os.dup2(wr, 2); sys.stderr = open(2, "w", buffering=1, closefd=False)
                    _fsize(limit)(); torch.set_num_threads(1)
                    sys.argv = ["model-ops", "merge", str(models["yml"]), str(out), "--workers", "1"]
                    try: main(); code = 0
                    except SystemExit as e: code = e.code if isinstance(e.code, int) else 1
                    except BaseException: import traceback; traceback.print_exc()
                finally: sys.stderr.flush(); os._exit(code)
            os.close(wr); err = b""
            while (c := os.read(rd, 65536)): err += c
            os.close(rd); _, st = os.waitpid(pid, 0)
            err = err.decode(errors="replace").strip(); case = f"model-ops merge under RLIMIT_FSIZE={limit}"
            rec.n += 1
            if os.WEXITSTATUS(st) != 2 or "Traceback" in err or len(err.splitlines()) != 1 or str(out) not in err:
                rec.fail(case, f"exit status {os.WEXITSTATUS(st)}, stderr {err[-400:]!r} (want 2 and one line naming {out})")
            elif out.exists() or _hidden(out.parent): rec.fail(case, "left an output or hidden folders")
            else: rec.good("clean")

# --------------------------------------------------------------------------- 6. outputs overlapping inputs

@pytest.fixture
def no_reads(monkeypatch):
    "Every path that reads an input's tensor data raises `_Read`: an operation that must refuse has to do so before."
    import model_ops.io.store as IO, model_ops.nn as NN
    import model_ops.merge.executor as MX
    import model_ops.checkpoint.core as CC, model_ops.checkpoint.dcp as CD, model_ops.checkpoint.universal as CU
    import model_ops.checkpoint.deepspeed as CDS, model_ops.checkpoint.zero as CZ
    def boom(what): 
        def f(*a, **k): raise _Read(what)
        return f
    for mod, name in [(IO._SafetensorsSource, "_read"), (IO, "_load_bin"), (MX, "read_tensor"), (CD, "_dcp_chunk"), (CC, "_read_st"),
                      (CC, "read_safetensors"), (CU, "read_safetensors"), (CDS, "_ds_load"), (CZ, "_ds_load"), (NN, "load_model")]:
        monkeypatch.setattr(mod, name, boom(f"{getattr(mod, '__name__', mod)}.{name}"))
    import torch.distributed.checkpoint as dcp
    monkeypatch.setattr(dcp, "load", boom("torch.distributed.checkpoint.load"))

def test_outputs_overlapping_inputs_are_refused(root, models, ckpts, no_reads, capsys):
    "Issue #16: an output that is, contains or lies inside an input (also through a link) is refused before anything is read; the inputs stay intact."
    from model_ops.merge import merge_config, merge
    from model_ops.transfer import transfer
    from model_ops.cli import run_cli
    ov = root / "ov"
    def fresh():
        shutil.rmtree(ov, ignore_errors=True); ov.mkdir()
        for k in ("base", "a", "b"): shutil.copytree(models[k], ov / k)
        shutil.copytree(ckpts["dcp"], ov / "dcp"); shutil.copytree(ckpts["zero"], ov / "zero" / "global_step4"); shutil.copytree(ckpts["tp"], ov / "tp")
        os.symlink("a", ov / "link_a")
        y = root / "ov.yml"; y.write_text(json.dumps(dict(models["cfg"], models=[{"model": str(ov / "a"), "parameters": {"weight": 0.5}},
                                                                                  {"model": str(ov / "b"), "parameters": {"weight": 0.5}}])))
        return y
    y = fresh()
    cfg = lambda: json.loads(y.read_text())
    outs = {"the parent of the inputs": ov, "an input": ov / "a", "a folder inside an input": ov / "a" / "sub", "a link to an input": ov / "link_a"}
    cases = []
    for what, o in outs.items():
        cases += [(f"merge_config, output = {what}", lambda o=o: merge_config(cfg(), o, overwrite=True, workers=1, progress=False)),
                  (f"merge(), output = {what}", lambda o=o: merge([ov / "a", ov / "b"], "linear", out=o, overwrite=True, workers=1, weight=[0.5, 0.5])),
                  (f"transfer, output = {what}", lambda o=o: transfer(ov / "base", ov / "b", ov / "a", out=o, overwrite=True)),
                  (f"Delta.apply to a folder, output = {what}", lambda o=o: Delta({"lm_head.weight": torch.zeros(V, H)}).apply(ov / "a", out=o, force=True, overwrite=True)),
                  (f"save_model of a WeightStore, output = {what}", lambda o=o: save_model(WeightStore.open(ov / "a"), o, overwrite=True)),
                  (f"model-ops prune, output = {what}", lambda o=o: run_cli(["prune", str(ov / "a"), str(o), "--overwrite", "--method", "magnitude", "--sparsity", "0.5"])),
                  (f"hf_to_dcp, output = {what}", lambda o=o: C.hf_to_dcp(ov / "a", o, overwrite=True))]
    for what, o in {"the parent of the input": ov, "the input": ov / "dcp", "a folder inside the input": ov / "dcp" / "sub"}.items():
        cases += [(f"dcp_to_hf, output = {what}", lambda o=o: C.dcp_to_hf(ov / "dcp", o, overwrite=True)),
                  (f"model-ops ckpt convert --to hf, output = {what}", lambda o=o: run_cli(["ckpt", "convert", str(ov / "dcp"), "--out", str(o), "--overwrite"]))]
    for what, o in {"the parent of the input": ov / "zero", "the input": ov / "zero" / "global_step4", "a folder inside the input": ov / "zero" / "global_step4" / "u"}.items():
        cases += [(f"ds_to_universal, output = {what}", lambda o=o: C.ds_to_universal(ov / "zero" / "global_step4", o, overwrite=True))]
    for what, o in {"the parent of the input": ov, "the input": ov / "tp", "a folder inside the input": ov / "tp" / "r"}.items():
        cases += [(f"reshard, output = {what}", lambda o=o: C.reshard(ov / "tp", o, tp=1, overwrite=True))]
    with Rec("overlap") as rec:
        for case, fn in cases:
            before = _tree(ov)
            k = probe(rec, case, fn, _REFUSE, ("input",))
            if _tree(ov) != before:
                diff = sorted(set(before.items()) ^ set(_tree(ov).items()))[:3]
                rec.demote(k, case, f"the inputs changed ({diff})"); y = fresh()
        # the CLI: `model-ops merge CFG OUT --overwrite` with OUT the inputs' parent deleted eight models before
        before = _tree(ov)
        case = "model-ops merge CFG PARENT-OF-INPUTS --overwrite"
        k = _cli(rec, capsys, case, ["merge", str(y), str(ov), "--overwrite", "--workers", "1"], "input")
        if _tree(ov) != before: rec.demote(k, case, "the inputs changed")

# --------------------------------------------------------------------------- 7. concurrent writers

def _race(fa, fb, names=()):
    "Run fa and fb in two children released at the same moment; their reports."
    ga, gb = os.pipe(), os.pipe()
    def gated(fn, g):
        def run(): os.close(g[1]); os.read(g[0], 1); fn()
        return run
    ca, cb = _child(gated(fa, ga), names=names), _child(gated(fb, gb), names=names)
    for g in (ga, gb): os.close(g[0])
    for g in (ga, gb): os.write(g[1], b"x"); os.close(g[1])
    return _wait(*ca), _wait(*cb)

def test_concurrent_writers(root, models):
    "Two processes writing one output (with and without overwrite) and two Checkpointers rotating one root."
    from model_ops.cli import run_cli
    vs = _versions({**lm_sd(9), "big": torch.randn(128, 256, generator=torch.Generator().manual_seed(9))}, 2)
    r = root / "race"
    def whole(out, get):
        t = get(out); i = int(t["tag"][0])
        assert all(_canon(t[k]) == _canon(vs[i][k]) for k in vs[i]), "mixed versions"
    st = lambda o: (verify_store(o), {k: WeightStore.open(o)[k] for k in WeightStore.open(o).keys()})[1]
    ck = lambda o: C.load(o, rng=False)["model"]
    with Rec("concurrent") as rec:
        for trial in range(4):
            for ow in (False, True):
                for name, write, get in [("save_model", lambda o, i, ow=ow: save_model(vs[i], o, max_shard_size="40KB", overwrite=ow), st),
                                         ("checkpoint.save", lambda o, i, ow=ow: C.save(o, model=vs[i], rng=False, overwrite=ow, max_shard_size="40KB"), ck)]:
                    out = r / f"{name}-{trial}-{ow}" / "out"; out.parent.mkdir(parents=True)
                    case = f"two {name} at once, overwrite={ow}, trial {trial}"
                    ra, rb = _race(lambda: write(out, 0), lambda: write(out, 1), names=(str(out),))
                    k = [_verdict(rec, case, res) for res in (ra, rb)][-1]
                    try:
                        if "ok" not in (ra["kind"], rb["kind"]): raise AssertionError("neither write succeeded")
                        whole(out, get); clean_tmp(out.parent)
                        assert not _hidden(out.parent), f"hidden leftovers {_hidden(out.parent)}"
                    except BaseException as e: rec.demote(k, case, f"then the output: {_ename(e)}: {_line(e)}")
        out = r / "merge" / "out"; out.parent.mkdir()
        mg = lambda: run_cli(["merge", str(models["yml"]), str(out), "--overwrite", "--workers", "1"])
        for res in _race(mg, mg, names=(str(out),)): _verdict(rec, "two `model-ops merge --overwrite` at once", res)
        probe(rec, "... the output is the merge", lambda: _store(out)["t"], _canon(_store(models["merged"])["t"]), must_work=True)
        # two processes rotating the same checkpoint root (issue #16: FileNotFoundError from rotate)
        for trial in range(2):
            cr = r / f"rot{trial}"; sd = {"w": torch.randn(64, 64)}
            def saver(parity):
                def run():
                    ck_ = C.Checkpointer(cr, keep=2); res = []
                    for step in range(parity, 24, 2):
                        try: ck_.save(step, model=sd, rng=False); res.append(None)
                        except BaseException as e: res.append(f"step {step}: {_ename(e)}: {_line(e)}")
                    (r / f"rot{trial}-{parity}.json").write_text(json.dumps(res))
                return run
            _race(saver(0), saver(1))
            for parity in (0, 1):
                f = r / f"rot{trial}-{parity}.json"
                res = json.loads(f.read_text()) if f.exists() else ["the process died"]
                for e in res:
                    rec.n += 1
                    rec.good() if e is None else rec.fail(f"two Checkpointers rotating one root, trial {trial}, saver {parity}", e)
            cs = C.list_checkpoints(cr)
            bad = [c.name for c in cs if C.verify(c, strict=False)]
            if bad or not cs: rec.demote("ok", f"rotation trial {trial}", f"broken checkpoints {bad}" if bad else "no checkpoint left")

# --------------------------------------------------------------------------- 8. clean errors and real folders

def _yml(d, name, text): p = d / name; p.write_text(text); return p

def test_cli_and_recipe_errors_are_one_clean_line(root, models, ckpts, capsys):
    "Issue #16: YAML syntax errors, !!python tags, two documents, misspelt parameters, weights summing to 0, load on a DCP folder."
    from model_ops.merge import merge_config
    d = root / "recipes"; d.mkdir()
    a, b = str(models["a"]), str(models["b"])
    ties = lambda p: f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n  - model: {a}\n    parameters: {p}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    recipes = {"syntax.yml": ("merge_method: linear\nmodels: [\n", "syntax.yml"),
               "tag.yml": ("merge_method: !!python/name:os.system\nmodels: []\n", "tag.yml"),
               "two.yml": (f"merge_method: linear\nmodels: [{{model: {a}}}]\n---\nmerge_method: linear\n", "two.yml"),
               "densty.yml": (ties("{weight: 0.5, densty: 0.5}"), "densty"),
               "zero.yml": (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: -1.0}}\n", "weight"),
               "nomethod.yml": (f"merge_method: nosuch\nmodels: [{{model: {a}}}]\n", "nosuch")}
    with Rec("clean-error") as rec:
        for f, (text, name) in recipes.items():
            p = _yml(d, f, text)
            r = probe(rec, f"merge_config({f})", lambda: merge_config(str(p), d / f"out_{f}", workers=1, progress=False), _REFUSE, (name,))
            if f == "zero.yml" and r == "clean":
                try: merge_config(str(p), d / "out_zero2", workers=1, progress=False)
                except ValueError as e:
                    if "overflow" in str(e): rec.demote(r, "merge_config(zero.yml)", f"says {_line(e)!r} instead of what is wrong (the weights sum to 0)")
            _cli(rec, capsys, f"model-ops merge {f}", ["merge", str(p), str(d / f"cli_{f}"), "--workers", "1"], name)
        _cli(rec, capsys, "model-ops merge into an existing folder", ["merge", str(models["yml"]), str(models["a"]), "--workers", "1"], str(models["a"]))
        _cli(rec, capsys, "model-ops merge of a missing recipe", ["merge", str(d / "missing.yml"), str(d / "o"), "--workers", "1"], "missing.yml")
        _cli(rec, capsys, "model-ops inspect of a missing folder", ["inspect", str(d / "nothing")], "nothing")
        _cli(rec, capsys, "model-ops ckpt convert of a folder that is not a checkpoint", ["ckpt", "convert", str(models["a"]), "--out", str(d / "c")], str(models["a"]))
        want = _canon({"sd": Net(0).state_dict()})
        probe(rec, "checkpoint.load on a DCP folder", lambda: (lambda m: {"sd": (C.load(ckpts["dcp"], m), m.state_dict())[1]})(Net(5)), want, (str(ckpts["dcp"]),))

def test_hugging_face_cache_and_links(root, models):
    "Issue #16: a Hugging Face cache snapshot (links into blobs/) opens; links leaving the repo or the folder are refused."
    src = models["a"]
    repo = root / "hub" / "models--org--tiny"; blobs = repo / "blobs"; snap = repo / "snapshots" / "rev1"
    blobs.mkdir(parents=True); snap.mkdir(parents=True)
    for f in src.iterdir():
        h = hashlib.sha256(f.read_bytes()).hexdigest(); shutil.copy(f, blobs / h); os.symlink(f"../../blobs/{h}", snap / f.name)
    want = _canon(_store(src))
    with Rec("real-folder") as rec:
        probe(rec, "HF cache snapshot: verify_store + read", lambda: _store(snap), want, must_work=True)
        bad = repo / "snapshots" / "rev2"; shutil.copytree(snap, bad, symlinks=True)
        out = root / "hub" / "outside.safetensors"; shard = sorted(src.glob("*.safetensors"))[0]; shutil.copy(shard, out)
        (bad / shard.name).unlink(); os.symlink(f"../../../{out.name}", bad / shard.name)
        probe(rec, "HF cache snapshot with a shard linking outside the repo", lambda: _store(bad), _REFUSE, (str(bad),))
        plain = root / "plain"; plain.mkdir(); os.symlink(out, plain / "x.safetensors")
        probe(rec, "folder without index whose *.safetensors links outside it", lambda: _store(plain), _REFUSE, (str(plain),))
        plain2 = root / "plain2"; shutil.copytree(src, plain2); (plain2 / shard.name).unlink(); os.symlink(src / shard.name, plain2 / shard.name)
        probe(rec, "indexed folder whose shard links into another model", lambda: _store(plain2), _REFUSE, (str(plain2),))

def test_fifos_never_hang(root, ckpts, models):
    "My own: a FIFO in place of a file (a reader that opens it would wait forever) must be refused, not waited on."
    cases = [("training checkpoint, state.json", ckpts["training"], "state.json", lambda d: C.load(d, rng=False)),
             ("training checkpoint, state.json (verify)", ckpts["training"], "state.json", lambda d: C.verify(d)),
             ("training checkpoint, manifest.json", ckpts["training"], "manifest.json", lambda d: C.load(d, rng=False)),
             ("universal, universal.json", ckpts["universal"], "universal.json", lambda d: C.load_universal(d)),
             ("DCP, .metadata", ckpts["dcp"], ".metadata", lambda d: C.dcp_load(d, Net(1))),
             ("DCP, .metadata (dcp_to_hf)", ckpts["dcp"], ".metadata", lambda d: C.dcp_to_hf(d, d.parent / "fifo_hf")),
             ("model folder, config.json", models["a"], "config.json", lambda d: _store(d)),
             ("model folder, index", models["a"], "model.safetensors.index.json", lambda d: _store(d)),
             ("ZeRO folder, model states", ckpts["zero"], "mp_rank_00_model_states.pt", lambda d: C.read_zero(d))]
    with Rec("hang") as rec:
        for i, (what, src, f, fn) in enumerate(cases):
            d = root / "fifo" / str(i) / src.name; shutil.copytree(src, d); (d / f).unlink(); os.mkfifo(d / f)
            try: probe(rec, what, lambda: fn(d), _ANY, (str(d),), timeout=3)
            finally:        # release any thread still blocked opening the FIFO
                try: os.close(os.open(d / f, os.O_WRONLY | os.O_NONBLOCK))
                except OSError: pass

def test_paths_leaving_a_checkpoint_folder_are_refused(root, ckpts):
    "My own: a (re-hashed) manifest or DCP metadata naming a file outside the folder is refused, as io refuses such index entries."
    from torch.distributed.checkpoint import FileSystemReader
    d = root / "escape"; d.mkdir()
    with Rec("path-escape") as rec:
        ck = d / "ck"; shutil.copytree(ckpts["training"], ck)
        m = json.loads((ck / "manifest.json").read_text()); f0 = m["model_files"][0]
        shutil.copy(ck / f0, d / "outside.safetensors")
        m["model_files"][0] = "../outside.safetensors"; m["files"]["../outside.safetensors"] = m["files"].pop(f0); (ck / f0).unlink()
        m["manifest_sha256"] = _manifest_hash(m); (ck / "manifest.json").write_text(json.dumps(m, indent=1))
        probe(rec, "checkpoint.load, manifest names ../outside.safetensors", lambda: C.load(ck, rng=False), _REFUSE, (str(ck),))
        probe(rec, "checkpoint.verify, manifest names ../outside.safetensors", lambda: C.verify(ck), _REFUSE, (str(ck),))
        dc = d / "dcp"; shutil.copytree(ckpts["dcp"], dc); (dc / "manifest.json").unlink()
        md = FileSystemReader(str(dc)).read_metadata()
        (d / "elsewhere").mkdir(); shutil.move(dc / "__0_0.distcp", d / "elsewhere" / "__0_0.distcp")
        for info in md.storage_data.values(): info.relative_path = "../elsewhere/__0_0.distcp"
        md.storage_meta = None
        (dc / ".metadata").write_bytes(pickle.dumps(md))
        probe(rec, "dcp_to_hf, DCP metadata names ../elsewhere/__0_0.distcp", lambda: C.dcp_to_hf(dc, d / "hf"), _REFUSE, (str(dc),))
        probe(rec, "dcp_load, DCP metadata names ../elsewhere/__0_0.distcp", lambda: C.dcp_load(dc, Net(1)), _REFUSE, (str(dc),))
