"""RigL sparse training under torch.distributed DDP, on CPU with the gloo backend.

Run on one machine with two processes::

    torchrun --nproc_per_node 2 examples/ddp_rigl.py                 # Fashion-MNIST, LeNet-300-100
    torchrun --nproc_per_node 2 examples/ddp_rigl.py --synthetic     # no data files needed

Resume a run exactly (the checkpoint holds the model, the optimizer, the
Sparsifier and every rank's data RNG; rank 0 writes it atomically)::

    torchrun --nproc_per_node 2 examples/ddp_rigl.py --steps 400 --stop-after 200 --checkpoint ckpt.pt
    torchrun --nproc_per_node 2 examples/ddp_rigl.py --steps 400 --resume ckpt.pt

The pattern (see docs/distributed.md): every rank builds the same model and
attaches the Sparsifier, with the optimizer, to it *before* wrapping it in
DistributedDataParallel, then calls ``sparsifier.step()`` after every
``optimizer.step()``. The Sparsifier broadcasts rank 0's masks after every
mask update, so every rank trains the same sparse network.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparseforge as sf
from sparseforge.distributed import check_masks_identical, mask_digest
from sparseforge.files import atomic_path
from sparseforge.zoo import LeNet300100, evaluate, fashion_mnist
from sparseforge.zoo.data import TensorLoader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of the whole run (default 600)")
    p.add_argument("--sparsity", type=float, default=0.9, help="model-level sparsity (default 0.9)")
    p.add_argument("--frequency", type=int, default=50, help="steps between RigL mask updates (default 50)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per rank per step (default 64)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default 0.05)")
    p.add_argument("--synthetic", action="store_true", help="a synthetic 10-class task instead of Fashion-MNIST")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST files (default: see sparseforge.zoo)")
    p.add_argument("--limit-train", type=int, default=None, help="use only this many training examples")
    p.add_argument("--checkpoint", default=None, help="write the training state here (rank 0, atomically)")
    p.add_argument("--stop-after", type=int, default=None, help="stop (and checkpoint) after this step")
    p.add_argument("--resume", default=None, help="continue from a checkpoint written by --checkpoint")
    return p.parse_args(argv)


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, TensorLoader]:
    """The whole training set (every rank draws its own batches from it) and a test loader."""
    if args.synthetic:
        # Ten noisy clusters: learnable in a few hundred steps.
        gen = torch.Generator().manual_seed(0)
        centers = torch.randn(10, 784, generator=gen) * 0.1
        y, yt = torch.randint(0, 10, (args.limit_train or 8192,), generator=gen), torch.arange(1024) % 10
        x = centers[y] + torch.randn(len(y), 784, generator=gen)
        xt = centers[yt] + torch.randn(len(yt), 784, generator=gen)
        return x, y, TensorLoader(xt, yt, batch_size=512)
    train, test = fashion_mnist(batch_size=512, data_dir=args.data_dir, limit_train=args.limit_train, flatten=True)
    return train.x, train.y, test


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and return this rank's summary (loss, accuracy, sparsity, mask digest).

    Uses the process group when one is initialised (e.g. by a test harness),
    else initialises gloo from torchrun's environment variables.
    """
    args = parse_args(argv)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        x, y, test = load_data(args)
        torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
        model = LeNet300100()
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        # 1. Attach the Sparsifier to the plain model, with the optimizer, on every rank ...
        sparsifier = sf.Sparsifier(
            model, sf.methods.RigL(args.sparsity, frequency=args.frequency), total_steps=args.steps, optimizer=optimizer
        )
        # 2. ... then wrap it. DDP averages the gradients, RigL regrows by them.
        ddp_model = DistributedDataParallel(model)
        # Each rank draws different batches: its own generator, whose state is checkpointed.
        data_gen = torch.Generator().manual_seed(1000 + rank)
        start = 0
        if args.resume:
            state = torch.load(args.resume, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            sparsifier.load_state_dict(state["sparsifier"])
            data_gen.set_state(state["data_rng"][rank])
            start = state["step"]
        stop = min(args.steps, args.stop_after if args.stop_after is not None else args.steps)
        loss = torch.tensor(float("nan"))
        for step in range(start, stop):
            idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=data_gen)
            loss = nn.functional.cross_entropy(ddp_model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sparsifier.step()
        check_masks_identical(sparsifier)  # a collective; raises on every rank if any differs
        if args.checkpoint:
            # Every rank's data RNG state, then one file written by rank 0.
            rngs: list[Any] = [None] * world
            dist.all_gather_object(rngs, data_gen.get_state())
            if rank == 0:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "sparsifier": sparsifier.state_dict(), "data_rng": rngs, "step": stop}
                with atomic_path(args.checkpoint) as tmp:
                    torch.save(state, tmp)
            dist.barrier()  # nobody reads the checkpoint before it is complete
        metrics = evaluate(model, test)
        summary = {"rank": rank, "step": stop, "train_loss": float(loss.detach()), "test_accuracy": metrics["accuracy"],
                   "sparsity": sparsifier.sparsity(), "mask_digest": mask_digest(sparsifier)}
        if rank == 0:
            print(f"step {stop}/{args.steps}: train loss {summary['train_loss']:.3f}, test accuracy "
                  f"{summary['test_accuracy']:.1f}%, sparsity {summary['sparsity']:.3f}, {world} ranks, "
                  f"masks identical on every rank", flush=True)
        return summary
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
