"""Every editor, unlearner and pruner on the six architecture families (tiny random models, one core, about a minute):
Llama (separate projections; Mistral/Qwen2 share its layout), Phi-3 (fused qkv_proj and gate_up_proj), Gemma and Gemma-2
(tied embeddings, RMSNorm with +1, Gemma-2's four norms per block), GPT-2 (Conv1D, transposed weights, fused c_attn) and
GPT-NeoX (fused query_key_value stored head by head). Layers and projections are found by `model_ops.nn.arch_spec`."""
import tempfile, warnings
import pytest, torch
from torch import nn
from transformers import AutoModelForCausalLM

from model_ops.nn import (tiny_model, tiny_tokenizer, arch_spec, decoder_layers, weight_2d, set_weight_2d, fused_rows,
                          block_proj, mlp_down, capture)
import model_ops.edit as E
from model_ops.edit import rome, memit, emmet, alphaedit, ft, ultraedit, grace
from model_ops.unlearn import (gradient_ascent, grad_diff, npo, simnpo, rmu, negate, relabel, rmu_params, evaluate_unlearning,
                               finetune)
from model_ops.prune import prune, prunable, sparsity_report, save_pruned, prune_width, prune_depth, importance

warnings.filterwarnings("ignore", message="target_new")
FAMILIES = ["llama", "phi3", "gemma", "gemma2", "gpt2", "gpt_neox"]
TOK = tiny_tokenizer()
IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model(arch, **kw):
    "A tiny model with large random weights (initializer_range 0.3), so that edits and unlearning have a visible effect."
    return tiny_model(arch, initializer_range=0.3, **kw)

def state(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}
def same(m, s): return all(torch.equal(s[k], v) for k, v in m.state_dict().items())

def reload_logits(m):
    "Save with `save_pruned`, reload with `AutoModelForCausalLM.from_pretrained`; the max logit difference."
    with tempfile.TemporaryDirectory() as d:
        save_pruned(m, f"{d}/m", TOK)
        r = AutoModelForCausalLM.from_pretrained(f"{d}/m", attn_implementation="eager").eval()
    with torch.no_grad(): return float((r(X).logits - m(X).logits).abs().max()), r


# ---- locating ----

EXPECT = {  # (attention roles, MLP roles, norm roles, conv1d, tied, qkv layout)
    "llama": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, {"attn", "mlp"}, False, False, None),
    "mistral": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, {"attn", "mlp"}, False, False, None),
    "qwen2": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, {"attn", "mlp"}, False, True, None),
    "phi3": ({"qkv", "o"}, {"gate_up", "down"}, {"attn", "mlp"}, False, False, "stacked"),
    "gemma": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, {"attn", "mlp"}, False, True, None),
    "gemma2": ({"q", "k", "v", "o"}, {"gate", "up", "down"}, {"attn", "attn_post", "mlp", "mlp_post"}, False, True, None),
    "gpt2": ({"qkv", "o"}, {"up", "down"}, {"attn", "mlp"}, True, True, "stacked"),
    "gpt_neox": ({"qkv", "o"}, {"up", "down"}, {"attn", "mlp"}, False, False, "per_head"),
}

@pytest.mark.parametrize("arch", list(EXPECT))
def test_locator_roles_and_shapes(arch):
    m = tiny_model(arch)
    s = arch_spec(m)
    attn, mlp, norms, conv, tied, layout = EXPECT[arch]
    assert (set(s.attn), set(s.mlp), set(s.norms), s.conv1d, s.tied, s.qkv_layout) == (attn, mlp, norms, conv, tied, layout)
    mods = dict(m.named_modules())
    H, KV, d = s.heads
    D, I = s.hidden, s.intermediate
    for i in range(s.n_layers):
        w = {r: weight_2d(block_proj(m, i, r)).shape for r in list(s.attn) + list(s.mlp)}
        assert w["o"] == (D, H * d) and w["down"] == (D, I)
        if "qkv" in w: assert w["qkv"] == ((H + 2 * KV) * d, D)
        else: assert (w["q"], w["k"], w["v"]) == ((H * d, D), (KV * d, D), (KV * d, D))
        if "gate_up" in w: assert w["gate_up"] == (2 * I, D)
        else: assert w["up"] == (I, D) and w.get("gate", (I, D)) == (I, D)
        for n in s.norms.values(): assert mods[f"{s.layers}.{i}.{n}"].weight.shape == (D,)
    assert mods[s.embed] is m.get_input_embeddings() and mods[s.lm_head] is m.get_output_embeddings()
    assert mods[s.final_norm].weight.shape == (D,)


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "gpt_neox"])
def test_fused_qkv_rows_follow_the_heads(arch):
    "Zeroing the rows `fused_rows` calls v makes every value zero, hence the attention output's input; q, k, v partition the rows."
    m = tiny_model(arch); s = arch_spec(m)
    qkv = block_proj(m, 0, "qkv")
    parts = [fused_rows(s, p) for p in "qkv"]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(weight_2d(qkv).shape[0]))
    W = weight_2d(qkv).detach().clone(); W[parts[2]] = 0
    set_weight_2d(qkv, W)
    if getattr(qkv, "bias", None) is not None:
        with torch.no_grad(): qkv.bias[parts[2]] = 0
    with capture(block_proj(m, 0, "o"), outputs=False) as cap, torch.no_grad(): m(X)
    assert cap.input.abs().max() == 0


def test_set_weight_2d_writes_conv1d_transposed():
    m = tiny_model("gpt2"); c = mlp_down(m, 0)
    W = torch.randn(weight_2d(c).shape)
    set_weight_2d(c, W)
    assert torch.equal(c.weight, W.T)
    with pytest.raises(ValueError, match=r"has a \(64, 256\) weight"): set_weight_2d(c, W.T)


def test_unlocatable_architecture_errors_name_the_class():
    class Block(nn.Module):
        def __init__(self): super().__init__(); self.ff = nn.Linear(8, 8)
        def forward(self, x): return self.ff(x)
    class Odd(nn.Module):
        def __init__(self):
            super().__init__(); self.emb = nn.Embedding(10, 8); self.layers = nn.ModuleList([Block(), Block()])
        def forward(self, input_ids):
            x = self.emb(input_ids)
            for b in self.layers: x = b(x)
            return x
    assert len(decoder_layers(Odd())) == 2
    with pytest.raises(ValueError, match=r"could not locate attention and MLP in layers.0 of Odd: expected 4 groups .* found 1: \[\['ff'\]\]"):
        arch_spec(Odd())
    with pytest.raises(ValueError, match="could not locate the transformer blocks of Linear"): arch_spec(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="could not locate attention and MLP in layers.0 of Odd"): rmu_params(Odd(), 1)
    with pytest.raises(ValueError, match="could not locate attention and MLP in layers.0 of Odd"): prune_depth(Odd(), n=1)


def test_spec_is_cached_and_retraced_when_the_block_changes():
    m = tiny_model("llama")
    a = arch_spec(m)
    m.model.layers[0].mlp.down_proj = nn.Linear(128, 64)           # same structure: same answer
    assert arch_spec(m) == a
    for l in m.model.layers: l.mlp.extra = nn.Linear(64, 64)       # a new module in the block: traced again, unchanged roles
    assert arch_spec(m).mlp == a.mlp
    m.model.layers[0] = nn.Identity()                              # a stand-in for block 0 (as CachedPrefix does): still found
    assert decoder_layers(m) is m.model.layers and arch_spec(m).mlp == a.mlp


# ---- editors ----

REQS = [{"prompt": "Where is the Eiffel Tower", "subject": "Eiffel Tower", "target_new": "R"},
        {"prompt": "Who wrote Hamlet", "subject": "Hamlet", "target_new": "Q"}]
EDITORS = [rome, memit, emmet, alphaedit, ft, ultraedit, grace]
MARGIN = 1.0   # every target's log-probability rises by more than 1 nat

@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory): return str(tmp_path_factory.mktemp("stats"))

def edit_kw(fn, cache):
    if fn is ft: return dict(norm_constraint=None, lr=5e-2, steps=30)
    if fn is ultraedit: return dict(lr=0.3)
    if fn is grace: return {}
    kw = dict(cache_dir=cache, n_tokens=1000, max_length=64, progress=False, steps=30)
    if fn in (memit, emmet): kw.update(mom2_weight=1.0)
    if fn is alphaedit: kw.update(nullspace_threshold=0.3, relative=True)
    return kw

def logps(m):
    return torch.tensor([-s["nll"] for s in E.score_targets(m, TOK, [r["prompt"] for r in REQS], [r["target_new"] for r in REQS])])

@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("fn", EDITORS, ids=lambda f: f.__name__)
def test_edit_lands_and_reverts(arch, fn, stats_dir):
    m = model(arch, num_hidden_layers=3); s0 = state(m); lp0 = logps(m)
    reqs = REQS + [{"prompt": "The best fruit is the", "target_new": "K"}] if fn is ultraedit else REQS
    rec = fn(m, TOK, reqs, **edit_kw(fn, stats_dir))
    lp1 = logps(m)
    assert (lp1 - lp0).min() > MARGIN, (lp0, lp1)
    if fn is not grace:                               # the weights written are MLP output projections, found structurally
        spec = arch_spec(m)
        downs = {f"{spec.block(i, 'down')}.weight" for i in range(spec.n_layers)}
        assert rec.delta.names and set(rec.delta.names) <= downs, rec.delta.names
    rec.revert()
    assert same(m, s0) and torch.equal(logps(m), lp0)


# ---- unlearners ----

FORGET = [dict(prompt="Alice lives in", answer=" Paris"), dict(prompt="Bob likes", answer=" tea")]
RETAIN = [dict(prompt="Carol is a", answer=" pilot"), dict(prompt="Dan owns a", answer=" dog")]
UNLEARNERS = [gradient_ascent, grad_diff, npo, simnpo, rmu, negate]

def forget_prob(m): return evaluate_unlearning(m, TOK, forget=FORGET, retain=RETAIN, texts=False)["forget_prob"]

@pytest.fixture(scope="module")
def taught():
    "Per family, weights of a tiny model fine-tuned until it answers all four facts (a random model has nothing to forget)."
    out = {}
    def get(arch):
        if arch not in out:
            m = tiny_model(arch)
            finetune(m, TOK, data=FORGET + RETAIN, lr=1e-2, epochs=60, until_acc=1.0, batch_size=4, check_every=5)
            out[arch] = state(m)
        m = tiny_model(arch); m.load_state_dict(out[arch])
        return m
    return get

@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("fn", UNLEARNERS, ids=lambda f: f.__name__)
def test_unlearning_lowers_forget_and_reverts(arch, fn, taught):
    m = taught(arch); s0 = state(m)
    p0 = forget_prob(m)
    kw = dict(lr=1e-2, epochs=8, batch_size=4) if fn is not rmu else dict(lr=1e-2, epochs=8, batch_size=4, layer=1)
    rec = fn(m, TOK, forget=FORGET, retain=RETAIN, **kw)
    if fn is rmu:    # RMU's forget loss: distance of layer-1 activations to a random target; it trains the located down projections
        assert set(rec.names) == set(rmu_params(m, 1)) and rec.history[-1]["forget"] < 0.5 * rec.history[0]["forget"]
    else: assert p0 > 0.5 and forget_prob(m) < 0.7 * p0, (p0, forget_prob(m))
    rec.revert()
    assert same(m, s0) and forget_prob(m) == p0

@pytest.mark.parametrize("arch", FAMILIES)
def test_relabel_is_for_classifiers(arch):
    with pytest.raises(TypeError, match="classifiers"): relabel(tiny_model(arch), TOK, forget=FORGET)


# ---- pruners ----

@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method,kw", [("magnitude", dict(sparsity=0.5)), ("wanda", dict(sparsity=0.5)),
                                       ("sparsegpt", dict(sparsity=0.5)), ("wanda", dict(pattern="2:4")),
                                       ("magnitude", dict(pattern="4:8"))], ids=["magnitude", "wanda", "sparsegpt", "wanda-2:4", "magnitude-4:8"])
def test_pruning_sparsity_and_reload(arch, method, kw):
    m = tiny_model(arch)
    emb = m.get_input_embeddings().weight.detach().clone()
    prune(m, method=method, calib=IDS, progress=False, **kw)
    mods = prunable(m)
    spec = arch_spec(m)
    roles = {spec.block(i, r) for i in range(spec.n_layers) for r in list(spec.attn) + list(spec.mlp)}
    assert set(mods) == roles                                  # exactly the block projections
    for n, mod in mods.items():
        W = weight_2d(mod)
        assert float((W == 0).float().mean()) == 0.5, n
        if "pattern" in kw:
            k, g = map(int, kw["pattern"].split(":"))
            assert ((W == 0).reshape(W.shape[0], -1, g).sum(-1) == k).all(), n
    assert sparsity_report(m)["overall"] == 0.5 and torch.equal(m.get_input_embeddings().weight, emb)
    diff, _ = reload_logits(m)
    assert diff == 0


@pytest.mark.parametrize("arch", FAMILIES)
def test_prune_width_reloads(arch):
    m = tiny_model(arch, num_hidden_layers=3)
    s = arch_spec(m)
    full = arch not in ("gpt2", "gpt_neox")   # GPT-2/NeoX derive head size from the hidden size: only MLP width can shrink
    kw = dict(hidden=48, intermediate=64, heads=2) if full else dict(intermediate=64)
    small = prune_width(m, calib=IDS, **kw)
    t = arch_spec(small)
    assert (t.intermediate, t.hidden) == (64, 48 if full else s.hidden)
    if full: assert t.heads == (2, 2, s.heads[2])
    diff, r = reload_logits(small)
    assert diff < 1e-5 and sum(p.numel() for p in r.parameters()) < sum(p.numel() for p in m.parameters())
    if not full:
        with pytest.raises(ValueError, match=f"{type(m).__name__} cannot take these sizes"):
            prune_width(m, calib=IDS, hidden=48)


@pytest.mark.parametrize("arch", ["phi3", "gemma2", "gpt2", "gpt_neox"])
def test_prune_width_slices_fused_projections_consistently(arch):
    "Silence the neurons (and for grouped attention the heads) to be dropped: the pruned model computes the same function."
    m = tiny_model(arch, num_hidden_layers=2)
    s, sc = arch_spec(m), importance(m, calib=IDS)
    H, KV, d = s.heads
    heads = 2 if KV < H else None
    with torch.no_grad():
        for i in range(s.n_layers):
            drop = torch.topk(sc["ffn"][i], s.intermediate - 64, largest=False).indices
            weight_2d(block_proj(m, i, "down"))[:, drop] = 0
            if heads:
                g = sc["heads"][i].reshape(KV, H // KV)
                for j in range(KV):
                    h = j * (H // KV) + int(g[j].argmin())
                    weight_2d(block_proj(m, i, "o"))[:, h * d:(h + 1) * d] = 0
    small = prune_width(m, scores=sc, intermediate=64, heads=heads)
    with torch.no_grad(): torch.testing.assert_close(small(X).logits, m(X).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_prune_depth_reloads(arch):
    m = tiny_model(arch, num_hidden_layers=3)
    small = prune_depth(m, calib=IDS, n=1)
    assert len(decoder_layers(small)) == 2 and small.config.num_hidden_layers == 2
    diff, r = reload_logits(small)
    assert diff < 1e-5 and len(decoder_layers(r)) == 2
