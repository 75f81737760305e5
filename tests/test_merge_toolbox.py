"""mergekit's toolbox in model_ops: `extract_lora` against `mergekit-extract-lora` (bit for bit, float32 and bfloat16), the
adapter loaded by PEFT reproducing the fine-tune (to float rounding at full rank, to the truncated SVD below it), the rank
rules, the CLI, and a round trip through a `base+adapter` recipe."""
import json, subprocess
import pytest, torch
from mergekit_runs import mergekit_cmd
from model_ops.io import WeightStore, save_model
from model_ops.nn import tiny_model
from model_ops.merge.toolbox import extract_lora, lora_rank, lora_factors
from model_ops.merge.api import merge_config

HIDDEN = 64

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    "A tiny Llama base and a dense fine-tune of it (every weight moved), in float32 and bfloat16: {(tag, 'base'|'ft'): folder}."
    root = tmp_path_factory.mktemp("toolbox")
    m = tiny_model("llama", num_hidden_layers=2)
    cfg = m.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    P = {}
    for tag, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        P[tag, "base"] = save_model(sd, root / f"base_{tag}", config=cfg, dtype=dt)
        P[tag, "ft"] = save_model(ft, root / f"ft_{tag}", config=cfg, dtype=dt)
    P["root"] = root
    return P

def _adapter_tensors(d):
    s = WeightStore.open(d / "adapter_model.safetensors")
    return {k: s[k] for k in s.keys()}

@pytest.mark.parametrize("tag,args,kw", [
    ("f32", ["--max-rank", "8"], dict(max_rank=8)),
    ("bf16", ["--max-rank", "16", "--embed-lora", "--sv-epsilon", "0.2"], dict(max_rank=16, embed_lora=True, sv_epsilon=0.2)),
])
def test_extract_lora_same_as_mergekit(pair, tag, args, kw):
    root = pair["root"]
    mk, ours = root / f"mk_{tag}", root / f"ours_{tag}"
    r = subprocess.run([mergekit_cmd("mergekit-extract-lora"), "--model", str(pair[tag, "ft"]), "--base-model", str(pair[tag, "base"]),
                        "--out-path", str(mk), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    extract_lora(pair[tag, "base"], pair[tag, "ft"], ours, **kw)
    a, b = _adapter_tensors(mk), _adapter_tensors(ours)
    assert sorted(a) == sorted(b)
    for k in a: assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (mk, ours))
    for k in ca:     # target_modules: mergekit lists a set (its order changes from run to run)
        assert (sorted(ca[k]) == sorted(cb[k])) if k == "target_modules" else ca[k] == cb[k], k
    if kw.get("sv_epsilon"): assert ca["rank_pattern"], "the epsilon should cut some modules below the largest rank"

def _logits(model, ids): 
    with torch.no_grad(): return model(ids).logits

def test_full_rank_adapter_reproduces_the_finetune(pair, tmp_path):
    "At full rank (64 = the hidden size), PEFT's base + adapter gives the fine-tune's logits to float rounding; at rank 4 it does not."
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    ids = torch.randint(0, 261, (2, 12), generator=torch.Generator().manual_seed(1))
    tuned = _logits(AutoModelForCausalLM.from_pretrained(pair["f32", "ft"]), ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(pair["f32", "base"]), ids)
    errs = {}
    for r in (4, HIDDEN * 2):
        extract_lora(pair["f32", "base"], pair["f32", "ft"], tmp_path / f"r{r}", max_rank=r)
        m = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pair["f32", "base"]), str(tmp_path / f"r{r}"))
        errs[r] = (_logits(m, ids) - tuned).abs().max().item()
    assert errs[HIDDEN * 2] < 1e-4, errs
    assert 1e-3 < errs[4] < (base - tuned).abs().max().item(), errs

def test_factors_are_the_truncated_svd():
    "B A is the best rank-r approximation: the error's squared norm is the sum of the squared singular values left out."
    g = torch.Generator().manual_seed(3)
    d = torch.randn(48, 32, generator=g, dtype=torch.float64).float()
    s = torch.linalg.svdvals(d.double())
    for r in (1, 5, 32):
        A, B = lora_factors(d, max_rank=r)
        assert A.shape == (r, 32) and B.shape == (48, r)
        err = ((d.double() - (B @ A).double()) ** 2).sum()
        assert torch.isclose(err, (s[r:] ** 2).sum(), rtol=1e-4, atol=1e-6), (r, err)
    A, B = lora_factors(d, max_rank=8, distribute_scale=False)
    A2, B2 = lora_factors(d, max_rank=8)
    assert torch.allclose(B @ A, B2 @ A2, atol=1e-5) and not torch.allclose(A, A2)

def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])          # squared: 16, 4, 1, 0.25 (sum 21.25)
    assert lora_rank(s, max_rank=128) == 4 and lora_rank(s, max_rank=2) == 2
    assert lora_rank(s, sv_epsilon=1.0) == 2            # strictly above the epsilon, as mergekit
    assert lora_rank(s, energy=16 / 21.25) == 1 and lora_rank(s, energy=0.76) == 2 and lora_rank(s, energy=1.0) == 4
    assert lora_rank(s, energy=0.99, max_rank=2) == 2
    assert lora_rank(torch.zeros(3), energy=0.9) == 1

def test_energy_threshold_picks_ranks_per_module(pair, tmp_path):
    extract_lora(pair["f32", "base"], pair["f32", "ft"], tmp_path / "e", energy=0.5)
    cfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    t = _adapter_tensors(tmp_path / "e")
    ranks = {k: v.shape[0] for k, v in t.items() if k.endswith("lora_A.weight")}
    assert cfg["r"] == max(ranks.values()) and cfg["lora_alpha"] == cfg["r"]
    for k, r in ranks.items():   # each module: the smallest rank holding half of its delta's squared norm
        name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
        d = WeightStore.open(pair["f32", "ft"])[name] - WeightStore.open(pair["f32", "base"])[name]
        e = torch.cumsum(torch.linalg.svdvals(d) ** 2, 0)
        assert e[r - 1] >= 0.5 * e[-1] and (r == 1 or e[r - 2] < 0.5 * e[-1]), (k, r)
        if r != cfg["r"]: assert cfg["rank_pattern"][name.removesuffix(".weight")] == r

def test_adapter_round_trip_through_a_recipe(pair, tmp_path):
    "extract_lora then `base+adapter` in a recipe: at full rank the merged model is the fine-tune (to float rounding)."
    extract_lora(pair["f32", "base"], pair["f32", "ft"], tmp_path / "ad", max_rank=HIDDEN * 2)
    out = merge_config(f"merge_method: passthrough\nmodels:\n  - model: {pair['f32', 'base']}+{tmp_path / 'ad'}\n", tmp_path / "m")
    got, want = WeightStore.open(out), WeightStore.open(pair["f32", "ft"])
    assert sorted(got.keys()) == sorted(want.keys())
    for k in want.keys(): assert torch.allclose(got[k], want[k], atol=1e-5), k

def test_cli_and_errors(pair, tmp_path):
    from model_ops.cli import run_cli
    p = run_cli(["extract-lora", str(pair["f32", "base"]), str(pair["f32", "ft"]), str(tmp_path / "c"), "--rank", "3"])
    assert json.loads((p / "adapter_config.json").read_text())["r"] == 3
    with pytest.raises(ValueError, match="energy must be in"): extract_lora(pair["f32", "base"], pair["f32", "ft"], tmp_path / "x", energy=1.5)
    with pytest.raises(ValueError, match="is the input"): extract_lora(pair["f32", "base"], pair["f32", "ft"], pair["f32", "ft"], overwrite=True)
    with pytest.raises(ValueError, match="no module was factored"):
        extract_lora(pair["f32", "base"], pair["f32", "ft"], tmp_path / "y", include=["nothing_matches"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

# ---- moe ----
from model_ops.nn import tiny_tokenizer
from model_ops.merge.toolbox import moe

def _experts(root, n_layers):
    "A tiny Llama base (with a tokenizer) and two experts that differ from it only in their MLPs."
    m = tiny_model("llama", num_hidden_layers=n_layers)
    cfg = m.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    P = {"base": save_model(sd, root / "base", config=cfg)}
    for i, n in enumerate("ab"):
        g = torch.Generator().manual_seed(10 + i)
        P[n] = save_model({k: v + (0.1 * torch.randn(v.shape, generator=g) if ".mlp." in k else 0) for k, v in sd.items()},
                          root / n, config=cfg)
    for p in P.values(): tiny_tokenizer().save_pretrained(p)
    P["root"] = root
    return P

@pytest.fixture(scope="module")
def experts(tmp_path_factory): return _experts(tmp_path_factory.mktemp("moe"), 2)

def _moe_recipe(P, mode, k=1, extra_a="", extra_b=""):
    return (f"base_model: {P['base']}\ngate_mode: {mode}\nexperts_per_token: {k}\nexperts:\n"
            f"  - source_model: {P['a']}\n    positive_prompts: ['aaaaaaaa']\n{extra_a}"
            f"  - source_model: {P['b']}\n    positive_prompts: ['bbbbbbbb']\n{extra_b}")

@pytest.mark.parametrize("mode", ["hidden", "random"])
def test_moe_same_as_mergekit(experts, mode):
    root = experts["root"]
    y = root / f"{mode}.yml"
    y.write_text(_moe_recipe(experts, mode, 2, "    noise_scale: 0.01\n", "    residual_scale: 0.5\n"))
    r = subprocess.run([mergekit_cmd("mergekit-moe"), str(y), str(root / f"mk_{mode}"), "--random-seed", "5", "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.manual_seed(5)
    moe(y, root / f"ours_{mode}")
    a, b = WeightStore.open(root / f"mk_{mode}"), WeightStore.open(root / f"ours_{mode}")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys(): assert torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((root / f"{w}_{mode}" / "config.json").read_text()) for w in ("mk", "ours"))
    for k in ("architectures", "num_local_experts", "num_experts_per_tok", "hidden_size", "num_hidden_layers", "vocab_size"): assert ca[k] == cb[k], k

@pytest.mark.parametrize("n_layers", [1, 2])
def test_moe_reproduces_the_experts_it_routes_to(experts, tmp_path, n_layers):
    """One expert per token, gates from the prompts' hidden states. A prompt of one repeated token has the same hidden state
    at every position, so all its tokens take one expert per layer. The mixture's logits then equal those of the dense model
    with that expert's MLP in each layer, and equal an expert's own logits where every layer picks that expert. The
    first layer's router sends each prompt to its own expert (the gate is that prompt's embedding direction): a one-layer
    mixture reproduces each expert on its own prompt. (In the second layer of this random model, the router's input, after
    attention and the norm, no longer points the way of the layer's input, from which the gate was made.)"""
    from transformers import AutoModelForCausalLM
    if n_layers != 2: experts = _experts(tmp_path, n_layers)
    out = moe(_moe_recipe(experts, "hidden"), tmp_path / "m")
    mm = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(mm).__name__ == "MixtralForCausalLM"
    tok, dense = tiny_tokenizer(), {n: WeightStore.open(experts[n]) for n in "ab"}
    whole = 0
    for e, text in enumerate(("aaaaaaaa", "bbbbbbbb")):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad(): o = mm(ids, output_router_logits=True)
        picks = []
        for layer, rl in enumerate(o.router_logits):        # (tokens, experts) per layer
            k = rl.argmax(-1)
            assert (k == k[0]).all(), (text, layer)
            picks.append(int(k[0]))
        assert picks[0] == e, picks
        ref = AutoModelForCausalLM.from_pretrained(experts["base"]).eval()
        sd = ref.state_dict()
        for layer, k in enumerate(picks):
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[f"model.layers.{layer}.mlp.{n}.weight"] = dense["ab"[k]][f"model.layers.{layer}.mlp.{n}.weight"]
        ref.load_state_dict(sd)
        assert torch.allclose(o.logits, _logits(ref, ids), atol=1e-5)
        if set(picks) == {e}:
            whole += 1
            assert torch.allclose(o.logits, _logits(AutoModelForCausalLM.from_pretrained(experts["ab"[e]]).eval(), ids), atol=1e-5)
        assert not torch.allclose(o.logits, _logits(AutoModelForCausalLM.from_pretrained(experts["ab"[1 - e]]).eval(), ids), atol=1e-3)
    if n_layers == 1: assert whole == 2      # each prompt went to its own expert, whose logits the mixture gives

def test_moe_errors(experts, tmp_path):
    P = experts
    with pytest.raises(ValueError, match="shared_experts"):
        moe({"base_model": P["base"], "experts": [{"source_model": P["a"]}], "shared_experts": [{"source_model": P["b"]}]}, tmp_path / "x")
    with pytest.raises(ValueError, match="no positive_prompts"):
        moe({"base_model": P["base"], "experts": [{"source_model": P["a"]}, {"source_model": P["b"]}]}, tmp_path / "x")
    with pytest.raises(ValueError, match="same prompts"):
        moe({"base_model": P["base"], "experts": [{"source_model": P[n], "positive_prompts": ["x"]} for n in "ab"]}, tmp_path / "x")
    with pytest.raises(ValueError, match="experts_per_token"):
        moe({"base_model": P["base"], "gate_mode": "random", "experts_per_token": 3,
             "experts": [{"source_model": P[n]} for n in "ab"]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()

# ---- tokensurgeon ----
from model_ops.nn import tiny_tokenizer
from model_ops.merge.toolbox import tokensurgeon, omp

@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_tokensurgeon_same_as_mergekit(tmp_path, dt):
    """A tiny Llama (tiny tokenizer) moved to a donor's tokenizer (three plain tokens and a ChatML token more; an untied head),
    by mergekit-tokensurgeon with its defaults and by `tokensurgeon`: the same tensors, config and tokenizer."""
    m = tiny_model("llama")
    cfg = m.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    save_model(m.state_dict(), tmp_path / "model", config=cfg, dtype=dt); tiny_tokenizer().save_pretrained(tmp_path / "model")
    dtok = tiny_tokenizer(); dtok.add_tokens(["the", "ing", "Ġand"]); dtok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    d = tiny_model("llama", seed=1, vocab_size=len(dtok))
    save_model(d.state_dict(), tmp_path / "donor", config=cfg | {"vocab_size": len(dtok)}, dtype=dt); dtok.save_pretrained(tmp_path / "donor")
    r = subprocess.run([mergekit_cmd("mergekit-tokensurgeon"), str(tmp_path / "model"), str(tmp_path / "donor"), str(tmp_path / "mk"), "-k", "16"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    tokensurgeon(tmp_path / "model", tmp_path / "donor", tmp_path / "ours", k=16)
    a, b = WeightStore.open(tmp_path / "mk"), WeightStore.open(tmp_path / "ours")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys(): assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert a["lm_head.weight"].shape == (265, 64)
    assert json.loads((tmp_path / "mk" / "config.json").read_text()) == json.loads((tmp_path / "ours" / "config.json").read_text())
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()

def test_omp_recovers_a_sparse_combination():
    "A target that is a combination of 3 candidates: OMP picks them (first) and their coefficients."
    g = torch.Generator().manual_seed(0)
    P = torch.randn(200, 64, generator=g)
    y = torch.stack([0.7 * P[3] - 1.2 * P[50] + 0.4 * P[199], P[7]])
    idx, coef = omp(y, P, k=3)
    assert sorted(idx[0].tolist()) == [3, 50, 199]
    got = dict(zip(idx[0].tolist(), coef[0].tolist()))
    assert abs(got[3] - 0.7) < 1e-4 and abs(got[50] + 1.2) < 1e-4 and abs(got[199] - 0.4) < 1e-4
    assert idx[1, 0] == 7 and abs(coef[1, 0] - 1) < 1e-4
    assert torch.allclose(torch.bmm(coef.unsqueeze(1), P[idx]).squeeze(1), y, atol=1e-4)

def test_hub_ids_from_the_cache(experts, tmp_path, monkeypatch):
    """`moe` and `tokensurgeon` take Hub ids `org/name`: read from the Hugging Face cache (laid out by hand, offline),
    with the same result as the folders themselves (before, their tokenizer/config loads went to transformers with the id)."""
    from mergekit_runs import hub_cache
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf")); monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for n in ("base", "a", "b"): hub_cache(tmp_path / "hf", f"org/{n}", experts[n], n * 40 if n != "base" else "c" * 40)
    ids = {n: f"org/{n}" for n in ("base", "a", "b")}
    for name, P in (("folders", experts), ("ids", ids)):
        (tmp_path / f"{name}.yml").write_text(_moe_recipe(P, "random"))
        torch.manual_seed(0); moe(tmp_path / f"{name}.yml", tmp_path / f"moe_{name}")
    a, b = WeightStore.open(tmp_path / "moe_folders"), WeightStore.open(tmp_path / "moe_ids")
    assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a[k], b[k]) for k in a.keys())
    tokensurgeon("org/a", "org/b", tmp_path / "ts_ids", k=4); tokensurgeon(experts["a"], experts["b"], tmp_path / "ts_folders", k=4)
    a, b = WeightStore.open(tmp_path / "ts_folders"), WeightStore.open(tmp_path / "ts_ids")
    assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a[k], b[k]) for k in a.keys())
    with pytest.raises(ValueError, match="does not hold model 'org/absent'"): tokensurgeon("org/absent", "org/b", tmp_path / "x")
