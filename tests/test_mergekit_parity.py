"""Parity by default: the methods model_ops shares with mergekit 0.1.5 give mergekit's tensors bit for bit, on tiny float32
and bfloat16 models (math in bfloat16, float32 or float16), in the recipe's dtype (or the inputs' own when the recipe names none), with mergekit's order for
equal magnitudes at a density cut, and for DARE/DELLA with `seed=None` the draws of torch's global generator in
mergekit's order (`--random-seed N` there, `torch.manual_seed(N)` here). `precise=True` keeps model_ops' own choices
(float32 math, lowest-index ties), checked here to differ where they should.

mergekit runs once, as `mergekit-multi` over one multi-document file holding every recipe (one import of mergekit
instead of one per recipe); each document goes through `run_merge`, which seeds the global generator first.

The rest of a recipe, each key through both tools on float32 and bfloat16 models: `modules:` and keys mergekit ignores
(with the weights recipes above), `chat_template` (every built-in name, `auto`, a literal template: tensors and the
tokenizer files byte for byte; `chat_template.jinja` byte for byte for `auto` and a literal template, and for a built-in
name, whose template is our own text, the same prompts rendered on a corpus of conversations), multi-stage recipes (against `mergekit-multi`'s final
model, a DARE stage reseeded as it reseeds), and the model card (against mergekit's `generate_card` for the same text).
Hub ids are tested in tests/test_merge.py: mergekit 0.1.5 lists a repo's files on the Hub before it reads its cache, so
it cannot merge from ids offline."""
import pytest, torch
from mergekit_runs import load as _load, tiny_models, mergekit_multi
from model_ops.merge.api import merge_config
from model_ops.merge.config import plan_merge
from model_ops.merge.executor import stream_merge

pytest.importorskip("mergekit")

SEED = 1234
N_LAYERS = 2
# recipes written for this test; {base}, {a}, {b}, {c} become model folders
DETERMINISTIC = {
    "linear": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.1}}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: [0.2, 0.5]}}
parameters:
  lambda: 0.9
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.4, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.6, weight: 0.3}}
  - model: {c}
    parameters: {{density: 0.25, weight: 0.4}}
parameters:
  normalize: true
""",
    "ties2": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, weight: 1.0}}
  - model: {b}
    parameters: {{density: 0.5, weight: 1.0}}
parameters:
  normalize: false
  int8_mask: true
""",
    "ties_rescale": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.3, weight: 0.8}}
  - model: {b}
    parameters: {{density: 0.7, weight: 0.6}}
parameters:
  rescale: true
  lambda: 1.2
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.7, gamma: 0.05, weight: 0.6}}
  - model: {b}
    parameters: {{density: 0.5, gamma: 0.02, weight: 0.4}}
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.8, gamma: 0.01, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.6, gamma: 0.03, weight: 0.5}}
  - model: {c}
    parameters: {{density: 0.9, gamma: 0.1, weight: 0.2}}
""",
    "slerp": """
merge_method: slerp
base_model: {a}
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
      - model: {b}
        layer_range: [0, 2]
parameters:
  t:
    - filter: self_attn
      value: [0.1, 0.7]
    - filter: mlp
      value: [0.8, 0.3]
    - value: 0.4
""",
    "nuslerp": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.9}}
""",
    "nuslerp_rows": """
merge_method: nuslerp
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.5}}
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
""",
    "model_stock_filter": """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
parameters:
  filter_wise: true
""",
    "linear_sum": """
merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {a}
    parameters: {{weight: 0.25}}
  - model: {c}
    parameters: {{weight: 0.25}}
parameters:
  normalize: false
""",
    "breadcrumbs_rescale": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.6, gamma: 0.02, weight: 1.0}}
  - model: {c}
    parameters: {{density: 0.4, gamma: 0.05, weight: 0.5}}
parameters:
  rescale: true
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
""",
    # `modules:` (mergekit's one module of a decoder-only model is 'default'): module parameters sit between the
    # slice's and the global ones
    "modules_models": """
merge_method: ties
base_model: {base}
modules:
  default:
    models:
      - model: {a}
        parameters: {{density: 0.5}}
      - model: {b}
      - model: {c}
        parameters: {{weight: 0.2}}
    parameters:
      weight: 0.5
      density: [0.9, 0.3]
parameters:
  weight: 0.1
  normalize: false
""",
    "modules_slices": """
merge_method: slerp
base_model: {a}
modules:
  default:
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 1]
          - model: {b}
            layer_range: [0, 1]
      - sources:
          - model: {a}
            layer_range: [1, 2]
          - model: {b}
            layer_range: [1, 2]
        parameters:
          t: 0.85
    parameters:
      t:
        - filter: mlp
          value: 0.2
        - value: 0.6
""",
    # keys mergekit ignores: a typo, a parameter beside merge_method, a weight beside its model (warnings here)
    "ignored_keys": """
merge_method: task_arithmetic
base_model: {base}
dype: float16
select_topk: 0.3
models:
  - model: {a}
    weight: 2.0
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4}}
""",
}
RANDOM = {
    "dare_ties": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, weight: 0.6}}
  - model: {b}
    parameters: {{density: 0.3, weight: 0.5}}
""",
    "dare_linear": """
merge_method: dare_linear
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.6, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.4, weight: 0.5}}
""",
    "della": """
merge_method: della
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, epsilon: 0.1, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.6, epsilon: 0.2, weight: 0.4}}
parameters:
  lambda: 1.1
""",
    "della_linear": """
merge_method: della_linear
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.4, epsilon: 0.15, weight: 0.7}}
  - model: {b}
    parameters: {{density: 0.7, epsilon: 0.1, weight: 0.3}}
""",
}
RECIPES = DETERMINISTIC | RANDOM
# variant -> (models' dtype, the recipe's dtype lines)
VARIANTS = {"f32": ("f32", ""), "bf16": ("bf16", "dtype: bfloat16\n"), "bf16own": ("bf16", ""),
            "bf16_f32math": ("bf16", "dtype: float32\nout_dtype: bfloat16\n"), "f32_f16math": ("f32", "dtype: float16\n")}

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "A tiny base and three fine-tunes in float32 and bfloat16; every recipe merged once by mergekit (seeded)."
    root = tmp_path_factory.mktemp("mergekit_parity")
    models = tiny_models(root, N_LAYERS, (0.8, 0.6, 0.9), 0.01, 20)
    texts = {}
    for v, (tag, extra) in VARIANTS.items():
        for meth, r in RECIPES.items():
            texts[f"{meth}_{v}"] = r.format(**{k: models[tag, k] for k in ("base", "a", "b", "c")}).lstrip() + extra
    mergekit_multi(root, texts, "--random-seed", str(SEED))
    return root, models, texts

def _same(ours, ref, name):
    assert sorted(ours) == sorted(ref), name
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, (name, k, ours[k].dtype, ref[k].dtype)
        assert torch.equal(ours[k], ref[k]), (name, k, (ours[k].float() - ref[k].float()).abs().max().item())

@pytest.mark.parametrize("name", [f"{m}_{v}" for v in VARIANTS for m in DETERMINISTIC])
def test_deterministic_bit_for_bit(runs, name):
    "Every deterministic method through `merge_config` (the defaults): mergekit's file, every tensor, bits and dtype."
    root, _, texts = runs
    p = root / f"{name}.yml"; p.write_text(texts[name])
    _same(_load(merge_config(str(p), root / "mo" / name, workers=1, copy_tokenizer=False)), _load(root / "mk" / name), name)

@pytest.mark.parametrize("name", [f"{m}_{v}" for v in VARIANTS for m in RANDOM])
def test_random_seed_none_draws_as_mergekit(runs, name):
    "DARE/DELLA with `seed=None` after `torch.manual_seed(N)`: mergekit's `--random-seed N` output, bit for bit."
    root, _, texts = runs
    plan = plan_merge(texts[name])
    torch.manual_seed(SEED)
    _same(dict(stream_merge(plan, seed=None, workers=2)), _load(root / "mk" / name), name)   # (global draws: in plan order)

def test_precise_keeps_our_choices(runs):
    """`precise=True`: float32 math and lowest-index ties. On bfloat16 TIES it differs from mergekit (ties straddle the cut,
    sign elections flip), by at most twice the largest task vector of a tensor; on float32 models nothing changes but the ties."""
    root, models, texts = runs
    plan = plan_merge(texts["ties_bf16"])
    ours = dict(stream_merge(plan, workers=1, precise=True))
    ref = _load(root / "mk" / "ties_bf16")
    base = _load(models["bf16", "base"])
    fts = [_load(models["bf16", n]) for n in "abc"]
    differ = 0
    for k in ref:
        tau = max((f[k].float() - base[k].float()).abs().max().item() for f in fts)
        d = (ours[k].float() - ref[k].float()).abs().max().item()
        assert d <= 2 * tau, (k, d, tau)   # (a flipped election moves an entry from one mean task vector to the other)
        differ += not torch.equal(ours[k], ref[k])
    assert differ > 0       # the tiny bfloat16 models do have equal magnitudes at the cut

def test_seeded_draws_are_ours(runs):
    "`seed=N` keeps the order-independent per-tensor draws: the same bits with one or two workers, not mergekit's."
    root, _, texts = runs
    plan = plan_merge(texts["dare_ties_f32"])
    a, b = dict(stream_merge(plan, seed=5, workers=1)), dict(stream_merge(plan, seed=5, workers=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = _load(root / "mk" / "dare_ties_f32")
    assert any(not torch.equal(a[k], ref[k]) for k in ref)

def test_ignored_keys_warn_and_strict_refuses(runs, caplog):
    "Keys mergekit ignores: one warning each, naming the key, where it is and the likely intended one; strict=True refuses."
    root, _, texts = runs
    with caplog.at_level("WARNING", logger="model_ops.merge"): plan_merge(texts["ignored_keys_f32"])
    msgs = "\n".join(r.getMessage() for r in caplog.records)
    assert "line 3: key 'dype' at the top level is not a mergekit recipe key" in msgs and "did you mean 'dtype'?" in msgs
    assert "key 'select_topk' at the top level" in msgs and "did you mean 'parameters: {select_topk: ...}'?" in msgs
    assert "key 'weight' in models[0]" in msgs
    with pytest.raises(ValueError, match="line 3: unknown key 'dype' at the top level; did you mean 'dtype'"):
        plan_merge(texts["ignored_keys_f32"], strict=True)
    with pytest.raises(ValueError, match="'modules' configs|modules \\['vision_tower'\\]"):
        plan_merge(texts["modules_models_f32"].replace("  default:", "  vision_tower:"))

# ---- what a recipe asks for beyond the weights: chat_template, the model card, several stages ----
import filecmp, os, yaml
from model_ops.merge.recipes import CHAT_TEMPLATES, model_card

LITERAL = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
# the inputs' own templates: a and b share one (so `auto` picks it), c has llama3's, the base none
TEMPLATES = {"base": None, "a": LITERAL, "b": LITERAL + "\n", "c": CHAT_TEMPLATES["llama3"]}
TEMPLATE_RECIPES = {
    "chatml": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.3}}
chat_template: chatml
""",
    "llama3": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {c}
    parameters: {{weight: 0.5}}
chat_template: llama3
""",
    "alpaca": """
merge_method: ties
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 1.0, density: 0.4}}
chat_template: alpaca
""",
    "mistral": """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {c}
parameters: {{t: 0.5}}
chat_template: mistral
""",
    "exaone": """
merge_method: linear
models:
  - model: {c}
    parameters: {{weight: 1}}
  - model: {base}
    parameters: {{weight: 1}}
chat_template: exaone
""",
    "auto": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.3}}
chat_template: auto
""",
    "literal": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
chat_template: |
  {{% for message in messages %}}[{{{{ message['role'] }}}}] {{{{ message['content'] }}}}
  {{% endfor %}}{{% if add_generation_prompt %}}[assistant] {{% endif %}}
""",
}
# a pipeline: a soup of two fine-tunes, TIES of the soup and c on the base, then a SLERP of the two stages (with a
# chat template); in bfloat16 with a DARE stage instead (mergekit-multi reseeds before each stage with --random-seed)
# and `auto`, where the stages' own tokenizers vote (the soup's carries a's template, the TIES stage's the base's none)
PIPELINE = """name: soup_{tag}
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4}}
---
name: tied_{tag}
merge_method: {second}
base_model: {base}
models:
  - model: soup_{tag}
    parameters: {{weight: 0.8, density: 0.5}}
  - model: {c}
    parameters: {{weight: 0.5, density: 0.7}}
---
{final_name}merge_method: slerp
base_model: tied_{tag}
models:
  - model: tied_{tag}
  - model: soup_{tag}
parameters:
  t: [0.2, 0.7]
chat_template: {template}
"""

def _pipeline(models, tag):
    second, final_name, template = ("ties", "", "chatml") if tag == "f32" else ("dare_ties", f"name: final_{tag}\n", "auto")
    return PIPELINE.format(tag=tag, second=second, final_name=final_name, template=template,
                           **{k: models[tag, k] for k in ("base", "a", "b", "c")})

@pytest.fixture(scope="module")
def tok_runs(tmp_path_factory):
    """Tiny models with tokenizers and chat templates; every chat-template recipe (float32 and bfloat16) and both
    pipelines merged by mergekit in one mergekit-multi run that copies tokenizers (the float32 pipeline's unnamed final
    stage to mk_final, the bfloat16 one's named final to mk/final_bf16)."""
    root = tmp_path_factory.mktemp("mergekit_recipes")
    models = tiny_models(root, N_LAYERS, (0.8, 0.6, 0.9), 0.01, 40, templates=TEMPLATES)
    texts = {f"ct_{n}_{tag}": r.format(**{k: models[tag, k] for k in ("base", "a", "b", "c")}).lstrip()
             for n, r in TEMPLATE_RECIPES.items() for tag in ("f32", "bf16")}
    f32, bf16 = _pipeline(models, "f32"), _pipeline(models, "bf16")
    stages = [d.split("\n", 1) for d in bf16.split("---\n")]
    mergekit_multi(root, texts | {h.removeprefix("name: "): t for h, t in stages},
                   "--random-seed", str(SEED), tokenizer=True, file="recipes.yml", final=f32)
    return root, models, texts, {"f32": f32, "bf16": bf16}

TOKENIZER_OUT = ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json")

# conversations for comparing what two chat templates render: system + user, user only, several turns, a trailing
# assistant turn, text with spaces and newlines around it, alpaca's `user_context`, a later system message, and the
# orders mistral refuses (both templates must raise); each with and without the generation prompt
_S, _Q, _A, _Q2 = ({"role": "system", "content": "  Answer in one line.\n"}, {"role": "user", "content": "What is 2+2? "},
                   {"role": "assistant", "content": " 4\n"}, {"role": "user", "content": "And 3+3?"})
CONVERSATIONS = [[_S, _Q], [_Q], [_Q, _A, _Q2], [_S, _Q, _A], [_S, _Q, _A, _Q2, _A], [_S],
                 [{"role": "user", "content": "\n\t spaced \n"}, {"role": "assistant", "content": "  \nreply\n\n"}],
                 [_Q, {"role": "user_context", "content": " 2 and 2 \n"}], [_S, _Q, _A, {"role": "user_context", "content": "x"}],
                 [_S, _Q, {"role": "system", "content": "Later rule."}, _Q2],
                 [_Q, _Q2], [_S, _A], [_Q, _A, _S], [_A], [_Q, {"role": "tool", "content": "42"}]]

def _renders(folder) -> list:
    "What the tokenizer saved in `folder` renders each conversation to (or the type of the error it raises)."
    import transformers
    tok, out = transformers.AutoTokenizer.from_pretrained(str(folder)), []
    for conv in CONVERSATIONS:
        for gen in (False, True):
            try: out.append(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen))
            except Exception as e: out.append(type(e).__name__)
    return out

def _same_tokenizer(out, ref, builtin:str|None, tag):
    """The tokenizer files as mergekit's: `tokenizer_config.json` and `tokenizer.json` byte for byte (neither holds the
    template's text), `chat_template.jinja` byte for byte unless a built-in name was asked for; then it is our template
    and renders every conversation of CONVERSATIONS as mergekit's file does."""
    for f in TOKENIZER_OUT:
        assert (out / f).is_file() == (ref / f).is_file(), (tag, f)
        if (ref / f).is_file() and not (builtin and f == "chat_template.jinja"):
            assert filecmp.cmp(out / f, ref / f, shallow=False), (tag, f)
    if builtin:
        assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATES[builtin], tag
        mine, theirs = _renders(out), _renders(ref)
        assert mine == theirs, (tag, [(c, m, t) for c, m, t in zip(CONVERSATIONS * 2, mine, theirs) if m != t][:1])
        if builtin == "mistral": assert "TemplateError" in mine, tag    # the error cases were reached

@pytest.mark.parametrize("name", [f"ct_{n}_{t}" for n in TEMPLATE_RECIPES for t in ("f32", "bf16")])
def test_chat_template_files_as_mergekit(tok_runs, name):
    """`chat_template`: mergekit's tensors and its tokenizer files byte for byte, the template's file too for `auto` and a
    literal template; a built-in name's template (our own text) renders mergekit's prompts."""
    root, _, texts, _ = tok_runs
    p = root / f"{name}.yml"; p.write_text(texts[name])
    out, ref = merge_config(str(p), root / "mo" / name, workers=1), root / "mk" / name
    _same(_load(out), _load(ref), name)
    builtin = name.split("_")[1]
    _same_tokenizer(out, ref, builtin if builtin in CHAT_TEMPLATES else None, name)
    assert (out / "chat_template.jinja").is_file()
    if "auto" in name: assert (out / "chat_template.jinja").read_text() == LITERAL   # the majority, stripped

def test_chat_template_errors(tok_runs, tmp_path):
    "A name that is no built-in and no template is refused before anything is written, with the nearest name."
    root, _, texts, _ = tok_runs
    bad = texts["ct_chatml_f32"].replace("chat_template: chatml", "chat_template: chatlm")
    with pytest.raises(ValueError, match="did you mean 'chatml'"): merge_config(bad, tmp_path / "x", workers=1)
    assert not (tmp_path / "x").exists()

@pytest.mark.parametrize("tag", ["f32", "bf16"])
def test_pipeline_as_mergekit_multi(tok_runs, tag):
    """A multi-stage recipe: the final stage bit for bit as mergekit-multi's (the unnamed final in float32, a named one
    chosen with `stage=` in bfloat16, through a DARE stage reseeded as mergekit-multi reseeds), its tokenizer files as
    mergekit's (the float32 one's built-in chatml template by what it renders), and no intermediate folder left beside the
    output."""
    root, _, _, pipes = tok_runs
    p = root / f"pipeline_{tag}.yml"; p.write_text(pipes[tag])
    outdir = root / f"po_{tag}"; outdir.mkdir()
    stage = None if tag == "f32" else f"final_{tag}"
    out = merge_config(str(p), outdir / "final", workers=1, stage=stage, random_seed=SEED)
    ref = root / "mk_final" if tag == "f32" else root / "mk" / f"final_{tag}"
    _same(_load(out), _load(ref), tag)
    for f in TOKENIZER_OUT: assert (ref / f).is_file(), (tag, f)
    _same_tokenizer(out, ref, "chatml" if tag == "f32" else None, tag)
    assert (out / "chat_template.jinja").read_text() == (CHAT_TEMPLATES["chatml"] if tag == "f32" else LITERAL)
    assert sorted(os.listdir(outdir)) == ["final"]                     # the stages' temporary folder is gone
    assert (out / "mergekit_config.yml").read_text() == pipes[tag]     # the whole recipe, as given

def test_pipeline_failure_leaves_nothing(tok_runs, tmp_path):
    "A stage that fails (an input with NaN) after an earlier stage was written: no output, no temporary folder."
    root, models, _, pipes = tok_runs
    from model_ops.io import save_model
    sd = _load(models["f32", "c"]); k = next(iter(sd)); sd[k][0] = float("nan")
    bad = str(save_model(sd, tmp_path / "nan_c", config=WeightStore_config(models["f32", "c"])))
    text = pipes["f32"].replace(models["f32", "c"], bad)
    with pytest.raises(Exception, match="NaN"): merge_config(text, tmp_path / "out" / "final", workers=1)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []

def WeightStore_config(path):
    from model_ops.io import WeightStore
    return WeightStore.open(path).config

def _card_core(card:str)->tuple:
    """A card as `(front matter, text, bullets)`: the Hub ids and model bullets sorted (mergekit lists them in set order),
    and our changes undone (the lineage section model_ops appends after mergekit's card is cut off)."""
    card = card.split("\n## Lineage", 1)[0].rstrip("\n") + "\n" if "\n## Lineage" in card else card
    card = card.replace("created using [model_ops](https://github.com/model-ops/model-ops) from a [mergekit](https://github.com/cg123/mergekit) recipe",
                        "created using [mergekit](https://github.com/cg123/mergekit)").replace("- merge\n- model_ops\n", "- merge\n")
    _, front, body = card.split("---\n", 2)
    front = yaml.safe_load(front); front["base_model"] = sorted(front["base_model"])
    lines = body.split("\n")
    return front, [l for l in lines if not l.startswith("* ")], sorted(l for l in lines if l.startswith("* "))

@pytest.mark.parametrize("name", ["ct_chatml_f32", "ct_llama3_bf16", "ct_mistral_f32"])
def test_model_card_as_mergekit(tok_runs, name):
    "README.md: mergekit's card for the same recipe text, but for the sentence naming the tool and the model_ops tag."
    from mergekit.card import generate_card
    from mergekit.config import MergeConfiguration
    root, _, texts, _ = tok_runs
    out = root / "mo" / name
    if not out.is_dir():
        p = root / f"{name}.yml"; p.write_text(texts[name]); merge_config(str(p), out, workers=1)
    ref = generate_card(MergeConfiguration.model_validate(yaml.safe_load(texts[name])), texts[name], name)
    assert _card_core((out / "README.md").read_text()) == _card_core(ref)

HUB_RECIPES = ["""merge_method: dare_ties
base_model: meta-llama/Llama-3.1-8B
models:
  - model: NousResearch/Hermes-3-Llama-3.1-8B
    parameters: {density: 0.5, weight: 0.5}
  - model: some-org/math-tune@v1.2
    parameters: {density: 0.5, weight: 0.5}
dtype: bfloat16
""", """merge_method: slerp
base_model: org/left
slices:
  - sources:
      - model: org/left
        layer_range: [0, 32]
      - model: /local/right
        layer_range: [0, 32]
parameters: {t: 0.5}
""", """merge_method: model_stock
base_model: org/base
models:
  - model: org/a
  - model: org/b+org/some-lora
"""]

@pytest.mark.parametrize("i", range(len(HUB_RECIPES)))
def test_model_card_hub_ids_as_mergekit(i):
    "Cards of recipes naming Hub ids (no merge run: mergekit's card needs no download): the same front matter and links."
    from mergekit.card import generate_card
    from mergekit.config import MergeConfiguration
    t = HUB_RECIPES[i]
    ref = generate_card(MergeConfiguration.model_validate(yaml.safe_load(t)), t, "m")
    ours = model_card(yaml.safe_load(t), t, "m")
    assert _card_core(ours) == _card_core(ref)
