"Multi-process DCP jobs under torchrun (gloo, CPU) and fault-injection tests for model_ops.checkpoint."
import os, re, sys, json, time, random, signal, shutil, subprocess, textwrap, warnings
from pathlib import Path
import pytest
import torch

from model_ops.checkpoint import (save, load, verify, dcp_load, dcp_save, dcp_to_hf, CheckpointError, Checkpointer,
                                  list_checkpoints, latest, tensor_byte_range, read_manifest, clean_tmp)
from model_ops.nn import tiny_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}

# --------------------------------------------------------------------------- torchrun jobs

WORKER = textwrap.dedent('''
    import os, sys, warnings, torch, torch.distributed as dist
    warnings.simplefilter("ignore")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions
    from model_ops.checkpoint import dcp_save, dcp_load, save, verify
    from model_ops.nn import tiny_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mode, d = sys.argv[1], sys.argv[2]
    m = tiny_model(seed=0).train()
    for layer in m.model.layers: fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    if mode == "save":
        torch.manual_seed(rank)                       # data-parallel: different data per rank
        for _ in range(3):
            x = torch.randint(0, 256, (2, 16)); m(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
        w = m.model.layers[0].mlp.up_proj.weight
        assert isinstance(w, DTensor) and w.to_local().shape[0] == w.shape[0] // world, w.to_local().shape
        dcp_save(d + "/dcp", m, opt, extra={"lr": 0.01, "note": "fsdp2"}, step=3)
    else:
        dcp_load(d + "/dcp", m, opt)
        w = m.model.layers[0].mlp.up_proj.weight
        assert isinstance(w, DTensor) and w.to_local().shape[0] == len(torch.arange(w.shape[0]).chunk(world)[rank]), w.to_local().shape   # 43/43/42 rows
    msd, osd = get_state_dict(m, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save(d + f"/full_{mode}_{world}", model=msd, extra={"optim": osd}, rng=False)
    dist.barrier(); dist.destroy_process_group()
''')

def _torchrun(tmp, n, *args, timeout=120):
    script = tmp/"worker.py"; script.write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script), *args],
                       env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]

def _same_optim(a, b):
    assert set(a["state"]) == set(b["state"]) and len(a["state"]) > 0
    for k in a["state"]:
        for s in a["state"][k]: assert torch.equal(torch.as_tensor(a["state"][k][s]), torch.as_tensor(b["state"][k][s])), (k, s)

@pytest.fixture(scope="module")
def fsdp_ckpt(tmp_path_factory):
    "An FSDP2 model + AdamW trained 3 steps on 2 gloo ranks and saved with dcp_save; plus its full state (rank 0)."
    tmp = tmp_path_factory.mktemp("fsdp")
    _torchrun(tmp, 2, "save", str(tmp))
    return tmp

def test_fsdp2_dcp_save_is_sharded_and_verified(fsdp_ckpt):
    m = read_manifest(fsdp_ckpt/"dcp")
    assert m["kind"] == "dcp" and m["step"] == 3
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(m["files"])            # each rank wrote its own shard file
    assert verify(fsdp_ckpt/"dcp") == []
    assert not [p for p in fsdp_ckpt.iterdir() if p.name.startswith(".")]  # no temp folders left

def test_fsdp2_dcp_load_one_process(fsdp_ckpt):
    "The 2-rank FSDP2 checkpoint loads into a plain module + optimizer in one process, equal to the full state."
    ref = load(fsdp_ckpt/"full_save_2", rng=False)
    m = tiny_model(seed=1).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); r = dcp_load(fsdp_ckpt/"dcp", m, opt)
    assert r["step"] == 3 and r["extra"]["note"] == "fsdp2" and r["extra"]["lr"] == 0.01
    sd = m.state_dict()
    assert set(ref["model"]) == set(sd)
    for k, v in ref["model"].items(): assert torch.equal(sd[k], v), k
    from torch.distributed.checkpoint.state_dict import get_state_dict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); _, osd = get_state_dict(m, opt)
    _same_optim(osd, ref["extra"]["optim"])

def test_fsdp2_dcp_load_three_processes(fsdp_ckpt):
    "The same checkpoint resharded onto 3 FSDP2 ranks: the gathered full model and optimizer state are identical."
    _torchrun(fsdp_ckpt, 3, "load", str(fsdp_ckpt))
    ref, got = load(fsdp_ckpt/"full_save_2", rng=False), load(fsdp_ckpt/"full_load_3", rng=False)
    for k, v in ref["model"].items(): assert torch.equal(got["model"][k], v), k
    _same_optim(got["extra"]["optim"], ref["extra"]["optim"])

def test_fsdp2_dcp_to_hf_streaming(fsdp_ckpt, tmp_path):
    import transformers
    ref = load(fsdp_ckpt/"full_save_2", rng=False)["model"]
    out = dcp_to_hf(fsdp_ckpt/"dcp", tmp_path/"hf", max_shard_size="64KB", config=tiny_model().config)
    idx = json.loads((out/"model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 2
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    for k, v in m.state_dict().items(): assert torch.equal(v, ref[k]), k

# --------------------------------------------------------------------------- kill -9 while saving
# Savers run in forked children (torch is already imported here, so each trial costs only the save itself);
# the parent kills them with SIGKILL at random moments.

def _fork(fn):
    pid = os.fork()
    if pid == 0:
        try: fn()
        finally: os._exit(0)
    return pid

def _kill_after(pid, delay):
    time.sleep(delay); os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)

# tensors are made in the parent: torch's OpenMP pool does not survive fork, so children do no torch compute
SD = {f"w{i}": torch.randn(256, 1024, generator=torch.Generator().manual_seed(i)) for i in range(8)}   # 8 MB

def _saver(root, start):
    ck = Checkpointer(root, keep=2)
    for step in range(start, start + 10**6):
        for v in SD.values(): v.numpy()[0, 0] = step
        ck.save(step, model=SD, extra={"step": step})

def test_kill9_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    root = tmp_path/"ckpts"
    save(root/"step-00000000", model={"w": torch.ones(3)}, step=0)
    rng, start, steps_seen = random.Random(0), 1, set()
    for trial in range(16):
        _kill_after(_fork(lambda: _saver(root, start)), rng.uniform(0.0, 1.0))
        cs = list_checkpoints(root)
        assert cs, "the previous checkpoint disappeared"
        for c in cs: assert verify(c, strict=False) == [], f"complete-looking but broken checkpoint {c}"
        good = latest(root)
        info = load(good, rng=False)
        assert info["step"] == int(good.name.split("-")[1])
        if info["step"]: assert info["extra"]["step"] == info["step"]
        steps_seen.add(info["step"]); start = info["step"] + 1
    clean_tmp(root)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert len(steps_seen) > 4                                               # saves did complete between kills

def _overwriter(target):
    for s in range(10**6): save(target, model=SD, step=s, overwrite=True)

def test_kill9_overwrite_in_place(tmp_path):
    "Killing a save that replaces an existing folder never loses it: clean_tmp restores the set-aside copy."
    target = tmp_path/"ck"
    save(target, model={"w": torch.ones(3)}, step=-1)
    rng = random.Random(1)
    for trial in range(12):
        _kill_after(_fork(lambda: _overwriter(target)), rng.uniform(0.0, 0.8))
        clean_tmp(tmp_path)
        assert verify(target, strict=False) == []
        assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]

# --------------------------------------------------------------------------- corruption

@pytest.fixture
def ckpt(tmp_path):
    m = tiny_model().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 8)); m(input_ids=x, labels=x).loss.backward(); opt.step()
    return save(tmp_path/"ck", model=m, optimizer=opt, step=1), m

def _flip(path, pos):
    with open(path, "r+b") as f: f.seek(pos); b = f.read(1); f.seek(pos); f.write(bytes([b[0] ^ 0x01]))

@pytest.mark.parametrize("fname,tensor", [("model.safetensors", "model.embed_tokens.weight"),
                                          ("model.safetensors", "model.layers.1.self_attn.k_proj.weight"),
                                          ("model.safetensors", "model.norm.weight"),
                                          ("state.safetensors", "/optimizer/state/3/exp_avg_sq")])
def test_flipped_byte_names_file_and_tensor(ckpt, fname, tensor):
    d, m = ckpt
    a, b = tensor_byte_range(d, fname, tensor)
    for pos in (a, (a + b)//2, b - 1):
        shutil.copy(d/fname, d/"orig")
        _flip(d/fname, pos)
        iss = verify(d, strict=False)
        assert [(i.file, i.tensor) for i in iss] == [(fname, tensor)], iss
        with pytest.raises(CheckpointError, match=tensor.replace("/", ".")):
            load(d, model=tiny_model())
        shutil.move(d/"orig", d/fname)
    assert verify(d) == []

def test_flipped_header_byte_names_tensor(ckpt):
    d, m = ckpt
    raw = (d/"model.safetensors").read_bytes()
    i = raw.index(b'"model.layers.0.mlp.down_proj.weight":{"dtype":"F32","shape":[64,128]')
    j = i + len(b'"model.layers.0.mlp.down_proj.weight":{"dtype":"F32","shape":[6')
    (d/"model.safetensors").write_bytes(raw[:j] + b"5" + raw[j+1:])             # shape [64,128] -> [65,128]
    iss = verify(d, strict=False)
    assert iss and iss[0].file == "model.safetensors" and iss[0].tensor == "model.layers.0.mlp.down_proj.weight"

@pytest.mark.parametrize("cut", [1, 1000, 200_000])
def test_truncated_file_names_file_and_tensor(ckpt, cut):
    d, _ = ckpt
    size = (d/"model.safetensors").stat().st_size
    os.truncate(d/"model.safetensors", size - cut)
    iss = verify(d, strict=False)
    assert iss[0].file == "model.safetensors" and "truncated" in iss[0].problem and iss[0].tensor
    hdr = read_manifest(d)["files"]["model.safetensors"]
    _, hb, start = __import__("model_ops.checkpoint", fromlist=["read_header"]).read_header(d/"model.safetensors")
    a, b = hdr["tensors"][iss[0].tensor]["data_offsets"]
    assert start + b > size - cut >= start + a or start + a >= size - cut     # the named tensor really is cut
    with pytest.raises(CheckpointError, match="truncated"): load(d)

def test_state_json_and_manifest_tampering(ckpt):
    d, _ = ckpt
    s = (d/"state.json").read_text(); (d/"state.json").write_text(s.replace('"lr": 0.001', '"lr": 0.002'))
    assert [(i.file, i.tensor) for i in verify(d, strict=False)] == [("state.json", None)]
    (d/"state.json").write_text(s)
    m = json.loads((d/"manifest.json").read_text()); m["step"] = 7; (d/"manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="manifest.json was modified"): verify(d)

def test_missing_file_and_incomplete_folder(ckpt, tmp_path):
    d, _ = ckpt
    (d/"state.safetensors").unlink()
    assert [(i.file, i.problem) for i in verify(d, strict=False)] == [("state.safetensors", "missing")]
    inc = tmp_path/"inc"; inc.mkdir(); (inc/"model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no manifest.json"): load(inc)

# --------------------------------------------------------------------------- full disk

@pytest.mark.parametrize("limit", [0, 100, 1_000_000, 4_190_000])
def test_failing_writes_give_clean_error_and_keep_previous(tmp_path, limit):
    d = tmp_path/"ck"
    save(d, model={"w": torch.ones(4)}, step=1)
    W = torch.randn(1024, 1024)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            import resource
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            try: save(d, model={"w": W}, step=2, overwrite=True); code = 0
            except CheckpointError as e: os.write(w, str(e).encode()[:4000]); code = 3
            except BaseException as e: os.write(w, repr(e).encode()[:4000]); code = 4
        finally: os._exit(locals().get("code", 5))
    os.close(w)
    _, status = os.waitpid(pid, 0)
    out = os.read(r, 8192).decode(); os.close(r)
    assert os.WEXITSTATUS(status) == 3 and "File too large" in out and "earlier checkpoints are untouched" in out, out
    assert verify(d) == [] and load(d, rng=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]                 # no temp folder left

def test_enospc_in_process(tmp_path, monkeypatch):
    import errno, model_ops.io.format as W
    d = tmp_path/"ck"; save(d, model={"w": torch.ones(4)}, step=1)
    real = W.write_safetensors
    def failing(path, tensors, metadata=None, durable=True, *a, **kw):
        real(path, tensors, metadata, durable, *a, **kw); raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(W, "write_safetensors", failing)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save(d, model={"w": torch.zeros(4)}, step=2, overwrite=True)
    monkeypatch.undo()
    assert load(d, rng=False)["step"] == 1 and torch.equal(load(d, rng=False)["model"]["w"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]

def test_background_save_error_surfaces(tmp_path):
    fut = save(tmp_path/"a", model={"w": torch.ones(2)}, background=True)
    assert fut.result() == tmp_path/"a"
    fut = save(tmp_path/"a", model={"w": torch.ones(2)}, background=True)      # exists, no overwrite
    with pytest.raises(CheckpointError, match="already exists"): fut.result()

def test_background_snapshot_is_isolated_from_training(tmp_path):
    "Training may change the weights right after save(background=True) returns: the checkpoint has the old values."
    w = torch.zeros(2048, 1024)
    fut = save(tmp_path/"a", model={"w": w}, background=True)
    w.add_(1.0)
    fut.result()
    assert torch.equal(load(tmp_path/"a", rng=False)["model"]["w"], torch.zeros(2048, 1024))

def test_crash_between_rename_aside_and_rename_in(tmp_path):
    "The one window where an overwrite has no folder under the final name: clean_tmp puts the old one back."
    save(tmp_path/"ck", model={"w": torch.ones(3)}, step=5)
    dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()         # a pid that no longer runs
    os.rename(tmp_path/"ck", tmp_path/f".ck.old-{dead.pid}-abcd1234")
    (tmp_path/f".ck.tmp-{dead.pid}-abcd1234").mkdir()                               # the unfinished new one
    clean_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and load(tmp_path/"ck", rng=False)["step"] == 5

def test_cli_ckpt_through_model_ops_command(ckpt, tmp_path, capsys):
    cli = pytest.importorskip("model_ops.cli")
    d, _ = ckpt
    assert cli.run_cli(["ckpt", "verify", str(d)]) is True
    assert "all SHA-256 match" in capsys.readouterr().out
    _flip(d/"model.safetensors", tensor_byte_range(d, "model.safetensors", "lm_head.weight")[0])
    with pytest.raises(CheckpointError, match="lm_head.weight"): cli.run_cli(["ckpt", "verify", str(d)])

# --------------------------------------------------------------------------- sharded files, fast and full verification, in-place loads

@pytest.fixture
def sharded(tmp_path):
    sd = {f"layer{i}.w": torch.randn(64, 256, generator=torch.Generator().manual_seed(i)) for i in range(6)}   # 6 x 64 KB
    d = save(tmp_path/"ck", model=sd, step=7, max_shard_size="150KB", rng=False)
    return d, sd

def test_sharded_save_layout_and_plain_sha256(sharded):
    import hashlib
    d, sd = sharded
    m = read_manifest(d)
    assert len(m["model_files"]) == 3 and m["model_files"][0] == "model-00001-of-00003.safetensors"
    idx = json.loads((d/"model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(sd) and set(idx["weight_map"].values()) == set(m["model_files"])
    for f, ent in m["files"].items():                                       # every file: its plain sha256sum
        assert ent["sha256"] == hashlib.sha256((d/f).read_bytes()).hexdigest(), f
    from safetensors.torch import load_file
    for f in m["model_files"]:
        for k, v in load_file(d/f).items(): assert torch.equal(v, sd[k])

def test_load_fills_existing_tensors_in_place(sharded):
    d, sd = sharded
    dst = {k: torch.zeros_like(v) for k, v in sd.items()}; ids = {k: id(v) for k, v in dst.items()}
    load(d, model=dst, rng=False)
    assert all(id(dst[k]) == ids[k] and torch.equal(dst[k], sd[k]) for k in sd)
    m, m2 = tiny_model(seed=0), tiny_model(seed=1)
    p = save(d.parent/"m", model=m, rng=False)
    ptr = m2.model.layers[0].mlp.up_proj.weight.data_ptr()
    load(p, model=m2)
    assert m2.model.layers[0].mlp.up_proj.weight.data_ptr() == ptr                # same memory, new values
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()): assert torch.equal(a, b), k

@pytest.mark.parametrize("mode", [True, "full"])
def test_flipped_byte_in_second_shard(sharded, mode):
    d, sd = sharded
    f = read_manifest(d)["model_files"][1]
    name = sorted(read_manifest(d)["files"][f]["tensors"])[0]
    a, b = tensor_byte_range(d, f, name)
    _flip(d/f, (a + b)//2)
    assert [(i.file, i.tensor) for i in verify(d, strict=False)] == [(f, name)]               # full: SHA-256 + xxh3
    assert [(i.file, i.tensor) for i in verify(d, strict=False, full=False)] == [(f, name)]   # fast: xxh3 only
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load(d, model={k: torch.zeros_like(v) for k, v in sd.items()}, verify=mode)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")): load(d)            # mmap path

def test_full_verify_catches_what_sizes_and_headers_miss(sharded):
    "A byte changed in padding of the header is not a tensor: the header digest (fast) and the file SHA-256 (full) catch it."
    d, _ = sharded
    f = read_manifest(d)["model_files"][0]
    raw = bytearray((d/f).read_bytes()); n = int.from_bytes(raw[:8], "little")
    hdr = raw[8:8+n]
    assert hdr.rstrip(b" ") != hdr or b'"format":"pt"' in hdr
    i = hdr.index(b'"format":"pt"') + len(b'"format":"')
    raw[8+i:8+i+2] = b"PT"; (d/f).write_bytes(bytes(raw))
    for full in (False, True):
        iss = verify(d, strict=False, full=full)
        assert [(i.file, i.tensor) for i in iss] == [(f, None)] and "header" in iss[0].problem, iss

# --------------------------------------------------------------------------- the parallel writer: pieces, writeback, flusher errors

def test_parallel_writer_pieces_and_writeback(tmp_path, monkeypatch):
    "Tensors of many pieces over several writeback ranges, two files written at once: every file is what sha256sum says."
    import hashlib, model_ops.io.format as W
    monkeypatch.setattr(W, "_WBACK", 1 << 20)
    calls, real = [], W._writeback
    monkeypatch.setattr(W, "_writeback", lambda fd, off, n: (calls.append((off, n)), real(fd, off, n)))
    g = torch.Generator().manual_seed(3)
    sd = {f"w{i}": torch.randn(3 * (1 << 20) // 4 + 7 * i, generator=g) for i in range(4)}     # ~3 MiB each, odd sizes
    sd["h"] = torch.randn(1001, generator=g).half()
    d = save(tmp_path/"ck", model=sd, step=1, max_shard_size="7MB", rng=False)
    m = read_manifest(d)
    assert len(m["model_files"]) >= 2
    for f, ent in m["files"].items():
        assert ent["sha256"] == hashlib.sha256((d/f).read_bytes()).hexdigest(), f
        assert ent["size"] == (d/f).stat().st_size, f
    assert sum(n for _, n in calls) >= sum(t.numel() * t.element_size() for t in sd.values())   # every byte pushed to disk
    assert max(n for _, n in calls) <= (1 << 20) + W._PIECE                                    # in bounded ranges
    dst = {k: torch.zeros_like(v) for k, v in sd.items()}
    load(d, model=dst, rng=False)
    assert all(torch.equal(dst[k], sd[k]) for k in sd)

def test_flusher_error_surfaces_and_keeps_previous(tmp_path, monkeypatch):
    "An error pushing bytes to disk (EIO in writeback) fails the save cleanly: the previous checkpoint stays, no temp folder."
    import errno, model_ops.io.format as W
    d = save(tmp_path/"ck", model={"w": torch.ones(1000)}, step=1)
    def eio(fd, off, n): raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(W, "_writeback", eio)
    with pytest.raises(CheckpointError, match="Input/output error"):
        save(d, model={"w": torch.zeros(1000), "v": torch.zeros(5)}, step=2, overwrite=True)
    save(tmp_path/"nd", model={"w": torch.zeros(10)}, durable=False)        # no fsync, no writeback: unaffected
    monkeypatch.undo()
    assert load(d, rng=False)["step"] == 1 and torch.equal(load(d, rng=False)["model"]["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "nd"]

def test_corrupt_first_shard_in_place_load_finishes_other_reads(sharded):
    "A bad tensor in the first shard is reported only after the reads of the other shards (queued at once) have ended."
    d, sd = sharded
    m = read_manifest(d); f = m["model_files"][0]
    name = sorted(m["files"][f]["tensors"])[0]
    a, b = tensor_byte_range(d, f, name); _flip(d/f, a)
    dst = {k: torch.zeros_like(v) for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")): load(d, model=dst, rng=False)
    later = [k for g in m["model_files"][1:] for k in m["files"][g]["tensors"]]
    assert later and all(torch.equal(dst[k], sd[k]) for k in later)

# --------------------------------------------------------------------------- DeepSpeed ZeRO folders <-> universal, expert parallelism

import contextlib, dataclasses, enum, types
from collections import OrderedDict
from model_ops.checkpoint import (TPLayout, tp_split, read_zero, ds_to_universal, save_zero, load_deepspeed_universal,
                                  save_deepspeed_universal, load_universal_into, to_universal, from_universal, reshard)
from model_ops.checkpoint.universal import _eq_univ
from model_ops.checkpoint.deepspeed import _ds_load, _ds_bytes

@contextlib.contextmanager
def fake_deepspeed():
    "Importable `deepspeed.*` classes (as DeepSpeed defines them) while pickling or unpickling, then gone again."
    @dataclasses.dataclass
    class fragment_address:
        numel: int
        start: int
    class ZeroStageEnum(int, enum.Enum):
        disabled = 0; optimizer_states = 1; gradients = 2; weights = 3
    class DynamicLossScaler:
        def __init__(self): self.cur_scale, self.cur_iter = 65536.0, 3
    mods = {"deepspeed.utils.tensor_fragment": fragment_address, "deepspeed.runtime.zero.config": ZeroStageEnum,
            "deepspeed.runtime.fp16.loss_scaler": DynamicLossScaler}
    added = []
    for mod, cls in mods.items():
        for i in range(1, mod.count(".") + 2):
            n = ".".join(mod.split(".")[:i])
            if n not in sys.modules: sys.modules[n] = types.ModuleType(n); added.append(n)
        cls.__module__, cls.__qualname__ = mod, cls.__name__; setattr(sys.modules[mod], cls.__name__, cls)
    try: yield types.SimpleNamespace(frag=fragment_address, stage=ZeroStageEnum, scaler=DynamicLossScaler)
    finally:
        for n in added: sys.modules.pop(n, None)

def ds_fixture(out, full, layout, tp, dp, stage=2, step=None, info=None, prefix=""):
    """A DeepSpeed ZeRO-`stage` folder for tp x dp ranks, laid out as DeepSpeed's engine saves it (independent of save_zero):
    ZeRO-1/2 flat groups padded to a multiple of 2*dp, fp32 partitions without the padding, padded Adam states,
    fragment_address slice mappings; ZeRO-3 ceil(numel/dp) pieces per parameter."""
    out = Path(out); out.mkdir(parents=True)
    names = list(full["param"])
    pg = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False, "maximize": False, "foreach": None,
          "capturable": False, "differentiable": False, "fused": None, "decoupled_weight_decay": True}
    with fake_deepspeed() as ds:
        for t in range(tp):
            loc = {s: {n: tp_split(v, layout.rule(n, v.ndim), tp)[t] for n,v in ts.items()} for s,ts in full.items()}
            flat = {s: torch.cat([loc[s][n].reshape(-1) for n in names]) for s in loc}
            ms = {"module": OrderedDict((n, loc["param"][n]) for n in names) if stage < 3 else OrderedDict(), "buffer_names": [],
                  "optimizer": None, "param_shapes": [OrderedDict((n, loc["param"][n].shape) for n in names)], "frozen_param_shapes": None,
                  "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None, "sparse_tensor_module_names": set(),
                  "skipped_steps": 0, "global_steps": 3, "global_samples": 24, "dp_world_size": dp, "mp_world_size": tp,
                  "ds_config": {"train_batch_size": 8}, "ds_version": "0.16.0", "universal_checkpoint_info": info or {}, "iteration": 3}
            if stage < 3: torch.save(ms, out/f"mp_rank_{t:02d}_model_states.pt")
            for d in range(dp):
                if stage == 3:
                    torch.save(ms, out/f"zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt")
                    part = {s: [] for s in flat}
                    for n in names:
                        k = loc["param"][n].numel(); c = -(-k // dp)
                        for s in flat: x = loc[s][n].reshape(-1)[d*c:(d+1)*c]; part[s] += [x, x.new_zeros(c - len(x))]
                    part = {s: torch.cat(v) for s,v in part.items()}
                    osd = {"zero_stage": ds.stage.weights, "loss_scaler": ds.scaler(), "dynamic_loss_scale": True, "overflow": False,
                           "partition_count": dp, "fp32_flat_groups": [part["param"].clone()],
                           "optimizer_state_dict": {"state": {0: {"step": step, "exp_avg": part["exp_avg"].clone(), "exp_avg_sq": part["exp_avg_sq"].clone()}},
                                                    "param_groups": [{**pg, "params": [0]}]}}
                else:
                    n_all = flat["param"].numel(); padded = -(-n_all // (2 * dp)) * (2 * dp); P = padded // dp
                    lo, hi = d * P, min((d + 1) * P, n_all)
                    pad = {s: torch.cat([v, v.new_zeros(padded - n_all)]) for s,v in flat.items()}
                    maps, off = OrderedDict(), 0
                    for n in names:
                        k = loc["param"][n].numel(); a, b = max(off, lo), min(off + k, hi)
                        if b > a: maps[n] = ds.frag(numel=b - a, start=a - lo)
                        off += k
                    osd = {"loss_scaler": ds.scaler(), "dynamic_loss_scale": True, "overflow": False, "clip_grad": 1.0,
                           "base_optimizer_state": {"state": {0: {"step": step, "exp_avg": pad["exp_avg"][d*P:(d+1)*P].clone(),
                                                                   "exp_avg_sq": pad["exp_avg_sq"][d*P:(d+1)*P].clone()}},
                                                    "param_groups": [{**pg, "params": [0]}]},
                           "single_partition_of_fp32_groups": [flat["param"][lo:hi].clone()],
                           "zero_stage": ds.stage.gradients if stage == 2 else ds.stage.optimizer_states,
                           "group_paddings": [padded - n_all if d == dp - 1 else 0], "partition_count": [dp],
                           "ds_version": "0.16.0", "param_slice_mappings": [maps]}
                torch.save({"optimizer_state_dict": osd, "ds_config": {}, "ds_version": "0.16.0"},
                           out/f"{prefix}zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt")
    return out

V = 261
INFO = {"universal_checkpoint_version": 0.4, "tp_replicated_parameter_patterns": [r".*norm\.weight$"],
        "parameter_with_row_parallelism_patterns": [r".*o_proj\.weight$", r".*down_proj\.weight$"],
        "parameter_with_2_sub_params_cat_dim_0": [r".*gate_up_proj\.weight$"],
        "vocabulary_parameter_patterns": [r"model\.embed_tokens\.weight$", r"lm_head\.weight$"], "original_vocab_size": V}
LAYOUT = TPLayout(replicated=[r"norm\.weight$"], row_parallel=[r"o_proj\.weight$", r"down_proj\.weight$"],
                  sub_params={r"gate_up_proj\.weight$": {"n": 2}}, vocab=[r"embed_tokens\.weight$", r"lm_head\.weight$"], vocab_size=V)

def _train(seed=0):
    m = tiny_model(seed=seed, tie_word_embeddings=False, vocab_size=V).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed); xs = [torch.randint(0, 256, (2, 12), generator=g) for _ in range(8)]
    def step(m, opt, i):
        loss = m(input_ids=xs[i], labels=xs[i]).loss; opt.zero_grad(); loss.backward(); opt.step(); return loss.item()
    for i in range(3): step(m, opt, i)
    return m, opt, step

def _full(m, opt, fuse=True):
    "fp32 weights and Adam moments by name; with `fuse`, gate/up fused into one gate_up_proj (a 2-sub-parameter tensor)."
    full = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for n,p in m.named_parameters():
        full["param"][n] = p.detach().clone()
        for s in ("exp_avg", "exp_avg_sq"): full[s][n] = opt.state[p][s].clone()
    if fuse:
        for s,ts in full.items():
            for k in [k for k in ts if k.endswith("gate_proj.weight")]:
                ts[k.replace("gate_proj", "gate_up_proj")] = torch.cat([ts.pop(k), ts.pop(k.replace("gate_proj", "up_proj"))])
    return full, next(iter(opt.state.values()))["step"].clone()

@pytest.fixture(scope="module")
def zero_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    m, opt, _ = _train()
    full, st = _full(m, opt)
    return root, full, st

@pytest.mark.parametrize("stage,prefix", [(1, ""), (2, "bf16_"), (3, "")])
def test_zero_to_universal_exact(zero_src, stage, prefix):
    root, full, st = zero_src
    src = ds_fixture(root/f"s{stage}"/"global_step3", full, LAYOUT, tp=2, dp=2, stage=stage, step=st, info=INFO, prefix=prefix)
    u = read_zero(src)
    assert u["source"] == {"tp": 2, "dp": 2, "zero_stage": stage}
    for s in full:
        for n in full[s]: assert torch.equal(u["states"][s][n], full[s][n]), (s, n)
    assert u["meta"]["model.layers.0.mlp.gate_up_proj.weight"]["kind"] == "sub_params"
    out = ds_to_universal(src)
    assert (out.parent/"latest_universal").read_text() == out.name and verify(out, strict=False) == []
    u1 = load_deepspeed_universal(out.parent)
    assert _eq_univ(u1, u) and all(float(v) == 3.0 for v in u1["step"].values())

def test_zero_dp2_tp2_to_dp3_tp1_and_back_identical(zero_src):
    root, full, st = zero_src
    src = ds_fixture(root/"rt"/"global_step3", full, LAYOUT, tp=2, dp=2, step=st, info=INFO)
    u1 = load_deepspeed_universal(ds_to_universal(src))
    for stage in (1, 2, 3):
        z = save_zero(u1, root/"rt"/f"dp3_tp1_s{stage}", tp=1, dp=3, stage=stage)
        u2 = load_deepspeed_universal(ds_to_universal(z, latest=False))
        assert u2["source"] == {"tp": 1, "dp": 3, "zero_stage": stage}
        assert _eq_univ(u2, u1) and all(torch.equal(u2["step"][n], u1["step"][n]) for n in u1["step"])
    z = reshard(src, root/"rt"/"tp4_dp1", tp=4, dp=1)                    # the front door: ZeRO folder -> TP=4 x DP=1 rank files
    assert _eq_univ(read_zero(z), u1)
    with fake_deepspeed() as ds:                                          # DeepSpeed's own classes come back out of our files
        sd = torch.load(z/"zero_pp_rank_0_mp_rank_03_optim_states.pt", weights_only=False)
        fa = next(iter(sd["optimizer_state_dict"]["param_slice_mappings"][0].values()))
        assert type(fa) is ds.frag and fa.start == 0
        assert type(torch.load(root/"rt"/"global_step3_universal"/"zero"/"optimizer_state.pt", weights_only=False)["loss_scaler"]) is ds.scaler

def test_zero_resume_continues_adam_identically(zero_src, tmp_path):
    m, opt, step = _train()
    full, st = _full(m, opt, fuse=False)
    src = ds_fixture(tmp_path/"global_step3", full, LAYOUT, tp=2, dp=2, step=st, info={**INFO, "parameter_with_2_sub_params_cat_dim_0": []})
    ds_to_universal(src)
    m2 = tiny_model(seed=5, tie_word_embeddings=False, vocab_size=V).train()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.3, weight_decay=0.0)
    r = load(tmp_path, m2, opt2)
    assert r["step"] == 3 and opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["weight_decay"] == 0.01
    assert [step(m, opt, i) for i in range(3, 7)] == [step(m2, opt2, i) for i in range(3, 7)]
    assert all(torch.equal(a, b) for a,b in zip(m.parameters(), m2.parameters()))

def _copy_edit(src, dst, edit):
    shutil.copytree(src, dst); edit(dst); return dst

def _rewrite(f, fn):
    d = _ds_load(f); fn(d); f.write_bytes(_ds_bytes(d))

@pytest.mark.parametrize("case,match", [
    ("missing", "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"),
    ("missing_model", "mp_rank_01_model_states.pt: missing"),
    ("world", "inconsistent data/tensor-parallel world sizes"),
    ("numel", "numel mismatch for 'model.layers.1.self_attn.q_proj.weight'"),
    ("step", "step of"),
    ("pickle", "holds a Python object"),
    ("replicated", "is declared replicated but TP rank 1 differs from rank 0"),    # found while streaming: the temporary goes
])
def test_zero_errors_before_writing(zero_src, tmp_path, case, match):
    root, full, st = zero_src
    src = ds_fixture(tmp_path/"src", full, LAYOUT, tp=2, dp=2, step=st, info=INFO)
    edits = {
        "missing": lambda b: (b/"zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
        "missing_model": lambda b: (b/"mp_rank_01_model_states.pt").unlink(),
        "world": lambda b: _rewrite(b/"zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    lambda d: d["optimizer_state_dict"].update(partition_count=[3])),
        "numel": lambda b: _rewrite(b/"mp_rank_01_model_states.pt",
                                    lambda d: d["param_shapes"][0].update({"model.layers.1.self_attn.q_proj.weight": torch.Size([33, 64])})),
        "step": lambda b: _rewrite(b/"zero_pp_rank_1_mp_rank_01_optim_states.pt",
                                   lambda d: d["optimizer_state_dict"]["base_optimizer_state"]["state"][0].update(step=torch.tensor(4.0))),
        "pickle": lambda b: (b/"mp_rank_01_model_states.pt").write_bytes(_ds_bytes({"x": _Opaque()})),
        "replicated": lambda b: _rewrite(b/"zero_pp_rank_1_mp_rank_01_optim_states.pt", _bump_norm),
    }
    bad = _copy_edit(src, tmp_path/"bad", edits[case])
    with pytest.raises(CheckpointError, match=re.escape(match)): ds_to_universal(bad, tmp_path/"out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "src"]                 # nothing written, no temporary left

class _Opaque: "Any class outside the DeepSpeed records `_ds_load` knows."

def _bump_norm(d):
    "Change TP rank 1's fp32 copy of the final (replicated) norm weight in this rank file."
    osd = d["optimizer_state_dict"]; fa = osd["param_slice_mappings"][0]["model.norm.weight"]
    osd["single_partition_of_fp32_groups"][0] = osd["single_partition_of_fp32_groups"][0].clone()
    osd["single_partition_of_fp32_groups"][0][fa.start] += 1

# --- streaming ZeRO -> universal: same bytes as the in-memory path, one parameter in memory at a time

def _legacy_format(f):
    "Rewrite DeepSpeed file `f` in torch's legacy (non-zip) format, which cannot be memory-mapped."
    import io, model_ops.checkpoint.deepspeed as C
    pm = types.SimpleNamespace(Pickler=C._DSPickler, __name__="pickle", dump=lambda o, fh, protocol=2: C._DSPickler(fh, protocol).dump(o))
    b = io.BytesIO(); torch.save(_ds_load(f), b, pickle_module=pm, _use_new_zipfile_serialization=False); f.write_bytes(b.getvalue())

def _same_folders(a, b):
    fa = sorted(str(p.relative_to(a)) for p in Path(a).rglob("*") if p.is_file())
    assert fa == sorted(str(p.relative_to(b)) for p in Path(b).rglob("*") if p.is_file())
    assert [f for f in fa if f not in ("manifest.json", "lineage.json") and (a/f).read_bytes() != (b/f).read_bytes()] == []   # (lineage.json: each its own record)
    ma, mb = (json.loads((d/"manifest.json").read_text()) for d in (a, b))
    assert {k: v for k,v in ma.items() if k not in ("time", "manifest_sha256")} == {k: v for k,v in mb.items() if k not in ("time", "manifest_sha256")}
    return fa

@pytest.mark.parametrize("stage,legacy", [(1, False), (2, False), (3, False), (2, True)])
def test_zero_streaming_same_bytes_as_in_memory(zero_src, tmp_path, stage, legacy):
    root, full, st = zero_src
    src = ds_fixture(tmp_path/"global_step3", full, LAYOUT, tp=2, dp=2, stage=stage, step=st, info=INFO)
    if legacy:                                                            # non-zip rank files: read whole, same output
        for f in [src/"zero_pp_rank_1_mp_rank_00_optim_states.pt", src/"mp_rank_01_model_states.pt"]: _legacy_format(f)
    u = read_zero(src)
    mem = save_deepspeed_universal(u, tmp_path/"mem", copy=[src/f for f in u["model_files"]], latest=False)
    fs = _same_folders(ds_to_universal(src, tmp_path/"stream", latest=False), mem)
    assert len(fs) == 3 + 4 * len(u["meta"]) + (4 if stage == 3 else 2)  # manifest, lineage.json, optimizer_state, 4 per parameter, model states
    _same_folders(reshard(src, tmp_path/"rs"), save_deepspeed_universal(u, tmp_path/"mem2", latest=False))

def test_zero_streaming_holds_one_parameter_at_a_time(zero_src, tmp_path, monkeypatch):
    "Every TP slice and consolidated tensor made while converting is tracked (weak references): all alive at once belong to one parameter."
    import weakref, threading, model_ops.checkpoint.zero as C
    root, full, st = zero_src
    src = ds_fixture(tmp_path/"global_step3", full, LAYOUT, tp=2, dp=2, step=st, info=INFO)
    def tracked(run):
        alive, peak, lock = [], {"bytes": 0, "names": set(), "n": 0}, threading.Lock()
        def wrap(fn, name_of):
            def w(*a, **k):
                r = fn(*a, **k)
                with lock:
                    alive.append((name_of(a), weakref.ref(r), r.numel() * r.element_size()))
                    live = [(n, b) for n, ref, b in alive if ref() is not None]
                    peak["bytes"] = max(peak["bytes"], sum(b for _,b in live)); peak["n"] = max(peak["n"], len({n for n,_ in live}))
                return r
            return w
        with monkeypatch.context() as m:
            m.setattr(C, "_zero_local", wrap(C._zero_local, lambda a: a[3]))
            m.setattr(C, "tp_merge", wrap(C.tp_merge, lambda a: a[2]))
            run()
        assert alive
        return peak
    n_params = len(full["param"])
    largest = max(sum(full[s][n].numel() * 4 for s in full) for n in full["param"])   # one parameter's consolidated states
    p = tracked(lambda: ds_to_universal(src, tmp_path/"stream", latest=False))
    assert p["n"] == 1 and p["bytes"] <= 2 * largest, p                   # its TP slices + consolidated states, nothing else
    q = tracked(lambda: save_deepspeed_universal(read_zero(src), tmp_path/"mem", latest=False))
    assert q["n"] == n_params and q["bytes"] >= sum(v.numel() * 4 for ts in full.values() for v in ts.values())   # the tracker sees held tensors

def _mapped_rss(paths) -> int:
    "Resident bytes of this process's mappings of the files `paths` (/proc/self/smaps)."
    ps, rss, cur = {os.path.realpath(p) for p in paths}, 0, False
    for l in open("/proc/self/smaps"):
        x = l.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", l): cur = len(x) >= 6 and l.rstrip("\n").split(None, 5)[5] in ps
        elif cur and x[0] == "Rss:": rss += int(x[1]) * 1024
    return rss

def _maps(paths) -> list:
    "(start, end) addresses where the files `paths` are memory-mapped in this process (/proc/self/maps)."
    ps, out = {os.path.realpath(p) for p in paths}, []
    for l in open("/proc/self/maps"):
        x = l.rstrip("\n").split(None, 5)
        if len(x) == 6 and x[5] in ps: a, b = x[0].split("-"); out.append((int(a, 16), int(b, 16)))
    return out

@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_zero_pieces_stay_mapped(tmp_path):
    import model_ops.checkpoint.zero as C
    g = torch.Generator().manual_seed(0)                                  # MB-sized pieces: the kernel's fault-around (64 KiB) stays small beside them
    full = {s: {f"l{i}.weight": torch.randn(4096, 256, generator=g) for i in range(4)} for s in ("param", "exp_avg", "exp_avg_sq")}
    src = ds_fixture(tmp_path/"global_step3", full, TPLayout(), tp=2, dp=2, step=torch.tensor(3.0))
    opt = sorted(src.glob("*optim_states.pt")); size = sum(f.stat().st_size for f in opt)
    p = C._zero_prepare(src, TPLayout())
    ranges = _maps(opt)
    pieces = [x for r in p["local"] for ts in r.values() for _, ps, _ in ts.values() for x in ps]
    assert len(ranges) == len(opt) and all(any(lo <= x.data_ptr() < hi for lo,hi in ranges) for x in pieces)   # views into the maps, not copies
    assert _mapped_rss(opt) < 0.2 * size                                  # the checks read no tensor data

def test_expert_parallel_round_trip_and_errors(tmp_path):
    E, g = 4, torch.Generator().manual_seed(1)
    moe = {"l.attn.weight": torch.randn(16, 8, generator=g), "l.router.weight": torch.randn(E, 8, generator=g),
           "l.experts.w1": torch.randn(E, 16, 8, generator=g), "l.experts.w2": torch.randn(E, 8, 16, generator=g),
           "l.experts.gate_up": torch.randn(E, 32, 8, generator=g)}
    L = TPLayout(replicated=[r"router"], row_parallel=[r"w2$"], sub_params={r"gate_up$": [16, 16]}, experts=[r"\.experts\."])
    u = {"meta": {k: L.rule(k, v.ndim) for k,v in moe.items()}, "states": {"param": moe}}
    grid = from_universal(u, tp=2, ep=2)
    assert torch.equal(grid[1][1]["param"]["l.experts.w2"], moe["l.experts.w2"][2:, :, 8:])
    assert torch.equal(grid[0][1]["param"]["l.experts.gate_up"], torch.cat([moe["l.experts.gate_up"][:2, 8:16], moe["l.experts.gate_up"][:2, 24:]], 1))
    u1 = to_universal(grid, L, ep=2)
    assert all(torch.equal(u1["states"]["param"][k], v) for k,v in moe.items()) and u1["meta"]["l.experts.w1"]["num_experts"] == E
    for tp, ep in ((1, 4), (4, 1), (2, 4)):
        assert _eq_univ(to_universal(from_universal(u1, tp, ep=ep), L, ep=ep), u1), (tp, ep)
    with pytest.raises(CheckpointError, match="do not split over ep=3"): from_universal(u1, 1, ep=3)
    bad = from_universal(u1, 1, ep=2); bad[1][0]["param"]["l.attn.weight"] = bad[1][0]["param"]["l.attn.weight"] * 2
    with pytest.raises(CheckpointError, match="differs between EP ranks"): to_universal(bad, L, ep=2)
    d = save_deepspeed_universal({**u1, "step": {}}, tmp_path/"moe_universal")
    ds = _ds_load(d/"zero"/"l.experts.w1"/"fp32.pt")
    assert ds["is_expert_param"] is True and ds["ep_num_experts"] == E
    gu, w2 = _ds_load(d/"zero"/"l.experts.gate_up"/"fp32.pt"), _ds_load(d/"zero"/"l.experts.w2"/"fp32.pt")
    assert gu["cat_dim"] == 1 and gu["param_n_sub_params"] == 2 and w2["cat_dim"] == 2      # dims of the stacked [experts, ...] tensor
    assert _eq_univ(load_deepspeed_universal(d), u1)

def test_cli_ckpt_deepspeed(zero_src, tmp_path, capsys):
    cli = pytest.importorskip("model_ops.cli")
    root, full, st = zero_src
    src = ds_fixture(tmp_path/"global_step3", full, LAYOUT, tp=2, dp=2, step=st, info=INFO)
    cli.run_cli(["ckpt", "convert", str(src), "--out", str(tmp_path/"u"), "--to", "universal"])
    assert cli.run_cli(["ckpt", "verify", str(tmp_path/"u")]) is True
    cli.run_cli(["ckpt", "reshard", str(tmp_path/"u"), "--out", str(tmp_path/"z"), "--tp", "1", "--dp", "3", "--zero_stage", "3"])
    assert read_zero(tmp_path/"z")["source"] == {"tp": 1, "dp": 3, "zero_stage": 3}
    assert _eq_univ(read_zero(tmp_path/"z"), read_zero(src))

def test_load_reads_biggest_tensor_first_over_all_files(tmp_path, monkeypatch):
    "The biggest tensor, alone in the last shard, is read first (not last, alone on one core while the others wait)."
    import model_ops.checkpoint.core as C
    sd = {f"a{i}": torch.randn(64, 64) for i in range(8)}; sd["z_big"] = torch.randn(1024, 64)
    d = save(tmp_path/"ck", model=sd, rng=False, max_shard_size="40KB")
    m = read_manifest(d)
    assert len(m["model_files"]) > 2 and "z_big" in m["files"][m["model_files"][-1]]["tensors"]
    order, real = [], C._pread_into
    monkeypatch.setattr(C, "_pread_into", lambda fd, off, dst, check: (order.append(len(dst)), real(fd, off, dst, check))[1])
    dst = {k: torch.empty_like(v) for k,v in sd.items()}
    load(d, model=dst, rng=False)
    assert 1024*64*4 in order[:2] and len(order) == len(sd) and all(torch.equal(dst[k], sd[k]) for k in sd)

def test_demo_step_on_a_sharded_checkpoint(monkeypatch):
    "`demo_step` corrupts and catches a byte in whichever shard holds the model (a real model is saved in several)."
    import model_ops.checkpoint as C, model_ops.checkpoint.core as CC
    from model_ops.nn import tiny_model
    monkeypatch.setattr(CC, "_MIN_SHARD", 2**16)
    r = C.demo_step(tiny_model(), log=lambda *a: None)
    assert r["file"].startswith("model-00") and r["corruption_found"] and r["identical"]

def test_cli_verify_model_folder(tmp_path):
    "`model-ops ckpt verify` on a model folder (merge/prune/edit output, no manifest) checks its per-tensor checksums."
    from model_ops.io import save_model, ModelIOError
    from model_ops.checkpoint import cli_ckpt
    sd = {"a.weight": torch.randn(64, 32), "b.weight": torch.randn(32)}
    p = save_model(sd, tmp_path / "m", config={"model_type": "llama"})
    assert cli_ckpt("verify", str(p)) is True
    f = next(p.glob("*.safetensors")); b = bytearray(f.read_bytes()); b[-3] ^= 1; f.write_bytes(bytes(b))   # last bytes: a tensor's data
    with pytest.raises(ModelIOError, match="is corrupt"): cli_ckpt("verify", str(p))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="manifest"): cli_ckpt("verify", str(tmp_path / "empty"))

# --------------------------------------------------------------------------- trust (issue #16): no code runs from a folder, no input destroyed,
# a killed rename undone, concurrent rotation, folders `load` does not take

import pickle, hashlib
from model_ops.io import ModelIOError
from model_ops.checkpoint import hf_to_dcp, save_tp, save_universal, load_universal, cli_ckpt, rotate
from model_ops.checkpoint.dcp import _dcp_allowed, _DCP_CLASSES, _dcp_metadata
from model_ops.checkpoint.core import _manifest_hash

class _Payload:
    "Pickles as `fn(*args)`: unpickling it calls fn."
    def __init__(self, fn, *args): self.fn, self.args = fn, args
    def __reduce__(self): return (self.fn, self.args)

class _CallsBoundMethod:
    "Unpickling it calls Path(marker).touch(): the callable is a bound method, pickled as getattr(PosixPath(...), 'touch')."
    def __init__(self, p): self.p = Path(p)
    def __reduce__(self): return (self.p.touch, ())

def _payloads(mark):
    "(a pattern of the global a reader must name, an object whose unpickling would create `mark`)"
    return [(r"posix\.system", _Payload(os.system, f"touch {mark}")),
            (r"builtins\.exec", _Payload(exec, f"open({str(mark)!r}, 'w').close()")),
            (r"builtins\.eval", _Payload(eval, f"open({str(mark)!r}, 'w').close()")),
            (r"(subprocess|commands)\.Popen", _Payload(subprocess.Popen, ["touch", str(mark)])),   # torch.save's protocol 2 writes Python 2's name
            (r"builtins\.getattr", _CallsBoundMethod(mark)),
            (r"torch\.serialization\.load", _Payload(torch.load, str(mark)))]

def _rehash(d, fname):
    "What whoever writes a folder can do: record a changed file in the manifest and re-hash the manifest."
    m = json.loads((d/"manifest.json").read_text()); b = (d/fname).read_bytes()
    m["files"][fname] = {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}; m["manifest_sha256"] = _manifest_hash(m)
    (d/"manifest.json").write_text(json.dumps(m))

@pytest.fixture(scope="module")
def dcp_folder(tmp_path_factory):
    "A tiny Llama with AdamW state, a scheduler-like extra and a few extra values, saved with dcp_save."
    d = tmp_path_factory.mktemp("dcp")/"dcp"
    m = tiny_model(seed=0).train(); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 8)); m(input_ids=x, labels=x).loss.backward(); opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_save(d, m, opt, extra={"lr": 0.1, "note": "x", "t": torch.ones(2), "lst": [1, 2], "tup": (1, "a"), "d": {"k": None}}, step=1)
    return d, m

def _seen_globals(path) -> set:
    seen = set()
    class U(pickle.Unpickler):
        def find_class(self, mod, name): seen.add((mod, name)); return super().find_class(mod, name)
    with open(path, "rb") as f: U(f).load()
    return seen

def test_dcp_metadata_allowlist_is_what_real_saves_write(dcp_folder, tmp_path):
    "Every global of real `.metadata` files (dcp_save of model + AdamW + extra; hf_to_dcp of bf16 tensors) is allowed, and the allowlist holds nothing else but declared extras."
    d, m = dcp_folder
    seen = _seen_globals(d/".metadata")
    sd = {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}; sd["ids"] = torch.arange(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); hf_to_dcp(sd, tmp_path/"bf16")
    seen |= _seen_globals(tmp_path/"bf16"/".metadata")
    assert all(_dcp_allowed(*c) for c in seen), seen
    assert {("torch", "bfloat16"), ("torch", "int64"), ("torch", "float32")} <= seen
    assert {(m_, n) for m_, ns in _DCP_CLASSES.items() for n in ns} - seen == {
        ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"), ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
        ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}
    assert not _dcp_allowed("torch", "load") and not _dcp_allowed("builtins", "getattr") and not _dcp_allowed("torch", "Size.__new__")

def test_fsdp2_dcp_metadata_is_within_the_allowlist(fsdp_ckpt):
    "A 2-rank FSDP2 (DTensor-sharded) save names only allowed classes too."
    assert all(_dcp_allowed(*c) for c in _seen_globals(fsdp_ckpt/"dcp"/".metadata"))
    assert len(_dcp_metadata(fsdp_ckpt/"dcp").state_dict_metadata) > 10

def _evil_folder(src, dst, metadata:bytes, manifest:bool):
    shutil.copytree(src, dst); (dst/".metadata").write_bytes(metadata)
    if manifest: _rehash(dst, ".metadata")
    else: (dst/"manifest.json").unlink()
    return dst

@pytest.mark.parametrize("reader", ["dcp_load", "dcp_load_unverified", "dcp_load_no_manifest", "dcp_to_hf", "cli_convert"])
def test_malicious_dcp_metadata_never_runs(dcp_folder, tmp_path, reader):
    "`.metadata` pickles that would create a marker file: refused by name, whatever the manifest says; the marker never appears."
    d, _ = dcp_folder
    mark = tmp_path/"MARK"
    md = _dcp_metadata(d)
    md_nested = pickle.loads(pickle.dumps(md)); md_nested.planner_data = {"x": _Payload(exec, f"open({str(mark)!r}, 'w').close()")}
    cases = _payloads(mark) + [(r"builtins\.exec", md_nested)]                   # a genuine Metadata carrying a payload
    for i, (name, obj) in enumerate(cases):
        e = _evil_folder(d, tmp_path/f"e{i}", pickle.dumps(obj), manifest=reader != "dcp_load_no_manifest")
        run = {"dcp_load": lambda: dcp_load(e, tiny_model()), "dcp_load_unverified": lambda: dcp_load(e, tiny_model(), verify=False),
               "dcp_load_no_manifest": lambda: dcp_load(e, tiny_model()), "dcp_to_hf": lambda: dcp_to_hf(e, tmp_path/f"hf{i}"),
               "cli_convert": lambda: cli_ckpt("convert", str(e), str(tmp_path/f"hf{i}"), to="hf")}[reader]
        with pytest.raises(CheckpointError, match=rf"\.metadata: refuses to unpickle {name}.*trust=True"): run()
        assert not mark.exists(), name
        assert not (tmp_path/f"hf{i}").exists()
    pid = b"\x80\x04" + pickle.PERSID + b"x\n" + pickle.STOP          # a persistent id
    e = _evil_folder(d, tmp_path/"pid", pid, manifest=False)
    with pytest.raises(CheckpointError, match="persistent id"): dcp_load(e, tiny_model())

def test_dcp_metadata_naming_files_outside_the_folder(dcp_folder, tmp_path):
    d, _ = dcp_folder
    md = _dcp_metadata(d)
    for idx in md.storage_data: md.storage_data[idx].relative_path = "../../etc/passwd"; break
    e = _evil_folder(d, tmp_path/"e", pickle.dumps(md), manifest=True)
    with pytest.raises(CheckpointError, match="outside the folder"): dcp_to_hf(e, tmp_path/"hf")

def test_malicious_dcp_values_never_run(tmp_path):
    "Non-tensor values (extra, optimizer hyper-parameters) load with weights_only=True; a tensor chunk holding an object is refused by dcp_to_hf."
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    mark = tmp_path/"MARK"
    m = tiny_model().train(); opt = torch.optim.AdamW(m.parameters())
    x = torch.randint(0, 256, (2, 8)); m(input_ids=x, labels=x).loss.backward(); opt.step()
    n = 0
    for name, obj in _payloads(mark):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = dcp_save(tmp_path/f"x{n}", tiny_model(), extra={"note": obj}); n += 1          # DCP pickles it without running it
            assert verify(d) == []                                                            # well-formed, hashes match
            with pytest.raises(CheckpointError, match=rf"value 'extra.note'\): refuses to unpickle {name}.*trust=True"): dcp_load(d, tiny_model())
            msd, osd = get_state_dict(m, opt); osd["param_groups"][0]["lr"] = obj
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path/f"o{n}"), no_dist=True)   # a third-party DCP folder, no manifest
            with pytest.raises(CheckpointError, match=rf"optim.param_groups.0.lr'\): refuses to unpickle {name}"):
                dcp_load(tmp_path/f"o{n}", m, opt)
        assert not mark.exists(), name
    # a tensor chunk that is a pickle of an object: appended to the data file, the metadata pointed at it
    import io, dataclasses
    d = tmp_path/"x0"; md = _dcp_metadata(d)
    idx = next(i for i in md.storage_data if i.fqn.startswith("model."))
    b = io.BytesIO(); torch.save(_Payload(exec, f"open({str(mark)!r}, 'w').close()"), b)
    f = d/md.storage_data[idx].relative_path; off = f.stat().st_size
    with open(f, "ab") as fh: fh.write(b.getvalue())
    md.storage_data[idx] = dataclasses.replace(md.storage_data[idx], offset=off, length=len(b.getvalue()))
    (d/".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt"): dcp_to_hf(d, tmp_path/"hf")   # the manifest says so first
    (d/"manifest.json").unlink()                                                                       # a third-party folder: no manifest
    with pytest.raises(CheckpointError, match="refuses to unpickle builtins.exec in the chunk"): dcp_to_hf(d, tmp_path/"hf")
    assert not mark.exists()

def test_malicious_deepspeed_files_never_run(zero_src, tmp_path):
    "DeepSpeed rank files and universal `.pt` files holding a payload: every reader refuses it by name; the marker never appears."
    import io
    root, full, st = zero_src
    src = ds_fixture(tmp_path/"global_step3", full, LAYOUT, tp=1, dp=1, step=st, info=INFO)
    u = ds_to_universal(src, tmp_path/"u", latest=False)
    mark = tmp_path/"MARK"
    for i, (name, obj) in enumerate(_payloads(mark)):
        pat = name.replace(r"builtins\.", r"(builtins\.)?")                   # torch names builtins bare
        b = io.BytesIO(); torch.save({"module": obj}, b)
        bad = tmp_path/f"z{i}"; shutil.copytree(src, bad); (bad/"mp_rank_00_model_states.pt").write_bytes(b.getvalue())
        for run in (lambda: read_zero(bad), lambda: ds_to_universal(bad, tmp_path/f"o{i}"), lambda: reshard(bad, tmp_path/f"o{i}", 1),
                    lambda: cli_ckpt("convert", str(bad), str(tmp_path/f"o{i}"), to="universal")):
            with pytest.raises(CheckpointError, match=rf"{pat}.*trust=True"): run()
        ub = tmp_path/f"u{i}"; shutil.copytree(u, ub)
        fp = sorted((ub/"zero").glob("*/fp32.pt"))[0]; fp.write_bytes(b.getvalue()); _rehash(ub, str(fp.relative_to(ub)))
        for run in (lambda: load_deepspeed_universal(ub), lambda: load(ub, tiny_model(vocab_size=V, tie_word_embeddings=False)),
                    lambda: reshard(ub, tmp_path/f"o{i}", 1)):
            with pytest.raises(CheckpointError, match=rf"{pat}.*trust=True"): run()
        assert not mark.exists(), name
    assert not any(tmp_path.glob("o*"))

def test_trust_true_reads_other_objects(tmp_path):
    "trust=True restores DCP's own behaviour: a value outside weights_only (here a Fraction) loads."
    from fractions import Fraction
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = dcp_save(tmp_path/"d", tiny_model(), extra={"f": Fraction(1, 3)})
        with pytest.raises(CheckpointError, match="refuses to unpickle fractions.Fraction"): dcp_load(d, tiny_model())
        assert dcp_load(d, tiny_model(), trust=True)["extra"]["f"] == Fraction(1, 3)

def _tree_digest(p) -> dict:
    p = Path(p); return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*")) if f.is_file()}

def test_conversions_refuse_outputs_overlapping_inputs(dcp_folder, zero_src, tmp_path):
    "Every conversion refuses an output that is, contains or lies inside its input -- before reading it (a corrupt input still gives the overlap error) -- and leaves the input intact."
    root, full, st = zero_src
    dsrc = tmp_path/"in"/"dcp"; shutil.copytree(dcp_folder[0], dsrc); (dsrc/".metadata").write_bytes(b"garbage")   # unreadable: reading it first would fail otherwise
    zsrc = ds_fixture(tmp_path/"in"/"global_step3", full, LAYOUT, tp=2, dp=1, step=st, info=INFO)
    hsrc = tmp_path/"in"/"hf"; hsrc.mkdir(); (hsrc/"model.safetensors").write_bytes(b"garbage")
    usrc = save_universal(read_zero(zsrc), tmp_path/"in"/"u")
    (usrc/"universal.json").write_bytes(b"garbage")
    before = _tree_digest(tmp_path/"in")
    n = 0
    for src, conv in [(dsrc, lambda s, o: dcp_to_hf(s, o, overwrite=True)), (hsrc, lambda s, o: hf_to_dcp(s, o, overwrite=True)),
                      (zsrc, lambda s, o: ds_to_universal(s, o, overwrite=True)), (zsrc, lambda s, o: reshard(s, o, 1, overwrite=True)),
                      (usrc, lambda s, o: reshard(s, o, 2, overwrite=True)), (usrc, lambda s, o: to_universal(s, out=o)),
                      (dsrc, lambda s, o: cli_ckpt("convert", str(s), str(o), to="hf", overwrite=True)),
                      (zsrc, lambda s, o: cli_ckpt("reshard", str(s), str(o), tp=1, overwrite=True)),
                      (zsrc, lambda s, o: save_deepspeed_universal(read_zero(zsrc), o, copy=[zsrc/"mp_rank_00_model_states.pt"], overwrite=True))]:
        for out, msg in [(src, "(is|contains) the input"), (src.parent, "contains the input"), (src/"sub", "lies inside the input")]:
            with pytest.raises(ModelIOError, match=msg): conv(src, out)
            n += 1
    assert n == 27 and _tree_digest(tmp_path/"in") == before

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"]); p.wait(); return p.pid

@pytest.mark.parametrize("reader", ["load", "list_checkpoints", "latest", "load_latest"])
def test_killed_rename_is_undone_by_readers(tmp_path, reader):
    "A save killed between setting step-2 aside and renaming its successor in: each reader puts the previous step-2 back."
    root = tmp_path/"ck"; ck = Checkpointer(root, keep=3)
    for s in (1, 2): ck.save(s, model={"w": torch.full((4,), float(s))}, rng=False)
    pid, p = _dead_pid(), ck.path(2)
    os.rename(p, root/f".{p.name}.old-{pid}-abcd1234")
    (root/f".{p.name}.tmp-{pid}-abcd1234").mkdir()                    # its unfinished successor
    assert not p.exists()
    if reader == "load": assert torch.equal(load(p, rng=False)["model"]["w"], torch.full((4,), 2.0))
    if reader == "list_checkpoints": assert [q.name for q in list_checkpoints(root)] == ["step-00000001", "step-00000002"]
    if reader == "latest": assert latest(root) == p
    if reader == "load_latest": assert ck.load_latest(rng=False)["step"] == 2    # a Checkpointer made before the kill
    assert verify(p) == []

def _rotating_saver(root, who, n):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(f'''
        import torch; torch.set_num_threads(1)
        from model_ops.checkpoint import Checkpointer
        ck = Checkpointer({str(root)!r}, keep=2); sd = {{"w": torch.zeros(64, 64)}}
        for i in range({n}):
            step = 2 * i + {who}; sd["w"].fill_(step); ck.save(step, model=sd, rng=False)
        print("done")''')], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def test_two_processes_rotating_one_root(tmp_path):
    "Two processes save and rotate into one root (interleaved steps): no save raises, and the newest `keep` checkpoints verify."
    root = tmp_path/"ck"
    ps = [_rotating_saver(root, w, 40) for w in (0, 1)]
    outs = [p.communicate(timeout=300) for p in ps]
    for p, (o, e) in zip(ps, outs): assert p.returncode == 0 and o.strip() == "done", e[-3000:]
    cs = list_checkpoints(root)
    assert [p.name for p in cs[-2:]] == ["step-00000078", "step-00000079"]
    for p in cs[-2:]:
        assert verify(p) == [] and load(p, rng=False)["model"]["w"][0, 0] == int(p.name[5:])

def test_rotate_skips_what_another_process_removed(tmp_path, monkeypatch):
    "Deterministically: the folder vanishes between rotate's listing and its removal."
    import model_ops.checkpoint.core as C
    for s in (1, 2, 3): save(tmp_path/f"step-{s}", model={"w": torch.ones(2)}, rng=False)
    real = C.remove_dir
    def other_first(p): shutil.rmtree(p); real(p)                         # the other process wins the race
    monkeypatch.setattr(C, "remove_dir", other_first)
    assert rotate(tmp_path, keep=1) == [] and [p.name for p in list_checkpoints(tmp_path)] == ["step-3"]

def test_load_names_folders_it_does_not_read(dcp_folder, zero_src, tmp_path):
    "load of a DCP, universal, TP, DeepSpeed ZeRO or model folder: a CheckpointError saying what the folder is and what reads it."
    import torch.distributed.checkpoint as dcp
    root, full, st = zero_src
    zsrc = ds_fixture(tmp_path/"global_step3", full, LAYOUT, tp=1, dp=1, step=st, info=INFO)
    raw = tmp_path/"raw_dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); dcp.save({"model": {"w": torch.ones(2)}}, checkpoint_id=str(raw), no_dist=True)
    from model_ops.io import save_model
    cases = [(dcp_folder[0], "DCP.*dcp_load"), (raw, "DCP.*dcp_load"), (save_universal(read_zero(zsrc), tmp_path/"u"), "universal.*load_universal"),
             (save_tp([{"w": torch.ones(2)}], tmp_path/"tp", TPLayout()), "TP folder.*load_tp"), (zsrc, "DeepSpeed ZeRO.*ds_to_universal"),
             (save_model({"w": torch.ones(2)}, tmp_path/"hf"), "model folder.*WeightStore")]
    for d, msg in cases:
        with pytest.raises(CheckpointError, match=msg): load(d, rng=False)

# --------------------------------------------------------------------------- FIFOs, names leaving a folder, DCP and ZeRO folders checked against our manifest

from model_ops.checkpoint import load_tp

class _Hang(BaseException): "A reader blocked (it opened the FIFO); no `except Exception` turns it into a clean error."

@contextlib.contextmanager
def _no_hang(s=3):
    "Fail instead of waiting forever when a reader blocks opening a FIFO."
    def on_alarm(*_): raise _Hang()
    old = signal.signal(signal.SIGALRM, on_alarm); signal.setitimer(signal.ITIMER_REAL, s)
    try: yield
    finally: signal.setitimer(signal.ITIMER_REAL, 0); signal.signal(signal.SIGALRM, old)

@pytest.fixture
def small_folders(tmp_path, dcp_folder):
    "One small folder of each kind: training (save), universal, TP, DCP (a copy), ZeRO (save_zero, tp=1 x dp=2) and its DeepSpeed universal folder."
    g = torch.Generator().manual_seed(3)
    lay = TPLayout(replicated=[r"norm\.weight$"], row_parallel=[r"o\.weight$"])
    p = {"blk.q.weight": torch.randn(8, 6, generator=g), "blk.o.weight": torch.randn(6, 8, generator=g), "blk.norm.weight": torch.randn(6, generator=g)}
    u = {"meta": {k: lay.rule(k, v.ndim) for k,v in p.items()}, "states": {"param": p, "exp_avg": {k: torch.randn(v.shape, generator=g) for k,v in p.items()}},
         "layout": lay.to_dict(), "groups": [sorted(p)]}
    z = save_zero(u, tmp_path/"zero"/"global_step4", tp=1, dp=2)
    ds_to_universal(z, tmp_path/"zero"/"global_step4_universal")          # and `latest_universal` beside it
    shutil.copytree(dcp_folder[0], tmp_path/"dcp")
    return {"training": save(tmp_path/"ck", model={"w": torch.arange(6.0), "b": torch.ones(3)}, extra={"lr": 0.5}, rng=False),
            "universal": save_universal(u, tmp_path/"u"), "tp": save_tp(from_universal(u, 2), tmp_path/"tp", lay),
            "dcp": tmp_path/"dcp", "zero": z, "zero_root": tmp_path/"zero"}

@pytest.mark.parametrize("folder,fname,reader", [
    ("training", "state.json", lambda d: load(d, rng=False)), ("training", "state.json", lambda d: load(d, rng=False, verify=False)),
    ("training", "manifest.json", lambda d: load(d, rng=False)), ("training", "manifest.json", verify),
    ("training", "model.safetensors", verify), ("universal", "universal.json", load_universal), ("tp", "tp_layout.json", load_tp),
    ("dcp", ".metadata", lambda d: dcp_load(d, tiny_model())), ("dcp", ".metadata", lambda d: dcp_to_hf(d, d.parent/"hf")),
    ("dcp", "manifest.json", lambda d: dcp_to_hf(d, d.parent/"hf")), ("zero_root", "latest_universal", load_deepspeed_universal),
    ("zero", "manifest.json", read_zero)])
def test_fifo_in_place_of_a_small_file_is_refused(small_folders, folder, fname, reader):
    "A FIFO where a reader expects an index, manifest, state or metadata file: refused by name (never opened: it would block)."
    d = small_folders[folder]; (d/fname).unlink(); os.mkfifo(d/fname)
    with _no_hang(), pytest.raises(CheckpointError, match=re.escape(fname)): reader(d)

def test_manifest_names_leaving_the_folder_are_refused(small_folders, tmp_path):
    "A re-hashed manifest naming ../outside.safetensors, or a file of the folder linking outside it: load and verify refuse it."
    d = small_folders["training"]; m = read_manifest(d); f0 = m["model_files"][0]
    shutil.move(d/f0, tmp_path/"outside.safetensors")
    m["model_files"][0] = "../outside.safetensors"; m["files"]["../outside.safetensors"] = m["files"].pop(f0)
    m["manifest_sha256"] = _manifest_hash(m); (d/"manifest.json").write_text(json.dumps(m))
    for fn in (lambda: load(d, rng=False), lambda: load(d, rng=False, verify=False), lambda: verify(d)):
        with pytest.raises(CheckpointError, match="outside the folder"): fn()
    assert any("outside the folder" in i.problem for i in verify(d, strict=False))
    s = small_folders["universal"]; shutil.move(s/"param.safetensors", tmp_path/"param.safetensors"); os.symlink(tmp_path/"param.safetensors", s/"param.safetensors")
    with pytest.raises(CheckpointError, match="outside the folder"): load_universal(s)      # the link is followed, and leaves the folder

def _flip_inside(f, data:bytes):
    "Flip one bit in the middle of `data`, found in file `f`."
    pos = f.read_bytes().find(data); assert pos >= 0
    _flip(f, pos + len(data) // 2)

def test_dcp_to_hf_checks_what_it_reads_against_the_manifest(small_folders, dcp_folder, tmp_path):
    "A flipped bit in a tensor's bytes of a DCP data file or in .metadata: dcp_to_hf names the file (it returned other weights before)."
    d = small_folders["dcp"]; ref = dcp_to_hf(d, tmp_path/"ref")
    f = d/"__0_0.distcp"; raw = f.read_bytes()
    _flip_inside(f, dcp_folder[1].state_dict()["model.layers.0.mlp.up_proj.weight"].numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: the chunk at byte \d+ is corrupt: its SHA-256 differs"): dcp_to_hf(d, tmp_path/"hf")
    f.write_bytes(raw); md = (d/".metadata").read_bytes(); _flip(d/".metadata", len(md) // 2)
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt"): dcp_to_hf(d, tmp_path/"hf")
    (d/".metadata").write_bytes(md); (d/"manifest.json").unlink(); f.write_bytes(raw[:len(raw) // 3])   # no manifest: a cut file
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp"): dcp_to_hf(d, tmp_path/"hf2")          # a CheckpointError, not torch's RuntimeError
    assert not (tmp_path/"hf").exists() and not (tmp_path/"hf2").exists() and ref.exists()

def test_save_zero_writes_a_manifest_that_read_zero_checks(small_folders):
    "save_zero records every file's SHA-256; read_zero and ds_to_universal refuse a flipped bit in a rank file's tensor (read silently before)."
    z = small_folders["zero"]; m = read_manifest(z)
    assert m["kind"] == "zero" and set(m["files"]) == {p.name for p in z.iterdir()} - {"manifest.json", "lineage.json"}
    f = z/"zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _flip_inside(f, _ds_load(f)["optimizer_state_dict"]["single_partition_of_fp32_groups"][0].numpy().tobytes())
    for fn in (read_zero, lambda s: ds_to_universal(s, s.parent/"u2")):
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(z))} failed verification\n  {f.name}: SHA-256 differs"): fn(z)
    assert not (z.parent/"u2").exists()
    (z/"manifest.json").unlink(); read_zero(z)                           # DeepSpeed's own folders have no manifest: read as they are

@pytest.mark.parametrize("key", ["param_slice_mappings", "base_optimizer_state", "single_partition_of_fp32_groups"])
def test_zero_rank_file_without_a_record_names_file_and_key(small_folders, key):
    "A ZeRO rank file without a record DeepSpeed always writes: a CheckpointError naming the file and the key (a raw KeyError before)."
    z = small_folders["zero"]; (z/"manifest.json").unlink()             # as DeepSpeed writes it
    f = z/"zero_pp_rank_0_mp_rank_00_optim_states.pt"
    obj = _ds_load(f); del obj["optimizer_state_dict"][key]; b = _ds_bytes(obj); f.write_bytes(b)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(f))}: optimizer_state_dict\['{key}'\] is missing"): read_zero(z)

def test_zero_stage_mismatch_names_the_folder_and_both_files(small_folders):
    z = small_folders["zero"]; (z/"manifest.json").unlink()
    f = z/"zero_pp_rank_0_mp_rank_00_optim_states.pt"
    obj = _ds_load(f); obj["optimizer_state_dict"]["zero_stage"] = 1; b = _ds_bytes(obj); f.write_bytes(b)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(z))}: zero_pp_rank_1_mp_rank_00_optim_states\.pt has zero_stage 2 but {f.name} has 1"): read_zero(z)
