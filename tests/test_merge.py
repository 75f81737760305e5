"Oracle tests of model_ops.merge against mergekit 0.1.5, statistical tests of the random methods, definitions of PCB and layer swapping."
import json, random
import numpy as np, pytest, torch, yaml
from model_ops.io import WeightStore, save_model
from model_ops.nn import tiny_model
from model_ops import merge as M
from model_ops.merge import methods as MM, task_vectors as MT, kernels as MK, executor as MX, api as MA

N_LAYERS = 4

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = tiny_model("llama", num_hidden_layers=N_LAYERS)
    cfg = base.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    paths = {"base": str(save_model(sd, root / "base", config=cfg))}
    for i, name in enumerate("abc"):
        g = torch.Generator().manual_seed(100 + i)
        paths[name] = str(save_model({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()},
                                     root / name, config=cfg))
    paths["root"] = root
    return paths

def _load(path):
    s = WeightStore.open(path)
    return {k: s[k] for k in s.keys()}

def oracle(cfg, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options=MergeOptions(copy_tokenizer=False, quiet=True))
    return _load(out)

def CONFIGS(P):
    ab = lambda **kw: [{"model": P["a"], "parameters": dict(weight=0.6, **kw)}, {"model": P["b"], "parameters": dict(weight=0.4, **kw)}]
    return {
        "linear": dict(merge_method="linear", models=[{"model": P["a"], "parameters": {"weight": 0.3}}, {"model": P["b"], "parameters": {"weight": 0.9}},
                                                      {"model": P["c"], "parameters": {"weight": 0.2}}]),
        "linear_filters_gradients": dict(merge_method="linear", models=[
            {"model": P["a"], "parameters": {"weight": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": [1, 0.2, 0.6]}, {"value": 1.0}]}},
            {"model": P["b"], "parameters": {"weight": 0.5}}]),
        "linear_no_normalize_negative": dict(merge_method="linear", models=[{"model": P["a"], "parameters": {"weight": 1.5}}, {"model": P["b"], "parameters": {"weight": -0.5}}],
                                             parameters={"normalize": False}),
        "task_arithmetic_negative_lambda": dict(merge_method="task_arithmetic", base_model=P["base"], models=[
            {"model": P["a"], "parameters": {"weight": 1.0}}, {"model": P["b"], "parameters": {"weight": -0.7}}], parameters={"lambda": 0.8}),
        "ties": dict(merge_method="ties", base_model=P["base"], models=[
            {"model": P["a"], "parameters": {"weight": 0.7, "density": [1, 0.5, 0.2]}},
            {"model": P["b"], "parameters": {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}], "density": 0.4}},
            {"model": P["c"], "parameters": {"weight": 0.5, "density": 0.6}}], dtype="float32"),
        "ties_negative_no_normalize_rescale": dict(merge_method="ties", base_model=P["base"], models=[
            {"model": P["a"], "parameters": {"weight": 1.0, "density": 0.5}}, {"model": P["b"], "parameters": {"weight": -0.5, "density": 0.3}}],
            parameters={"normalize": False, "rescale": True, "lambda": 1.2}),
        "breadcrumbs": dict(merge_method="breadcrumbs", base_model=P["base"], models=ab(density=0.7, gamma=0.05)),
        "breadcrumbs_ties": dict(merge_method="breadcrumbs_ties", base_model=P["base"], models=ab(density=[0.9, 0.5])),
        "slerp_gradient_filters": dict(merge_method="slerp", base_model=P["a"], slices=[{"sources": [
            {"model": P["a"], "layer_range": [0, N_LAYERS]}, {"model": P["b"], "layer_range": [0, N_LAYERS]}]}],
            parameters={"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}),
        "nuslerp_base_rowwise": dict(merge_method="nuslerp", base_model=P["base"], models=ab(), parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        "nuslerp_nobase": dict(merge_method="nuslerp", models=ab()),
        "model_stock": dict(merge_method="model_stock", base_model=P["base"], models=[{"model": P[k]} for k in "abc"]),
        "model_stock_filter_wise": dict(merge_method="model_stock", base_model=P["base"], models=[{"model": P[k]} for k in "ab"], parameters={"filter_wise": True}),
        "passthrough_frankenmerge": dict(merge_method="passthrough", slices=[
            {"sources": [{"model": P["a"], "layer_range": [0, 3]}]},
            {"sources": [{"model": P["b"], "layer_range": [1, 4], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}]),
        "ties_slices_precedence": dict(merge_method="ties", base_model=P["base"], parameters={"weight": 0.3, "density": 0.8}, slices=[
            {"sources": [{"model": P["a"], "layer_range": [0, 2], "parameters": {"weight": 0.5}}, {"model": P["base"], "layer_range": [0, 2]}],
             "parameters": {"normalize": False, "density": 0.5}},
            {"sources": [{"model": P["b"], "layer_range": [2, 4], "parameters": {"weight": [1, 0.2], "density": 0.6}}, {"model": P["base"], "layer_range": [2, 4]}]}]),
        "task_arithmetic_out_dtype": dict(merge_method="task_arithmetic", base_model=P["base"], models=ab(), out_dtype="bfloat16"),
    }

@pytest.fixture(scope="module")
def configs(models): return CONFIGS(models)

@pytest.mark.parametrize("name", list(CONFIGS({k: "x" for k in ("a", "b", "c", "base")})))
def test_oracle_mergekit(models, configs, name):
    cfg = configs[name]
    ref = oracle(cfg, models["root"] / f"mk_{name}")
    out = M.merge_config(cfg, models["root"] / f"mo_{name}")
    ours = _load(out)
    assert list(ours) == list(ours) and sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        assert (ours[k].float() - ref[k].float()).abs().max().item() <= 1e-6, (name, k)
    if "slices" in cfg:
        n = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in cfg["slices"])
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == n

def test_yaml_file_and_cli(models, configs):
    p = models["root"] / "ties.yml"
    p.write_text(yaml.safe_dump(configs["ties"]))
    out = M.cli_merge(str(p), str(models["root"] / "cli_ties"), seed=1)
    ref = _load(models["root"] / "mk_ties") if (models["root"] / "mk_ties").exists() else oracle(configs["ties"], models["root"] / "mk_ties2")
    ours = _load(out)
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == configs["ties"]
    from model_ops.io import verify_store
    assert verify_store(out) == len(ref)                       # checksums written by the streaming writer are right
    small = M.merge_config(configs["ties"], models["root"] / "ties_sharded", max_shard_size="50KB")
    assert len(list(small.glob("model-*.safetensors"))) > 3 and verify_store(small) == len(ref)
    assert all(torch.equal(WeightStore.open(small)[k], ours[k]) for k in ref)

@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_kernels_equal_mergekit_with_same_rng(method):
    from mergekit.merge_methods import merge_tensors
    torch.manual_seed(0)
    b = torch.randn(50, 40); xs = [b + 0.01 * torch.randn_like(b) for _ in range(3)]
    prm = {"weight": [0.5, -0.3, 0.8], "density": [0.4, 0.6, 0.5]}
    torch.manual_seed(11); ref = merge_tensors([b] + xs, method, base_index=0, parameters=prm)
    torch.manual_seed(11); got = M.METHODS[method](xs, b, **prm)     # seed=None: the global RNG, like mergekit
    assert torch.equal(ref, got)

def _delta(out, base):
    return {k: out[k] - base[k] for k in base}

def test_dare_kept_fraction_rescale_seed_order(models):
    cfg = dict(merge_method="dare_linear", base_model=models["base"], models=[{"model": models["a"], "parameters": {"weight": 1.0, "density": 0.3}}])
    plan = M.plan_merge(cfg)
    base, a = _load(models["base"]), _load(models["a"])
    r1 = dict(M.stream_merge(plan, seed=5, workers=2))
    kept = sum(int((r1[k] != base[k]).sum()) for k in base) / sum(v.numel() for v in base.values())
    assert abs(kept - 0.3) < 0.01
    for k in [k for k in base if base[k].numel() >= 1000]:   # L1 rescale: every tensor's task vector keeps its L1 norm exactly (mergekit), not 1/p per entry
        d, d0 = (r1[k] - base[k]), (a[k] - base[k])
        assert abs(d.abs().sum() / d0.abs().sum() - 1) < 1e-4
        m = d != 0
        scale = d.abs().sum() / d0[m].abs().sum()                       # one scalar per tensor
        assert torch.allclose(d[m], scale * d0[m], atol=1e-6)
        assert abs(scale - 1 / 0.3) < (0.25 if d.numel() >= 8000 else 0.6)          # ≈ 1/p, up to sampling noise
    # same seed -> same bits, whatever the order and the number of workers
    rev = M.MergePlan(**{**plan.__dict__, "jobs": list(reversed(plan.jobs))})
    r2 = dict(M.stream_merge(rev, seed=5, workers=1))
    shuffled = list(plan.jobs); random.Random(0).shuffle(shuffled)
    r3 = dict(M.stream_merge(M.MergePlan(**{**plan.__dict__, "jobs": shuffled}), seed=5, workers=3))
    assert all(torch.equal(r1[k], r2[k]) and torch.equal(r1[k], r3[k]) for k in r1)
    r4 = dict(M.stream_merge(plan, seed=6, workers=2))
    assert not torch.equal(r1["model.embed_tokens.weight"], r4["model.embed_tokens.weight"])

def test_dare_paper_rescale():
    x = torch.randn(300, 300)
    y = M.sparsify_random(x, 0.25, rescale=True, gen=M.tensor_generator(0, "x"), rescale_mode="inverse")
    m = y != 0
    assert abs(m.float().mean() - 0.25) < 0.01 and torch.allclose(y[m], x[m] / 0.25)

def test_della_rank_dependent_keep_probability():
    x = torch.randn(400, 1000)
    d, eps = 0.5, 0.1
    y = M.sparsify_della(x, d, eps, rescale=False, gen=M.tensor_generator(1, "x"))
    ranks = x.abs().argsort(1).argsort(1)
    low, high = (y != 0)[ranks < 100].float().mean(), (y != 0)[ranks >= 900].float().mean()
    # expected keep probability: d - eps + 2 eps * rank/999, averaged over each decile
    assert abs(low - (d - eps + 2 * eps * 49.5 / 999)) < 0.01 and abs(high - (d - eps + 2 * eps * 949.5 / 999)) < 0.01
    assert torch.equal(y[y != 0], x[y != 0])
    yr = M.sparsify_della(x, d, eps, rescale=True, gen=M.tensor_generator(1, "x"))
    assert torch.equal(yr != 0, y != 0) and abs(yr.abs().sum() / x.abs().sum() - 1) < 1e-4

def test_della_via_executor_seeded(models):
    cfg = dict(merge_method="della", base_model=models["base"], models=[
        {"model": models["a"], "parameters": {"weight": 1.0, "density": 0.4, "epsilon": 0.1}},
        {"model": models["b"], "parameters": {"weight": 1.0, "density": 0.4, "epsilon": 0.1}}])
    plan = M.plan_merge(cfg)
    r1, r2 = dict(M.stream_merge(plan, seed=3, workers=1)), dict(M.stream_merge(plan, seed=3, workers=2))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)

def _pcb_reference(deltas, ratio, clamp_ratio):
    "PCB-merging straight from the paper's definition, with full sorts."
    n, d = deltas.shape
    a = deltas.abs().clone()
    if clamp_ratio > 0:
        srt = a.sort(dim=1).values
        a = torch.maximum(torch.minimum(a, srt[:, int(d * (1 - clamp_ratio)) - 1:int(d * (1 - clamp_ratio))]), srt[:, int(d * clamp_ratio):int(d * clamp_ratio) + 1])
    clamped = deltas.sign() * a
    norm = lambda v: (v - v.min(1, keepdim=True).values) / (v.max(1, keepdim=True).values - v.min(1, keepdim=True).values)
    intra = torch.exp(n * norm(a) ** 2)
    inter = torch.tanh(deltas * deltas.sum(0))
    beta = intra * inter
    thr = beta.sort(dim=1).values[:, int(d * (1 - ratio))].unsqueeze(1)
    score = norm(torch.where(beta < thr, thr, beta))
    return (clamped * score).sum(0) / score.sum(0).clamp(min=1e-12)

@pytest.mark.parametrize("ratio,clamp", [(0.1, 1e-4), (0.3, 0.0), (0.5, 0.01)])
def test_pcb_matches_definition(ratio, clamp):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(60, 70, generator=g)
    xs = [b + 0.02 * torch.randn(b.shape, generator=g) for _ in range(3)]
    got = M.pcb(xs, b, ratio=ratio, clamp_ratio=clamp, lambda_=0.7)
    ref = b + 0.7 * _pcb_reference(torch.stack([(x - b).reshape(-1) for x in xs]), ratio, clamp).reshape(b.shape)
    assert (got - ref).abs().max() <= 1e-6

def test_layer_swap_definition(models):
    a, b = _load(models["a"]), _load(models["b"])
    st = M.merge([models["a"], models["b"]], "layer_swap", out=models["root"] / "swap", bottom=1, top=1)
    out = {k: st[k] for k in st.keys()}
    assert sorted(out) == sorted(a)
    for k in out:
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        src = b if layer is not None and 1 <= layer < N_LAYERS - 1 else a
        assert torch.equal(out[k], src[k]), k
    # a transition blends the edge of the middle
    st2 = M.merge([models["a"], models["b"]], "layer_swap", bottom=0.25, top=0.0, transition=1)
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(st2[k], 0.5 * a[k] + 0.5 * b[k])
    assert torch.equal(st2["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])

def test_pcb_via_config_runs_and_needs_base(models):
    with pytest.raises(ValueError, match="needs a base_model"):
        M.plan_merge(dict(merge_method="pcb", models=[{"model": models["a"]}, {"model": models["b"]}]))
    st = M.merge([models["a"], models["b"]], "pcb", base=models["base"], ratio=0.2)
    base = _load(models["base"])
    k = "model.layers.0.self_attn.q_proj.weight"
    ref = base[k] + _pcb_reference(torch.stack([(_load(models[m])[k] - base[k]).reshape(-1) for m in "ab"]), 0.2, 1e-4).reshape(base[k].shape)
    assert (st[k] - ref).abs().max() <= 1e-6

def test_validation_happens_before_writing(models):
    root = models["root"]
    cases = [
        (dict(merge_method="ties", models=[{"model": models["a"], "parameters": {"weight": 1}}]), "needs a base_model"),
        (dict(merge_method="dare_ties", base_model=models["base"], models=[{"model": models["a"], "parameters": {"weight": 1, "density": -0.1}}]), "out of range"),
        (dict(merge_method="della", base_model=models["base"], models=[{"model": models["a"], "parameters": {"weight": 1, "density": 0.9, "epsilon": 0.2}}]), "density ± epsilon"),
        (dict(merge_method="slerp", base_model=models["a"], models=[{"model": models["b"]}], parameters={"t": -0.2}), "out of range"),
        (dict(merge_method="passthrough", models=[{"model": models["a"]}, {"model": models["b"]}]), "exactly 1 model"),
        (dict(merge_method="model_stock", base_model=models["base"], models=[{"model": models["a"]}]), "at least 2 model"),
        (dict(merge_method="not_a_method", models=[{"model": models["a"]}]), "unknown merge method"),
        (dict(merge_method="linear", models=[{"model": models["a"], "parameters": {"weight": 1}}, {"model": str(root / "missing")}]), "no such file"),
        (dict(merge_method="linear", slices=[{"sources": [{"model": models["a"], "layer_range": [0, 2]}, {"model": models["b"], "layer_range": [0, 3]}]}], parameters={"weight": 1}), "same number of layers"),
        (dict(merge_method="linear", models=[{"model": models["a"]}], parameters={"weight": float("nan")}), "must be finite"),
    ]
    for i, (cfg, msg) in enumerate(cases):
        with pytest.raises(ValueError, match=msg):
            M.merge_config(cfg, root / f"bad{i}")
        assert not (root / f"bad{i}").exists()

def test_architecture_mismatch(models, tmp_path):
    g = tiny_model("gpt2")
    p = save_model(WeightStore.open(g), tmp_path / "gpt2", config=g.config.to_dict())
    with pytest.raises(ValueError, match="different numbers of layers|missing from|different shapes"):
        M.plan_merge(dict(merge_method="linear", models=[{"model": models["a"]}, {"model": str(p)}], parameters={"weight": 1}))

def test_device_and_dtype_params(models):
    st = M.merge([models["a"], models["b"]], "ties", base=models["base"], weight=[0.5, 0.5], density=0.5, device="cpu", dtype="float32",
                 out_dtype="float16", out=models["root"] / "f16")
    assert st.dtype("model.embed_tokens.weight") == torch.float16

def test_torchrun_two_processes_equal_one(models, tmp_path):
    "`model-ops merge` started by torchrun on 2 CPU processes writes the same tensors as one process (DARE-TIES, seeded per name)."
    import subprocess, sys, os, shutil
    exe = shutil.which("model-ops")
    if exe is None: pytest.skip("the model-ops console script is not installed")
    cfg = {"merge_method": "dare_ties", "base_model": models["base"], "dtype": "float32",
           "models": [{"model": models["a"], "parameters": {"weight": 0.6, "density": 0.5}},
                      {"model": models["b"], "parameters": {"weight": 0.4, "density": 0.5}}]}
    p = tmp_path / "dare.yml"; p.write_text(yaml.safe_dump(cfg))
    one = M.merge_config(cfg, tmp_path / "one", seed=7)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
                        exe, "merge", str(p), str(tmp_path / "two"), "--seed", "7", "--max_shard_size", "60KB"],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = WeightStore.open(one), WeightStore.open(tmp_path / "two")
    assert sorted(a.keys()) == sorted(b.keys()) and len(b.shards) > 2
    assert all(torch.equal(a[k], b[k]) for k in a.keys())
    from model_ops.io import verify_store
    assert verify_store(tmp_path / "two") == len(a.keys())
    prov = json.loads((tmp_path / "two" / "merge_provenance.json").read_text())
    assert prov["world_size"] == 2 and not list(tmp_path.glob(".two.*"))

def test_ties_chunked_trim_equals_full_topk(quantum=1e-3):
    "The chunked TIES trim (sampled bracket, threshold, tie positions) equals a whole-tensor exact top-k, ties included."
    g = torch.Generator().manual_seed(0)
    n = 4 * M.CHUNK + 12345                       # large enough for the sampled bracket, not a multiple of the chunk
    base = torch.randn(n, generator=g)
    xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    xs = [base + torch.round((x - base) / quantum) * quantum for x in xs]   # many exactly equal magnitudes at the threshold
    for rescale in (False, True):
        got = M.generalized_task_arithmetic(xs, base, weight=[0.7, 0.4], density=[0.3, 0.45], sparsify="magnitude",
                                            consensus=True, normalize=True, rescale=rescale)
        ds = [M.sparsify_magnitude(x - base, d, rescale=rescale) for x, d in zip(xs, [0.3, 0.45])]
        ref = _gta_reference(xs, base, [0.7, 0.4], ds, normalize=True)
        assert (got - ref).abs().max().item() <= 1e-6

def test_nonfinite_found_from_the_output(models, tmp_path):
    "Propagating methods check the output once; a NaN input is still named, an overflow gets its own message, nothing is written."
    sd = _load(models["a"]); k = "model.layers.1.mlp.up_proj.weight"
    sd[k][3, 4] = float("nan")
    bad = save_model(sd, tmp_path / "nan", config=json.loads((models["root"] / "base" / "config.json").read_text()))
    for method in ("linear", "task_arithmetic", "ties", "dare_ties"):   # ties/dare_ties: found by their own planning pass
        cfg = {"merge_method": method,
               "models": [{"model": str(bad), "parameters": {"weight": 0.5}}, {"model": models["b"], "parameters": {"weight": 0.5}}]}
        if method != "linear": cfg["base_model"] = models["base"]
        if method in ("ties", "dare_ties"):
            for m in cfg["models"]: m["parameters"]["density"] = 0.5
        with pytest.raises(ValueError, match=r"up_proj.*NaN or inf"): M.merge_config(cfg, tmp_path / f"o_{method}")
        assert not (tmp_path / f"o_{method}").exists()
    cfg = {"merge_method": "linear", "out_dtype": "float16",
           "models": [{"model": models["a"], "parameters": {"weight": 1e5}}, {"model": models["b"], "parameters": {"weight": 1e5}}],
           "parameters": {"normalize": False}}
    with pytest.raises(ValueError, match="overflowed to inf in torch.float16"): M.merge_config(cfg, tmp_path / "ovf")
    assert not (tmp_path / "ovf").exists()

def _gta_reference(xs, base, ws, deltas, normalize, lambda_=1.0):
    "mergekit's TIES/DARE-TIES combination on whole tensors, from already sparsified task vectors."
    w = torch.tensor(ws, dtype=base.dtype).unsqueeze(1)
    D = torch.stack([d.reshape(-1) for d in deltas]) * w
    mask = (D.sign() == ((D.sum(0) >= 0).to(D.dtype) * 2 - 1)).to(D.dtype)
    mixed = (D * mask).sum(0)
    if normalize:
        div = (w * mask).sum(0); div[div == 0] = 1
        mixed = mixed / div
    return base + (lambda_ * mixed if lambda_ != 1 else mixed).reshape(base.shape)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_model_fast_path_bits(dtype):
    "The two-model TIES path (float ops on 64K chunks) gives mergekit's bits; so does the generic loop it bypasses."
    g = torch.Generator().manual_seed(3)
    n = 300_007                                   # above 2^18: the sampled bracket is used
    base = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    xs = [base + (torch.round(0.01 * torch.randn(n, generator=g, dtype=torch.float64) / 1e-3) * 1e-3).to(dtype) for _ in range(2)]
    for ws, ds, norm, lam in [([0.7, 0.4], [0.3, 0.45], True, 1.0), ([0.5, 0.5], [0.5, 0.5], False, 0.8), ([1.0, 1.0], [1.0, 0.2], True, 1.0)]:
        got = M.ties(xs, base, weight=ws, density=ds, normalize=norm, lambda_=lam)
        ref = _gta_reference(xs, base, ws, [M.sparsify_magnitude(x - base, d) for x, d in zip(xs, ds)], norm, lam)
        assert torch.equal(got, ref), (ws, ds)
    # a third model with weight 0 and density 0 takes the generic loop: same result as the two-model path
    got3 = M.ties(xs + [xs[0]], base, weight=[0.7, 0.4, 1e-3], density=[0.3, 0.45, 0.0])
    assert torch.equal(got3, M.ties(xs, base, weight=[0.7, 0.4], density=[0.3, 0.45]))

def test_dare_chunked_equals_whole_tensor_reference():
    "Seeded DARE-TIES in chunks: the masks of one `keep_mask` draw per tensor, the L1 rescale, mergekit's election (≤ 1e-6)."
    g = torch.Generator().manual_seed(4)
    n = 200_003
    base = torch.randn(n, generator=g); xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    ws, ds = [0.6, 0.4], [0.5, 0.3]
    got = M.dare_ties(xs, base, weight=ws, density=ds, seed=9, name="t")
    deltas = []
    for i, (x, d) in enumerate(zip(xs, ds)):
        keep = torch.from_numpy(M.keep_mask(M.tensor_bits(9, "t", i), n, d))
        assert abs(keep.float().mean().item() - d) < 0.01
        m = (x - base) * keep
        deltas.append(m * ((x - base).abs().double().sum() / m.abs().double().sum()).float())
    ref = _gta_reference(xs, base, ws, deltas, normalize=False)
    assert (got - ref).abs().max().item() <= 1e-6 and torch.equal(got != base, ref != base)

def test_same_bits_whatever_the_thread_count():
    "Rescaled TIES with precise=True (its sums run in NumPy; the default sums like mergekit) and seeded DARE (L1 sums in fixed 1024-value rows; a float32 torch.sum of a 64K chunk differs between 1 and 2 threads) do not depend on torch's thread count."
    g = torch.Generator().manual_seed(5)
    n = 300_000
    base = torch.randn(n, generator=g); xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    old = torch.get_num_threads()
    try:
        res = []
        for t in (1, 2):
            torch.set_num_threads(t)
            res.append((M.ties(xs, base, weight=[0.5, 0.5], density=0.4, rescale=True, precise=True),
                        M.dare_ties(xs, base, weight=[0.5, 0.5], density=0.4, seed=1, name="x")))
    finally: torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*res))

def test_recycled_buffers_and_direct_writes_keep_the_bits(models, tmp_path):
    "merge_config (pooled buffers, O_DIRECT writer, 4 KB-aligned header) writes exactly what the in-memory merge returns."
    from safetensors.torch import load_file
    from model_ops.io import verify_store
    for method in ("ties", "dare_ties"):
        cfg = dict(merge_method=method, base_model=models["base"], models=[
            {"model": models["a"], "parameters": {"weight": 0.6, "density": 0.5}}, {"model": models["b"], "parameters": {"weight": 0.4, "density": 0.5}}])
        out = M.merge_config(cfg, tmp_path / method, seed=3, workers=2, processes=False)   # (processes: next test)
        mem = dict(M.stream_merge(M.plan_merge(cfg), seed=3, workers=1))
        disk = load_file(out / "model.safetensors")            # the reference reader accepts the padded header
        assert sorted(disk) == sorted(mem) and all(torch.equal(disk[k], mem[k]) for k in mem)
        assert verify_store(out) == len(mem)
        n = int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
        assert (8 + n) % 4096 == 0

@pytest.mark.skipif(not MX._can_fork(), reason="worker processes need os.fork (Linux)")
def test_worker_processes_equal_threads_and_report_errors(models, tmp_path):
    "Forked workers (shared result slots, O_DIRECT from the slot, checksums from the workers) write the threads' bytes; a worker's error reaches the caller and nothing is written."
    from model_ops.io import verify_store
    for method in ("ties", "dare_ties", "linear"):
        cfg = dict(merge_method=method, models=[
            {"model": models["a"], "parameters": {"weight": 0.6, "density": 0.5}}, {"model": models["b"], "parameters": {"weight": 0.4, "density": 0.5}}])
        if method != "linear": cfg["base_model"] = models["base"]
        p = M.merge_config(cfg, tmp_path / f"p_{method}", seed=7, workers=3, processes=True)
        t = M.merge_config(cfg, tmp_path / f"t_{method}", seed=7, workers=2, processes=False)
        assert (p / "model.safetensors").read_bytes() == (t / "model.safetensors").read_bytes()
        assert verify_store(p) == len(WeightStore.open(p).keys())
    sd = _load(models["a"]); sd["model.layers.2.mlp.down_proj.weight"][0, 0] = float("inf")
    bad = save_model(sd, tmp_path / "inf", config=json.loads((models["root"] / "base" / "config.json").read_text()))
    cfg = dict(merge_method="ties", base_model=models["base"], models=[
        {"model": str(bad), "parameters": {"weight": 0.5, "density": 0.5}}, {"model": models["b"], "parameters": {"weight": 0.5, "density": 0.5}}])
    with pytest.raises(ValueError, match=r"down_proj.*NaN or inf"): M.merge_config(cfg, tmp_path / "o_inf", workers=2, processes=True)
    assert not (tmp_path / "o_inf").exists() and not list(tmp_path.glob(".o_inf*"))

def _resident_kb(mm):
    "Resident size (kB) of the memory map `mm` in this process, from /proc/self/smaps."
    import ctypes
    a = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    lines, rss = open("/proc/self/smaps").read().splitlines(), None
    for i, l in enumerate(lines):
        f = l.split()
        if "-" in f[0] and len(f) >= 5 and all(c in "0123456789abcdef-" for c in f[0]):
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            if lo <= a < hi:
                rss = next(int(x.split()[1]) for x in lines[i + 1:] if x.startswith("Rss:"))
                break
    return rss

@pytest.mark.skipif(not MX._can_fork(), reason="worker processes need os.fork (Linux)")
def test_worker_slots_give_back_pages_no_job_needs(tmp_path):
    "After the largest tensor, result slots shrink to the largest output still to come: its pages do not stay resident."
    g = torch.Generator().manual_seed(0)
    sd = lambda: {"big.weight": torch.randn(1024, 1024, generator=g), **{f"s{i}.weight": torch.randn(32, 32, generator=g) for i in range(12)}}
    paths = [save_model(sd(), tmp_path / n) for n in ("base", "a", "b")]
    plan = M.plan_merge(dict(merge_method="ties", base_model=str(paths[0]), models=[
        {"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for p in paths[1:]]))
    plan = MA._largest_first(plan)
    w = MX._Workers(plan, workers=2)
    try:
        seen = []
        for name, t, _ in w:
            seen.append((name, float(t.abs().sum())))
            if name == "big.weight": during = _resident_kb(w.slots)
        after = _resident_kb(w.slots)
    finally: w.close()
    assert len(seen) == 13 and seen[0][0] == "big.weight"
    assert during >= 4096 and after < 256, (during, after)     # 4 MB result resident while in use; given back once done

def _kernel_calls(monkeypatch):
    "Count the calls into the compiled kernels (and whether each was taken or fell back)."
    import collections
    calls = collections.Counter()
    for name in ("_c_merge2", "_c_bracket"):
        orig = getattr(MT, name)
        def wrapped(*a, _orig=orig, _name=name, **k):
            r = _orig(*a, **k)
            for x in (r if isinstance(r, list) else [r]): calls[_name + (" ran" if x is not None else " fell back")] += 1
            return r
        monkeypatch.setattr(MT, name, wrapped)
    return calls

@pytest.mark.skipif(MK._ckernel() is None, reason="no C compiler: only the torch path exists here")
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_kernels_give_the_torch_paths_bits(monkeypatch, threads):
    "Every option of the two-model recipe, with signed zeros and threshold ties, on 1 or 2 threads: the same bits and the same finiteness flag as the torch path."
    calls = _kernel_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    old = torch.get_num_threads(); torch.set_num_threads(threads)
    try:
        for n in (1000, 300_001, 2_500_000):
            b = 0.02 * torch.randn(n, generator=g); b[:50] = 0.0; b[50:100] = -0.0
            xs = [b + torch.round(0.002 * torch.randn(n, generator=g) * 2000) / 2000 for _ in range(2)]   # ties at the cut
            xs[0][:30] = b[:30]; xs[1][10:40] = b[10:40]                                                  # zero deltas
            for meth in ("ties", "dare_ties", "task_arithmetic", "dare_linear"):
                for kw in [dict(weight=[0.5, 0.5], density=[0.5, 0.3]), dict(weight=[0.7, 0.4], density=[1.0, 0.2], lambda_=0.8),
                           dict(weight=[0.5, 0.5], density=[0.0, 0.5]), dict(weight=[0.3, 1.2], density=[0.5, 0.5], normalize=True),
                           dict(weight=[0.3, 0.9], density=[0.4, 0.6], rescale=True, precise=True),   # (rescaled TIES: the default
                           dict(weight=[0.3, 0.9], density=[0.4, 0.6], rescale=True, rescale_mode="inverse", precise=True),   # is mergekit's whole-tensor path)
                           dict(weight=[-0.3, 0.9], density=[0.4, 0.6], normalize=False)]:
                    got = M.METHODS[meth](xs, b, seed=3, name="t", _check_finite=True, **kw)
                    with M.torch_path(): ref = M.METHODS[meth](xs, b, seed=3, name="t", _check_finite=True, **kw)
                    assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), (n, meth, kw)
                    assert getattr(got, "_finite", None) == getattr(ref, "_finite", None)
    finally: torch.set_num_threads(old)
    assert calls["_c_merge2 ran"] >= 60 and calls["_c_bracket ran"] >= 10, calls   # (the rest: cases the kernels do not take)

def test_no_compiler_means_the_torch_path(monkeypatch, tmp_path):
    "A compiler that fails, or MODEL_OPS_NO_CC, leaves no kernel (and no half-built file in the cache): the torch path runs."
    monkeypatch.setenv("MODEL_OPS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    assert MK._build_ckernel() is None and not list(tmp_path.glob("*.so"))
    monkeypatch.delenv("CC"); monkeypatch.setenv("MODEL_OPS_NO_CC", "1")
    assert MK._build_ckernel() is None
    monkeypatch.setattr(MK, "_CK", False)          # as after a failed build: the methods still merge
    b = torch.randn(3000); xs = [b + 0.01 * torch.randn(3000) for _ in range(2)]
    assert torch.isfinite(M.ties(xs, b, weight=[0.5, 0.5], density=[0.5, 0.5])).all()

@pytest.mark.parametrize("n", [1000, 300_001, 2_000_003])
def test_breadcrumbs_band_without_sort(n):
    "The executor's sort-free breadcrumbs band equals `sparsify_outliers` (stable order), with many equal magnitudes at both cuts and degenerate bands."
    g = torch.Generator().manual_seed(7)
    b = 0.02 * torch.randn(n, generator=g)
    xs = [b + torch.round(0.002 * torch.randn(n, generator=g) * 500) / 500 for _ in range(2)]    # heavy ties
    w = torch.tensor([0.6, 0.4]).unsqueeze(1)
    for dens, gam in [([0.5, 0.3], [0.01, 0.05]), ([0.9, 0.2], [0.2, 0.0]), ([1.0, 0.4], [0.1, 0.1]), ([0.0, 0.5], [0.01, 0.6])]:
        for meth in ("breadcrumbs", "breadcrumbs_ties"):
            got = M.METHODS[meth](xs, b, weight=[0.6, 0.4], density=dens, gamma=gam)
            D = torch.stack([M.sparsify_outliers(x - b, d, gm).reshape(-1) for x, d, gm in zip(xs, dens, gam)]) * w
            if meth == "breadcrumbs_ties": D = D * (D.sign() == ((D.sum(0) >= 0).to(D.dtype) * 2 - 1)).to(D.dtype)
            assert torch.equal(got, b + D.sum(0)), (meth, dens, gam)
    t = torch.tensor([3.0, -1.0, 2.0, 2.0, -2.0, 0.5, 2.0, 1.0])      # the reference's own order: largest first, ties by position
    assert torch.equal(M.sparsify_outliers(t, 0.5, gamma=0.125), torch.tensor([0.0, 0.0, 2.0, 2.0, -2.0, 0.0, 2.0, 0.0]))
    assert torch.equal(M.sparsify_outliers(t, 0.25, gamma=0.25), torch.tensor([0.0, 0.0, 0.0, 2.0, -2.0, 0.0, 0.0, 0.0]))

def test_della_ranks_are_mergekits():
    "DELLA's ranks from one argsort and a scatter equal mergekit's double argsort, ties included."
    a = (torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * 8).round().abs()
    assert torch.equal(MM._row_ranks(a), torch.argsort(a, dim=1).argsort(dim=1))


def _same(a, b):
    "Equal bits where finite, NaN at the same places (NaN payloads may differ)."
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))

@pytest.mark.parametrize("meth", ["ties", "dare_ties", "breadcrumbs_ties", "task_arithmetic"])
def test_kernels_on_odd_inputs(meth):
    "Strided and broadcast inputs, NaN/inf without the executor's check, a zero-density model: the compiled and torch paths agree (or the kernels step aside)."
    g = torch.Generator().manual_seed(11)
    n = 600_000
    b = 0.02 * torch.randn(n, generator=g)
    wide = [b.repeat_interleave(2) + 0.01 * torch.randn(2 * n, generator=g) for _ in range(2)]
    cases = [([w[::2] for w in wide], b, {}),                                                  # strided views
             ([b + 0.01 * torch.randn(n, generator=g) for _ in range(2)], torch.zeros(1).expand(n), {}),   # a broadcast base
             ([b + 0.01 * torch.randn(n, generator=g) for _ in range(2)], b, dict(density=[0.0, 0.5]))]
    bad = [b + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    bad[0][5], bad[1][7], bad[0][9] = float("nan"), float("inf"), float("-inf")
    cases += [(bad, b, {}), (bad, b, dict(density=[0.0, 0.5]))]
    for xs, base, kw in cases:
        kw = dict(dict(weight=[0.6, 0.4], density=[0.5, 0.5], seed=2, name="t"), **kw)
        got = M.METHODS[meth](xs, base, **kw)
        with M.torch_path(): ref = M.METHODS[meth](xs, base, **kw)
        assert _same(got, ref), (meth, kw)
        assert getattr(got, "_finite", None) == getattr(ref, "_finite", None)

def test_interpolations_close_to_mergekit_on_large_tensors():
    "SLERP, NuSLERP and Model Stock on 2·10⁷ entries stay within 1e-6 (relative to the largest entry) of mergekit 0.1.5's own functions (or its formula, for Model Stock)."
    from mergekit.merge_methods.slerp import slerp as mk_slerp
    from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp
    g = torch.Generator().manual_seed(12)
    n = 20_000_000
    b = torch.randn(n, generator=g); x0, x1 = b + 0.3 * torch.randn(n, generator=g), b + 0.3 * torch.randn(n, generator=g)
    top = x0.abs().max().item()
    ref = mk_slerp(torch.tensor(0.3), x0.reshape(1, -1), x1.reshape(1, -1)).reshape(-1)   # (a batch of one flattened tensor)
    assert (M.slerp_tensors(0.3, x0, x1) - ref).abs().max() <= 1e-6 * top
    assert (M.nuslerp([x0, x1], weight=[0.3, 0.9]) - mk_nuslerp(0.75, x0, x1, flatten=True)).abs().max() <= 1e-6 * top
    d0, d1 = x0 - b, x1 - b
    c = ((d0 * d1).sum() / (d0.norm() * d1.norm()).clamp(min=1e-6)).clamp(-1, 1); t = 2 * c / (1 + c)
    assert (M.model_stock([x0, x1], b) - (t * ((x0 + x1) / 2) + (1 - t) * b)).abs().max() <= 1e-6 * top

def test_select_is_exact():
    "PCB's order statistics (`_select`, sample-bracketed above 2^18 values) equal a full partition: ties, both ends, and negative values; `_sorted_at` equals kthvalue per row."
    g = np.random.default_rng(3)
    for v in [g.standard_normal(300_001).astype(np.float32), np.round(g.standard_normal(1_000_003) * 20).astype(np.float32),
              g.standard_normal(400_000)]:
        for k in (0, 7, v.size // 3, v.size // 2, v.size - 2, v.size - 1):
            assert MM._select(v, k) == np.partition(v, k)[k], (v.dtype, v.size, k)
    x = torch.from_numpy(g.standard_normal((2, 600_000)).astype(np.float32))
    for idx in (5, 300_000, 599_999):
        assert torch.equal(MM._sorted_at(x, idx), x.kthvalue(idx + 1, dim=-1, keepdim=True).values)

# ---- trust (issue 16): no input is ever overwritten; recipe errors say what is wrong, where, and what to do ----

def _snapshot(root):
    "Every file under `root` with its bytes: what must not change."
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}

@pytest.fixture
def inputs(models, tmp_path):
    "Copies of base, a, b (and a tokenizer-only model t) in `tmp_path/in`, so a failing refusal cannot harm the shared fixture."
    import shutil
    for k in ("base", "a", "b"): shutil.copytree(models[k], tmp_path / "in" / k)
    shutil.copytree(models["c"], tmp_path / "tok" / "t")
    return tmp_path

def test_output_overlapping_an_input_is_refused(inputs):
    "An output that is an input, holds one (the inputs' parent) or lies inside one is refused with overwrite=True, inputs untouched; links followed, base and tokenizer source count."
    P = {k: str(inputs / "in" / k) for k in ("base", "a", "b")}
    cfg = dict(merge_method="ties", base_model=P["base"], tokenizer_source=str(inputs / "tok" / "t"),
               models=[{"model": P["a"], "parameters": {"weight": 0.5, "density": 0.5}}, {"model": P["b"], "parameters": {"weight": 0.5, "density": 0.5}}])
    (inputs / "link").symlink_to(inputs / "in")
    before = _snapshot(inputs)
    cases = [(inputs / "in", "contains the input"), (inputs, "contains the input"), (P["a"], "is the input"), (P["base"], "is the input"),
             (inputs / "in" / "b" / "sub", "lies inside the input"), (inputs / "tok" / "t", "is the input"), (inputs / "tok", "contains the input"),
             (inputs / "link", "contains the input"), (inputs / "link" / "a", "is the input")]
    for out, msg in cases:
        with pytest.raises(ValueError, match=msg): M.merge_config(cfg, out, overwrite=True)
        with pytest.raises(ValueError, match=msg): M.merge_config(cfg, out, overwrite=True, rank=1, world_size=2)   # the distributed path
        with pytest.raises(ValueError, match=msg): M.merge_config(M.plan_merge(cfg), out, overwrite=True)             # a plan given
        assert _snapshot(inputs) == before, out
    with pytest.raises(ValueError, match="contains the input"):                                                    # from Python
        M.merge([P["a"], P["b"]], "linear", weight=[1, 1], out=inputs / "in", overwrite=True)
    assert _snapshot(inputs) == before
    M.merge_config(cfg, inputs / "out", overwrite=True)       # a sibling folder is fine
    assert (inputs / "out" / "model.safetensors").is_file()

def test_output_checked_before_any_model_is_opened(inputs, monkeypatch):
    "plan_merge(out=...) refuses from the recipe's references alone: no store is opened."
    from model_ops.merge import config as MC
    opened = []
    monkeypatch.setattr(MC.WeightStore, "open", staticmethod(lambda *a, **k: opened.append(a) or 1 / 0))
    cfg = dict(merge_method="linear", models=[{"model": str(inputs / "in" / "a"), "parameters": {"weight": 1}}])
    with pytest.raises(ValueError, match="contains the input"): M.merge_config(cfg, inputs / "in", overwrite=True)
    assert opened == []

def _recipe(tmp_path, text, name="r.yml"):
    p = tmp_path / name; p.write_text(text); return str(p)

def test_recipe_file_errors_name_the_file_and_line(tmp_path, models):
    marker = tmp_path / "pwned"
    cases = [
        ("merge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: 1\n", "r.yml, line 5, column 1: not valid YAML"),
        ("merge_method: linear\nmodels:\n\t- model: x\n", "r.yml, line 3, column 1: not valid YAML"),
        (f"merge_method: !!python/object/apply:os.system ['touch {marker}']\n", "r.yml, line 1, column 15: the tag !!python/object/apply:os.system is not allowed"),
        (f"merge_method: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n", "the tag !!python/object/new:subprocess.Popen is not allowed"),
        ("name: one\nmerge_method: linear\n---\nname: two\nmerge_method: slerp\n", "r.yml, stage two: exactly one of 'models', 'slices' or 'modules'"),
        ("", "r.yml is not a mergekit recipe: its YAML is empty"),
        ("- a\n- b\n", "its YAML is a list"),
        ("merge_method: linear\nmodelz: []\n", "r.yml: exactly one of 'models', 'slices' or 'modules' must be given"),
    ]
    for text, msg in cases:
        with pytest.raises(ValueError) as e: M.merge_config(_recipe(tmp_path, text), tmp_path / "out")
        assert msg in str(e.value) and "\n" not in str(e.value), (msg, str(e.value))
        assert not (tmp_path / "out").exists() and not marker.exists()
    with pytest.raises(ValueError, match="plan_merge plans one stage; run it with merge_config"): M.plan_merge(_recipe(tmp_path, "a: 1\n---\nb: 2\n"))
    (tmp_path / "bin.yml").write_bytes(b"\xff\xfe\x00\x01")
    for cfg, msg in [(str(tmp_path / "nope.yml"), "nope.yml: no such file"), (tmp_path / "nope.yml", "nope.yml: no such file"),
                     (str(tmp_path), "is a folder"), (str(tmp_path / "bin.yml"), "bin.yml: not a YAML recipe (byte 0 is not UTF-8")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")): M.plan_merge(cfg)

def test_misspelt_parameter_is_an_error_naming_key_place_and_intent(tmp_path, models, caplog):
    P = models
    text = (f"merge_method: ties\nbase_model: {P['base']}\nmodels:\n  - model: {P['a']}\n    parameters: {{weight: 1, density: 0.5}}\n"
            f"  - model: {P['b']}\n    parameters:\n      weight: 1\n      densty: 0.5\n")
    with pytest.raises(ValueError) as e: M.merge_config(_recipe(tmp_path, text), tmp_path / "out")
    msg = str(e.value)
    for part in ["r.yml, line 9: unknown parameter 'densty' in models[1].parameters", f"(model {P['b']})", "did you mean 'density'?",
                 "method 'ties' takes weight, density, normalize"]:
        assert part in msg, (part, msg)
    assert not (tmp_path / "out").exists()
    base = dict(merge_method="linear", models=[{"model": P["a"], "parameters": {"weight": 1}}, {"model": P["b"], "parameters": {"weight": 1}}])
    for where, cfg, hint in [
        ("in parameters;", dict(base, parameters={"normalise": True}), "did you mean 'normalize'?"),
        ("in slices[0].sources[1].parameters", dict(merge_method="slerp", base_model=P["a"], parameters={"t": 0.5}, slices=[{"sources": [
            {"model": P["a"], "layer_range": [0, 4]}, {"model": P["b"], "layer_range": [0, 4], "parameters": {"tt": 0.3}}]}]), "did you mean 't'?"),
        ("in slices[0].parameters", dict(merge_method="slerp", base_model=P["a"], slices=[{"parameters": {"t": 0.5, "lamda": 1}, "sources": [
            {"model": P["a"], "layer_range": [0, 4]}, {"model": P["b"], "layer_range": [0, 4]}]}]), "did you mean 'lambda'? (a parameter of"),
        ("in models[0].parameters", dict(base, models=[{"model": P["a"], "parameters": {"weight": 1, "densty": 0.5}}, base["models"][1]]),
         "did you mean 'density'? (a parameter of"),
    ]:
        with pytest.raises(ValueError) as e: M.plan_merge(cfg)
        assert where in str(e.value) and hint in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="models\\[0\\].parameters .* must map parameter names to values"):
        M.plan_merge(dict(base, models=[{"model": P["a"], "parameters": 0.5}]))
    # a parameter another method uses is ignored with a warning, as mergekit ignores it
    caplog.clear()
    with caplog.at_level("WARNING", logger="model_ops.merge"):
        plan = M.plan_merge(dict(base, parameters={"density": 0.5, "lambda": 1.0}))
    assert len(plan.jobs) > 0
    assert "parameter 'density' is not used by method 'linear'" in caplog.text and "ignored, as mergekit ignores it" in caplog.text

def test_weights_summing_to_zero_are_explained(models, tmp_path):
    cfg = dict(merge_method="linear", models=[{"model": models["a"], "parameters": {"weight": 0.5}}, {"model": models["b"], "parameters": {"weight": -0.5}}])
    with pytest.raises(ValueError) as e: M.merge_config(cfg, tmp_path / "out")
    msg = str(e.value)
    assert "sum to 0, and linear with normalize: true divides by the sum of the weights" in msg and "set normalize: false" in msg
    assert models["a"] in msg and models["b"] in msg and "overflowed" not in msg and not (tmp_path / "out").exists()
    # only the tensors whose weights cancel (a filter) are named; normalize: false is a plain weighted sum
    flt = dict(cfg, models=[{"model": models["a"], "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}, cfg["models"][1]])
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+\.weight'"): M.plan_merge(flt)
    st = M.merge([models["a"], models["b"]], "linear", weight=[0.5, -0.5], normalize=False)
    a, b = _load(models["a"]), _load(models["b"])
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(st[k], 0.5 * a[k] - 0.5 * b[k], atol=1e-7)

# ---- model ids through the Hugging Face cache ----
from mergekit_runs import hub_cache

@pytest.fixture
def hub(models, tmp_path, monkeypatch):
    "An offline Hugging Face cache (HF_HOME) holding org/base, org/a (main) and org/b at main and at branch v1 (= model c)."
    revs = {"base": "1" * 40, "a": "2" * 40, "b": "3" * 40, "c": "4" * 40}
    hub_cache(tmp_path / "hf", "org/base", models["base"], revs["base"])
    hub_cache(tmp_path / "hf", "org/a", models["a"], revs["a"])
    hub_cache(tmp_path / "hf", "org/b", models["b"], revs["b"])
    hub_cache(tmp_path / "hf", "org/b", models["c"], revs["c"], branch="v1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf")); monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return revs

def test_hub_ids_resolve_through_the_cache(models, hub, tmp_path):
    """`org/name` and `org/name@revision` (a branch or a commit) open the cached snapshot, offline; a merge from ids gives
    the bits of the same merge from the folders; an id the cache lacks is an error naming it and HF_HUB_OFFLINE."""
    from model_ops.io.store import resolve_model
    assert resolve_model("org/b@v1") == tmp_path / "hf" / "hub" / "models--org--b" / "snapshots" / hub["c"]
    assert resolve_model(f"org/b@{hub['b']}") == resolve_model("org/b")
    for ref, path in [("org/a", models["a"]), ("org/b@v1", models["c"]), (f"org/b@{hub['b']}", models["b"])]:
        assert WeightStore.open(ref).fingerprint() == WeightStore.open(path).fingerprint()
    recipe = """merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.7}}
  - model: {c}
    parameters: {{weight: 0.3, density: 0.3}}
"""
    ids = M.merge_config(recipe.format(base="org/base", a="org/a", b="org/b", c="org/b@v1"), tmp_path / "from_ids", workers=1)
    local = M.merge_config(recipe.format(**{k: models[k] for k in "abc"}, base=models["base"]), tmp_path / "from_folders", workers=1)
    x, y = _load(ids), _load(local)
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
    card = (ids / "README.md").read_text()
    assert "base_model:\n- org/base\n- org/a\n- org/b\n" in card and "[org/b](https://huggingface.co/org/b)" in card
    with pytest.raises(Exception) as e: M.merge_config(recipe.format(base="org/base", a="org/a", b="org/nope", c="org/b@v1"), tmp_path / "x")
    assert "org/nope" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(Exception, match="at revision 'v2'"): WeightStore.open("org/b@v2")
    assert not (tmp_path / "x").exists()

def test_a_local_folder_wins_over_an_id(models, hub, tmp_path, monkeypatch):
    "`org/a` that exists as a folder is that folder, not the cached repo."
    import shutil
    shutil.copytree(models["c"], tmp_path / "org" / "a")
    monkeypatch.chdir(tmp_path)
    assert WeightStore.open("org/a").fingerprint() == WeightStore.open(models["c"]).fingerprint()

def test_stages_checked_before_anything_is_written(models, tmp_path):
    "Every stage of a multi-stage recipe is checked first: a typo in the last stage stops it before the first is merged."
    P = models
    text = (f"name: soup\nmerge_method: linear\nmodels:\n  - model: {P['a']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {P['b']}\n    parameters: {{weight: 1}}\n---\nmerge_method: ties\nbase_model: {P['base']}\n"
            f"models:\n  - model: soup\n    parameters: {{weight: 1, densty: 0.5}}\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="stage \\(final\\): .*unknown parameter 'densty'.*did you mean 'density'"):
        M.merge_config(text, tmp_path / "out" / "m")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(ValueError, match="no stage named 'sop'; its stages are \\['soup'\\]"):
        M.merge_config(text, tmp_path / "out" / "m", stage="sop")
    # the first stage alone, named
    out = M.merge_config(text, tmp_path / "out" / "soup", stage="soup", workers=1)
    a, b, o = _load(P["a"]), _load(P["b"]), _load(out)
    assert all(torch.equal(o[k], ((a[k] + b[k]) / 2)) or torch.allclose(o[k], (a[k] + b[k]) / 2, atol=1e-7) for k in o)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["soup"]

def test_cli_strict_stage_and_card(models, tmp_path):
    "`model-ops merge --strict` refuses a key mergekit ignores (one line, nothing written); `--stage` and `--no_card`."
    import subprocess
    P = models
    text = (f"name: soup\nmerge_method: linear\ndype: bfloat16\nmodels:\n  - model: {P['a']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {P['b']}\n    parameters: {{weight: 1}}\n---\nmerge_method: task_arithmetic\nbase_model: {P['base']}\n"
            f"models:\n  - model: soup\n    parameters: {{weight: 0.5}}\n")
    p = tmp_path / "two.yml"; p.write_text(text)
    r = subprocess.run(["model-ops", "merge", str(p), str(tmp_path / "out"), "--strict"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "unknown key 'dype' at the top level; did you mean 'dtype'?" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    out = M.cli_merge(str(p), str(tmp_path / "soup"), stage="soup", no_card=True, workers=1)
    assert not (out / "README.md").exists() and (out / "mergekit_config.yml").read_text() == text
    a, b, o = _load(P["a"]), _load(P["b"]), _load(out)
    assert all(torch.allclose(o[k], (a[k] + b[k]) / 2, atol=1e-7) for k in o)
