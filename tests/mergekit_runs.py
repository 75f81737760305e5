"""What the mergekit comparison tests share: tiny float32/bfloat16 models saved as HF folders (with a tokenizer and a chat
template each when asked), and every recipe merged by mergekit in one `mergekit-multi` run (one import of mergekit,
about 15 s here, instead of one per recipe)."""
import os, shutil, subprocess, sys
import pytest, torch
from model_ops.io import WeightStore, save_model
from model_ops.nn import tiny_model, tiny_tokenizer

def load(path) -> dict:
    "Every tensor of the model at `path`."
    s = WeightStore.open(path)
    return {k: s[k] for k in s.keys()}

def mergekit_cmd(name:str) -> str:
    "The path of a mergekit command beside this interpreter (skips the test when mergekit is not installed)."
    exe = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None: pytest.skip(f"{name} is not installed")
    return exe

def tiny_models(root, n_layers:int, shares:tuple, scale:float, seed:int, templates:dict|None=None) -> dict:
    """A tiny Llama base and fine-tunes a, b, c (fine-tune i changes a share `shares[i]` of the entries), in float32 and
    bfloat16: {(tag, name): folder}. With `templates` ({name: chat template or None}) every folder also gets the tiny
    tokenizer, carrying that model's template."""
    m = tiny_model("llama", num_hidden_layers=n_layers)
    cfg = m.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    models = {}
    for tag, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        models[tag, "base"] = str(save_model(sd, root / f"base_{tag}", config=cfg, dtype=dt))
        for i, (n, p) in enumerate(zip(("a", "b", "c"), shares)):
            g = torch.Generator().manual_seed(seed + i)
            ft = {k: v + scale * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < p) for k, v in sd.items()}
            models[tag, n] = str(save_model(ft, root / f"{n}_{tag}", config=cfg, dtype=dt))
    if templates is not None:
        for (tag, n), folder in models.items():
            tok = tiny_tokenizer(); tok.chat_template = templates.get(n); tok.save_pretrained(folder)
    return models

def mergekit_multi(root, texts:dict, *extra, tokenizer:bool=False, file:str="all.yml", final:str|None=None):
    """Merge every recipe of `texts` ({name: YAML}) with mergekit into root/mk/NAME (copying the tokenizer when
    `tokenizer`); `final`, a YAML document without a name, goes to root/mk_final (mergekit-multi's --out-path)."""
    docs = [f"name: {n}\n{t}" for n, t in texts.items()] + ([final] if final is not None else [])
    (root / file).write_text("---\n".join(docs))
    r = subprocess.run([mergekit_cmd("mergekit-multi"), str(root / file), "-I", str(root / "mk"),
                        *(["--out-path", str(root / "mk_final")] if final is not None else []),
                        *([] if tokenizer else ["--no-copy-tokenizer"]), "--quiet", *extra], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

def hub_cache(home, repo:str, folder, revision:str, branch:str|None="main"):
    """Lay the files of `folder` out as the Hugging Face cache under HF_HOME=`home` holds repo `repo` at commit `revision`:
    `hub/models--org--name/blobs/<sha256>`, `snapshots/<revision>/<file>` linked to its blob, and `refs/<branch>`."""
    import hashlib
    from pathlib import Path
    repo_dir = Path(home) / "hub" / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True); (repo_dir / "blobs").mkdir(exist_ok=True)
    for f in sorted(Path(folder).iterdir()):
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if branch is not None:
        (repo_dir / "refs").mkdir(exist_ok=True); (repo_dir / "refs" / branch).write_text(revision)
    return snap
