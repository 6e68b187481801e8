"""Train the Fashion-MNIST ViT of :mod:`tcompile.models.fashion_vit` from scratch on CPU.

Why this schedule: at 56x56 the model sees 197 tokens, about 4.5x the cost of the 50 tokens it
sees at 28x28, and the build machines give one CPU thread to this job. So most epochs run at
28x28 (7x7 grid, position embeddings interpolated from the 14x14 table with HF's
``interpolate_pos_encoding=True``), and the final epoch(s) fine-tune at 56x56 so that the
patch embedding adapts to the full-resolution token scale (FixRes-style). The model is evaluated
at 56x56 / 197 tokens on the full 10k test split, and the weights plus a JSON record of the run
are written next to :data:`FASHION_VIT_WEIGHTS`.

    python -m tcompile.models.train_fashion_vit [--epochs 5] [--hires-epochs 1] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

# `python -m` from the repo root puts it on sys.path, where the top-level `kernels/` source folder
# (installed as tcompile.kernels, guarded against top-level import) shadows Hugging Face's
# optional `kernels` package that transformers probes on import. Drop the repo root first, as
# tests/conftest.py does; tcompile itself is imported as installed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tcompile.models.data import fashion_mnist, fashion_mnist_raw, to_model_input  # noqa: E402
from tcompile.models.fashion_vit import FASHION_VIT_WEIGHTS, IMAGE_SIZE, fashion_vit_config  # noqa: E402

LOW_RES = 28
# Light augmentation: the run is short (underfitting, not overfitting, is the risk) and the
# test images are centred, so only flips and a 1-pixel shift.
MAX_SHIFT = 1  # pixels (at 28x28) of random translation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=3.5, help="epochs at 28x28 (50 tokens)")
    p.add_argument("--hires-epochs", type=float, default=0.3, help="final epochs at 56x56 (197 tokens)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate of the 28x28 phase")
    p.add_argument("--hires-lr", type=float, default=5e-4, help="peak learning rate of the 56x56 phase")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of each phase")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(FASHION_VIT_WEIGHTS))
    p.add_argument("--probe", type=int, default=0,
                   help="only time this many steps at each resolution, then exit (sizing the run)")
    return p.parse_args(argv)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to MAX_SHIFT pixels on uint8 [B, 28, 28]."""
    b = images.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    images = torch.where(flip[:, None, None], images.flip(-1), images)
    # Zero padding is the Fashion-MNIST background, so shifting does not invent edges.
    padded = F.pad(images, (MAX_SHIFT,) * 4)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, dy:dy + 28, dx:dx + 28] for i, (dy, dx) in enumerate(offsets)])


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup then cosine decay to zero, within one phase."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on preprocessed images at their native size."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(pixel_values=images[i:i + batch_size],
                       interpolate_pos_encoding=images.shape[-1] != IMAGE_SIZE).logits
        correct += int((logits.argmax(-1) == labels[i:i + batch_size]).sum())
    return correct / len(images)


def log_val(model: torch.nn.Module, images: np.ndarray, labels: torch.Tensor,
            sizes: tuple[int, ...], t0: float) -> None:
    """Print accuracy on a fixed test slice at the given resolutions (progress only)."""
    accs = " ".join(f"acc@{size} {evaluate(model, to_model_input(images, size), labels):.4f}"
                    for size in sizes)
    print(f"  val({len(labels)}) {accs} (elapsed {time.time() - t0:.0f}s)", flush=True)


def phases(args: argparse.Namespace, n_train: int) -> list[tuple[int, int, float]]:
    """(resolution, steps, peak lr) per phase: low-res epochs, then the full-resolution fine-tune.

    Each phase has its own warmup + cosine: the fine-tune must re-adapt the patch embedding to a
    token that covers 2x2 instead of 4x4 source pixels, which a learning rate at the tail of one
    long cosine would be too small for.
    """
    per_epoch = n_train // args.batch_size
    return [(LOW_RES, round(args.epochs * per_epoch), args.lr),
            (IMAGE_SIZE, round(args.hires_epochs * per_epoch), args.hires_lr)]


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    raw_x, raw_y = fashion_mnist_raw("train")
    train_x = torch.from_numpy(np.array(raw_x))
    train_y = torch.from_numpy(np.asarray(raw_y, dtype=np.int64))
    n = len(train_x)

    model = transformers.ViTForImageClassification(fashion_vit_config())
    n_params = sum(p.numel() for p in model.parameters())

    # No weight decay on biases, LayerNorm weights and the CLS/position embeddings.
    def decays(name: str, p: torch.Tensor) -> bool:
        return p.ndim >= 2 and not name.endswith(("cls_token", "position_embeddings"))

    named = list(model.named_parameters())
    decay = [p for name, p in named if decays(name, p)]
    no_decay = [p for name, p in named if not decays(name, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    plan = phases(args, n)
    print(f"params {n_params}, threads {args.threads}, plan (res, steps, lr) {plan}", flush=True)
    # A fixed slice of the test split, for progress lines only; the reported figure is the full 10k.
    val_x, val_y = fashion_mnist_raw("test")
    val_x, val_y = val_x[:1000], torch.from_numpy(np.asarray(val_y[:1000], dtype=np.int64))

    perm, cursor = torch.randperm(n, generator=gen), 0
    per_epoch = n // args.batch_size
    t0 = time.time()
    for res, steps, peak in plan:
        if args.probe:
            steps = args.probe
        warmup = max(1, round(args.warmup * steps))
        model.train()
        t_phase, loss_sum, loss_n = time.time(), 0.0, 0
        for k in range(steps):
            if cursor + args.batch_size > n:  # reshuffle each epoch; drop the ragged tail
                perm, cursor = torch.randperm(n, generator=gen), 0
            idx = perm[cursor:cursor + args.batch_size]
            cursor += args.batch_size
            x = to_model_input(augment(train_x[idx], gen), size=res)
            for group in opt.param_groups:
                group["lr"] = lr_at(k, steps, warmup, peak)
            logits = model(pixel_values=x, interpolate_pos_encoding=res != IMAGE_SIZE).logits
            loss = F.cross_entropy(logits, train_y[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if (k + 1) % 100 == 0 or k + 1 == steps:
                ms = 1000 * (time.time() - t_phase) / (k + 1)
                print(f"res {res} step {k + 1}/{steps} loss "
                      f"{loss_sum / loss_n:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                      f"{ms:.0f} ms/step elapsed {time.time() - t0:.0f}s", flush=True)
                loss_sum, loss_n = 0.0, 0
            if not args.probe and ((k + 1) % per_epoch == 0 or k + 1 == steps):
                # 56x56 costs ~4.5x more, so only at phase ends (how far the fine-tune has to go).
                log_val(model, val_x, val_y, (LOW_RES, IMAGE_SIZE) if k + 1 == steps else (res,), t0)
                model.train()
        if args.probe:
            ms = 1000 * (time.time() - t_phase) / steps
            print(f"PROBE res {res}: {ms:.0f} ms/step -> {ms * per_epoch / 1000:.0f} s/epoch", flush=True)
    if args.probe:
        return
    train_seconds = time.time() - t0

    test_x, test_y = fashion_mnist("test", size=IMAGE_SIZE)
    t_eval = time.time()
    acc = evaluate(model, test_x, test_y)
    print(f"test accuracy {acc:.4f} on {len(test_x)} images at {IMAGE_SIZE}x{IMAGE_SIZE} "
          f"({time.time() - t_eval:.0f}s)", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out))
    record = {
        "test_accuracy": acc,
        "n_test": len(test_x),
        "eval_resolution": IMAGE_SIZE,
        "eval_tokens": (IMAGE_SIZE // fashion_vit_config().patch_size) ** 2 + 1,
        "epochs": args.epochs + args.hires_epochs,  # both phases; split below
        "schedule": (
            f"phase 1: {args.epochs:g} epochs at {LOW_RES}x{LOW_RES} (50 tokens, position "
            f"embeddings interpolated from the 14x14 table), {plan[0][1]} steps, peak lr "
            f"{args.lr:g}; phase 2: {args.hires_epochs:g} epochs at {IMAGE_SIZE}x{IMAGE_SIZE} "
            f"(197 tokens), {plan[1][1]} steps, peak lr {args.hires_lr:g}; each phase: linear "
            f"warmup over {args.warmup:g} of its steps then cosine to 0. AdamW wd "
            f"{args.weight_decay:g} (not on biases/norms/cls/pos), batch {args.batch_size}, "
            f"label smoothing {args.label_smoothing:g}, grad clip 1.0, augmentation: random "
            f"horizontal flip + random shift <= {MAX_SHIFT}px (at 28x28), seed {args.seed}"
        ),
        "epochs_low_res": args.epochs,
        "epochs_full_res": args.hires_epochs,
        "train_seconds": round(train_seconds, 1),  # includes the small progress evaluations
        "threads": args.threads,
        "command": " ".join([Path(sys.executable).name, "-m", "tcompile.models.train_fashion_vit",
                             *sys.argv[1:]]),
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parameters": n_params,
        "weights_bytes": out.stat().st_size,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2), flush=True)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
