"Worker for tests/test_prune.py::test_distill_ddp: `accelerate launch --cpu --num_processes 2 tests/distill_ddp_worker.py OUT.json`."
import json, sys, warnings
import torch, torch.distributed as dist
warnings.simplefilter("ignore")
from model_ops.nn import tiny_model
from model_ops.prune import magnitude, prune_width
from model_ops.distill import distill

torch.set_num_threads(1)
data = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(0))
teacher = tiny_model(seed=0, initializer_range=0.1)
student = magnitude(prune_width(teacher, calib=data[:8], hidden=48, intermediate=96), sparsity=0.5)  # narrower and 50% sparse
seen = []
student.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].clone()), with_kwargs=True)
res = distill(student, teacher, data, hidden_weight=1.0, steps=12, lr=3e-3, batch_size=4, grad_accum=2, progress=False)

rank, world = dist.get_rank(), dist.get_world_size()
def gather(t):
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous()); return out
params = gather(torch.cat([p.detach().flatten() for p in student.parameters()]))
proj = gather(res.projector.weight.detach().flatten())
first = gather(seen[0])                                         # the first batch each rank trained on
losses = gather(torch.tensor(res.losses))
zeros = sum(int((p == 0).sum()) for n, p in student.named_parameters() if "proj" in n)
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(dict(world=world, processes=res.processes, losses=res.losses,
                       same_params=all(torch.equal(params[0], o) for o in params[1:]),
                       same_projector=all(torch.equal(proj[0], o) for o in proj[1:]),
                       projector_trained=not torch.equal(proj[0].reshape(64, 48), torch.eye(64, 48)),
                       same_losses=all(torch.equal(losses[0], o) for o in losses[1:]),
                       different_data=not torch.equal(first[0], first[1]),
                       zeros=zeros, distributed_type=str(__import__("accelerate").PartialState().distributed_type)), f)
dist.barrier()
dist.destroy_process_group()   # a gloo group still alive at interpreter shutdown can SIGABRT the process (seen once in CI)
