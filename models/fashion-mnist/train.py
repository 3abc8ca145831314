#!/usr/bin/python3
"""Offline training tool for the Fashion-MNIST latent DiT (offline only; never used at serve time).

Subcommands (run in this order; see run.sh):
  vae         train the KL autoencoder              -> vae.safetensors
  encode      encode the training set, compute the latent scaling factor -> runs/latents.pt, vae.json
  dit         train the DiT on the latents (EMA)    -> dit.safetensors, dit.json
  classifier  train the evaluation CNN              -> classifier.safetensors, classifier.json
Every training stage is seeded and resumable (--resume) from runs/<stage>/ckpt.pt.
"""
import argparse
import copy
import csv
import gzip
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from diffusion import Diffusion  # noqa: E402
from nets import DiT, AutoencoderKL, Classifier  # noqa: E402

DATA = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
PAD = 2  # 28x28 -> 32x32, padded with the background value (-1)


# --------------------------------------------------------------------------- data
def read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split):
    """Images as float32 NCHW in [-1, 1], 28x28; labels int64."""
    pre = "train" if split == "train" else "t10k"
    x = read_idx(f"{DATA}/{pre}-images-idx3-ubyte.gz")
    y = read_idx(f"{DATA}/{pre}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(y.astype(np.int64))


def pad32(x):
    return F.pad(x, (PAD, PAD, PAD, PAD), value=-1.0)


# --------------------------------------------------------------------------- safetensors
_DT = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}
_DT_INV = {v: k for k, v in _DT.items()}


def save_safetensors(path, tensors, metadata=None):
    header, blobs, off = {}, [], 0
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        b = t.numpy().tobytes()
        header[k] = {"dtype": _DT[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = torch.frombuffer(bytearray(data[a:b]), dtype=_DT_INV[v["dtype"]]).reshape(v["shape"]).clone()
    return out


# --------------------------------------------------------------------------- training loop helpers
class Run:
    """Checkpointing, CSV loss log and progress printing shared by the stages."""

    def __init__(self, args, stage, fields):
        self.dir = os.path.join(args.runs, stage)
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(args.logs, exist_ok=True)
        self.ckpt = os.path.join(self.dir, "ckpt.pt")
        self.csv = os.path.join(args.logs, f"{stage}_loss.csv")
        self.fields = fields
        self.stage = stage
        self.steps = args.steps
        self.max_s = args.max_minutes * 60 if args.max_minutes else None
        self.until = None
        if args.until:
            # HH:MM local clock time (today, or tomorrow when it is after midnight): lets the last stage
            # absorb whatever time earlier stages left
            hh, mm = (int(v) for v in args.until.split(":"))
            lt = time.localtime()
            self.until = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, hh, mm, 0, 0, 0, -1))
            if self.until <= time.time() - 12 * 3600:
                self.until += 24 * 3600  # a time after midnight: tomorrow's
        self.step = 0
        self.prior_s = 0.0  # wall time spent before a resume
        self.t0 = time.time()
        self.last_ckpt = time.time()
        self.acc = {f: 0.0 for f in fields}
        self.n = 0
        self.win_t = time.time()
        self.win_step = 0

    def elapsed(self):
        return self.prior_s + time.time() - self.t0

    def load(self, resume):
        if resume and os.path.exists(self.ckpt):
            st = torch.load(self.ckpt, map_location="cpu")
            self.step = st["step"]
            self.prior_s = st["elapsed_s"]
            self.win_step = self.step
            print(f"[{self.stage}] resumed from {self.ckpt} at step {self.step}", flush=True)
            return st
        self.new_log()
        return None

    def new_log(self):
        """Starts the loss CSV afresh (its header only)."""
        with open(self.csv, "w", newline="") as f:
            csv.writer(f).writerow(["step", *self.fields, "elapsed_s"])

    def continue_from(self, step, elapsed_s):
        """A warm start: count on from an exported model's steps and time, appending to its loss log."""
        self.step = self.win_step = step
        self.prior_s = elapsed_s
        print(f"[{self.stage}] warm start from the exported weights at step {step}", flush=True)
        if not os.path.exists(self.csv):
            self.new_log()

    def save(self, state):
        state = dict(state, step=self.step, elapsed_s=self.elapsed())
        torch.save(state, self.ckpt + ".tmp")
        os.replace(self.ckpt + ".tmp", self.ckpt)
        self.last_ckpt = time.time()

    def done(self):
        if self.step >= self.steps:
            return True
        if self.max_s is not None and self.elapsed() >= self.max_s:
            print(f"[{self.stage}] time budget reached at step {self.step}", flush=True)
            return True
        if self.until is not None and time.time() >= self.until:
            print(f"[{self.stage}] --until deadline reached at step {self.step}", flush=True)
            return True
        return False

    def record(self, log_every, **vals):
        for k, v in vals.items():
            self.acc[k] += float(v)
        self.n += 1
        if self.step % log_every == 0 or self.step == self.steps:
            now = time.time()
            sps = (self.step - self.win_step) / max(now - self.win_t, 1e-9)
            self.win_t, self.win_step = now, self.step
            means = {k: self.acc[k] / self.n for k in self.fields}
            eta = (self.steps - self.step) / max(sps, 1e-9)
            if self.max_s is not None:
                eta = min(eta, max(self.max_s - self.elapsed(), 0.0))
            if self.until is not None:
                eta = min(eta, max(self.until - now, 0.0))
            txt = " ".join(f"{k}={v:.5f}" for k, v in means.items())
            print(f"[{self.stage}] step {self.step}/{self.steps} {txt} {sps:.2f} steps/s "
                  f"elapsed {self.elapsed() / 60:.1f}m ETA {eta / 60:.1f}m", flush=True)
            with open(self.csv, "a", newline="") as f:
                csv.writer(f).writerow([self.step, *[f"{means[k]:.6f}" for k in self.fields],
                                        f"{self.elapsed():.1f}"])
            self.acc = {f: 0.0 for f in self.fields}
            self.n = 0

    def maybe_ckpt(self, every_s, state_fn):
        if time.time() - self.last_ckpt >= every_s:
            self.save(state_fn())


def step_gen(seed, step):
    # a generator per step keeps a resumed run bit-identical without saving RNG state
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def cosine_lr(args, step):
    """--cosine: lr decays from --lr to --lr * --min-lr-ratio over --steps (half a cosine), after
    --warmup linear steps; without it the rate stays at --lr (what the original DiT training does)."""
    if args.warmup and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if not args.cosine:
        return args.lr
    frac = min(max(step - args.warmup, 0) / max(args.steps - args.warmup, 1), 1.0)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def vae_config(args):
    return {"latent_channels": 4, "block_out_channels": args.vae_channels, "layers_per_block": args.vae_layers,
            "in_channels": 1, "out_channels": 1, "norm_num_groups": args.vae_groups, "latent_size": 8,
            "sample_size": 32, "legacy_attention_names": False}


def build_vae(cfg):
    return AutoencoderKL(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                         latent_channels=cfg["latent_channels"], block_out_channels=cfg["block_out_channels"],
                         layers_per_block=cfg["layers_per_block"], norm_num_groups=cfg["norm_num_groups"])


def load_vae(folder):
    """The committed (or freshly trained) VAE from folder/vae.json + vae.safetensors, in eval mode."""
    meta = json.load(open(os.path.join(folder, "vae.json")))
    vae = build_vae(meta["config"])
    vae.load_state_dict(load_safetensors(os.path.join(folder, "vae.safetensors")))
    vae.eval()
    return vae, meta


def nparams(m):
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- stages
def cmd_vae(args):
    torch.manual_seed(args.seed)
    cfg = vae_config(args)
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    x, _ = load_split("train")
    x = pad32(x)
    run = Run(args, "vae", ["loss", "l1", "l2", "kl"])
    st = run.load(args.resume)
    if st:
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
    # Held-out curve: the first 1,000 test images through the autoencoder every --eval-every steps
    # (posterior mean), so convergence is judged on images the autoencoder never trains on.
    xt = pad32(load_split("test")[0][:1000])
    eval_csv = os.path.join(args.logs, "vae_eval.csv")
    if not st or not os.path.exists(eval_csv):
        with open(eval_csv, "w", newline="") as f:
            csv.writer(f).writerow(["step", "test_l1", "test_mse", "elapsed_s"])
    print(f"[vae] params {nparams(vae)} (decoder+post_quant_conv "
          f"{nparams(vae.decoder) + nparams(vae.post_quant_conv)}) config {cfg}", flush=True)
    state = lambda: {"model": vae.state_dict(), "opt": opt.state_dict(), "config": cfg}  # noqa: E731
    vae.train()
    while not run.done():
        g = step_gen(args.seed, run.step)
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=g)
        xb = x[idx]
        mean, logvar = vae.encode(xb)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        rec = vae.decode(z)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args, run.step)
        # per-image sums averaged over the batch, as SD's autoencoder loss does
        l1 = (rec - xb).abs().sum(dim=(1, 2, 3)).mean()
        l2 = ((rec - xb) ** 2).sum(dim=(1, 2, 3)).mean()
        kl = 0.5 * (mean ** 2 + torch.exp(logvar) - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = l1 + l2 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.step += 1
        n = xb[0].numel()
        run.record(args.log_every, loss=loss.item() / n, l1=l1.item() / n, l2=l2.item() / n, kl=kl.item())
        if args.eval_every and (run.step % args.eval_every == 0 or run.done()):
            held_out(vae, xt, run.step, run.elapsed(), eval_csv)
        run.maybe_ckpt(args.ckpt_every, state)
    run.save(state())
    out = os.path.join(args.out, "vae.safetensors")
    save_safetensors(out, vae.state_dict(), {"format": "pt", "config": json.dumps(cfg)})
    with open(os.path.join(args.out, "vae.json"), "w") as f:
        json.dump({"config": cfg, "params": nparams(vae), "train_steps": run.step, "batch_size": args.batch,
                   "lr": args.lr, "lr_schedule": f"cosine to {args.min_lr_ratio} x lr" if args.cosine else "constant",
                   "train_minutes": round(run.elapsed() / 60, 1)}, f, indent=1)
    print(f"[vae] wrote {out} after {run.step} steps, {run.elapsed() / 60:.1f} min", flush=True)


@torch.no_grad()
def held_out(vae, xt, step, elapsed, path):
    vae.eval()
    mean, _ = vae.encode(xt)
    rec = vae.decode(mean)
    vae.train()
    l1, mse = float((rec - xt).abs().mean()), float(((rec - xt) ** 2).mean())
    print(f"[vae] step {step} held-out test L1 {l1:.5f} MSE {mse:.5f}", flush=True)
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow([step, f"{l1:.6f}", f"{mse:.6f}", f"{elapsed:.1f}"])


@torch.no_grad()
def cmd_encode(args):
    vae, meta = load_vae(args.out)
    t0 = time.time()
    x, y = load_split("train")
    means, stds = [], []
    for i in range(0, x.shape[0], args.batch):
        if args.max_minutes and time.time() - t0 > args.max_minutes * 60:
            # the DiT then trains on the encoded prefix (the idx files are in random class order)
            print(f"[encode] time budget reached; keeping the first {i} images", flush=True)
            x, y = x[:i], y[:i]
            break
        m, lv = vae.encode(pad32(x[i:i + args.batch]))
        means.append(m)
        stds.append(torch.exp(0.5 * lv))
        if (i // args.batch) % 20 == 0:
            print(f"[encode] {i + m.shape[0]}/{x.shape[0]} {time.time() - t0:.0f}s", flush=True)
    mean, std = torch.cat(means), torch.cat(stds)
    g = torch.Generator().manual_seed(args.seed)
    z = mean + std * torch.randn(mean.shape, generator=g)
    scaling = float(1.0 / z.std())
    # reconstruction error of the test set (mean of posterior decoded), for the model card
    xt, _ = load_split("test")
    errs = []
    for i in range(0, 1000, args.batch):
        xb = pad32(xt[i:i + args.batch])
        m, _ = vae.encode(xb)
        errs.append(((vae.decode(m) - xb) ** 2).mean(dim=(1, 2, 3)))
    test_mse = float(torch.cat(errs).mean())
    os.makedirs(args.runs, exist_ok=True)
    torch.save({"mean": mean, "std": std, "labels": y, "scaling_factor": scaling},
               os.path.join(args.runs, "latents.pt"))
    meta.update({"scaling_factor": scaling, "latent_mean": float(z.mean()), "latent_std_unscaled": float(z.std()),
                 "test_mse_1000": test_mse, "encoded_images": int(mean.shape[0]),
                 "input": "28x28 Fashion-MNIST in [-1,1], padded by 2 px of -1 to 32x32; crop [2:30,2:30] after decode",
                 # ditpipe's decoder crops this many pixels from each edge (model.json outputCrop)
                 "output_crop": PAD})
    with open(os.path.join(args.out, "vae.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"[encode] scaling_factor {scaling:.5f} test_mse {test_mse:.5f} in {time.time() - t0:.0f}s", flush=True)


def dit_config(args):
    return {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": args.hidden, "depth": args.depth,
            "num_heads": args.heads, "mlp_ratio": 4.0, "num_classes": 10, "learn_sigma": True,
            "class_dropout_prob": 0.1}


def cmd_dit(args):
    torch.manual_seed(args.seed)
    cfg = dit_config(args)
    model = DiT(**cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    lat = torch.load(os.path.join(args.runs, "latents.pt"))
    mean, std, labels, sf = lat["mean"], lat["std"], lat["labels"], lat["scaling_factor"]
    diff = Diffusion(1000)
    run = Run(args, "dit", ["loss", "mse", "vb"])
    warm = None
    if args.warm_start and not (args.resume and os.path.exists(run.ckpt)):
        with open(os.path.join(args.out, "dit.json")) as f:
            prior = json.load(f)
        if any(prior["config"][k] != cfg[k] for k in prior["config"]):
            sys.exit(f"--warm-start: {args.out}/dit.json has config {prior['config']}, this run {cfg}")
        w = load_safetensors(os.path.join(args.out, "dit.safetensors"))
        model.load_state_dict({k: v.float() for k, v in w.items()})
        ema.load_state_dict(model.state_dict())
        warm = {k: prior[k] for k in ("train_steps", "train_minutes", "lr", "lr_schedule") if k in prior}
        if "warm_start_from" in prior:
            warm["earlier"] = prior["warm_start_from"]
        run.continue_from(prior["train_steps"], prior["train_minutes"] * 60)
        st = None
    else:
        st = run.load(args.resume)
    if st:
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        warm = st.get("warm")
    print(f"[dit] params {nparams(model)} config {cfg} ema_decay {args.ema_decay} scaling {sf:.5f}", flush=True)
    state = lambda: {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),  # noqa: E731
                     "config": cfg, "warm": warm}
    model.train()
    ema.eval()
    ema_params = [p for p in ema.parameters() if p.requires_grad is False]
    live_params = list(model.parameters())
    while not run.done():
        g = step_gen(args.seed, run.step)
        idx = torch.randint(0, mean.shape[0], (args.batch,), generator=g)
        # fresh posterior sample each step, like encoding on the fly in the original train.py
        x0 = (mean[idx] + std[idx] * torch.randn((args.batch, *mean.shape[1:]), generator=g)) * sf
        t = torch.randint(0, diff.num_timesteps, (args.batch,), generator=g)
        mse, vb = diff.training_losses(model, x0, t, labels[idx], g)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args, run.step)
        loss = (mse + vb).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            # warm-up of the decay (min(d, (1+n)/(10+n))) so a short run's EMA is not dominated by the
            # random init; it reaches args.ema_decay after a few hundred steps
            d = min(args.ema_decay, (1 + run.step) / (10 + run.step))
            for pe, pm in zip(ema_params, live_params):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        run.step += 1
        run.record(args.log_every, loss=loss.item(), mse=mse.mean().item(), vb=vb.mean().item())
        run.maybe_ckpt(args.ckpt_every, state)
    run.save(state())
    dtype = torch.float16 if args.fp16 else torch.float32
    sd = {k: v.to(dtype) for k, v in ema.state_dict().items()}
    out = os.path.join(args.out, "dit.safetensors")
    save_safetensors(out, sd, {"format": "pt", "config": json.dumps(cfg)})
    meta = {"config": {k: v for k, v in cfg.items() if k not in ("mlp_ratio", "class_dropout_prob")},
            "mlp_ratio": cfg["mlp_ratio"], "class_dropout_prob": cfg["class_dropout_prob"],
            "class_names": CLASS_NAMES, "params": nparams(model), "weights_dtype": "float16" if args.fp16 else "float32",
            "ema_decay": args.ema_decay, "train_steps": run.step, "batch_size": args.batch, "lr": args.lr,
            "lr_schedule": f"cosine to {args.min_lr_ratio} x lr over {args.steps} steps" if args.cosine else "constant",
            **({"warm_start_from": warm} if warm else {}),
            "train_minutes": round(run.elapsed() / 60, 1), "latent_scaling_factor": sf,
            "diffusion": {"schedule": "linear", "steps": 1000, "beta_start": 0.0001, "beta_end": 0.02}}
    with open(os.path.join(args.out, "dit.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"[dit] wrote {out} after {run.step} steps, {run.elapsed() / 60:.1f} min", flush=True)


def cmd_classifier(args):
    torch.manual_seed(args.seed)
    net = Classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    x, y = load_split("train")
    xt, yt = load_split("test")
    run = Run(args, "classifier", ["loss", "acc"])
    st = run.load(args.resume)
    if st:
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
    print(f"[classifier] params {nparams(net)}", flush=True)
    state = lambda: {"model": net.state_dict(), "opt": opt.state_dict()}  # noqa: E731
    while not run.done():
        net.train()
        g = step_gen(args.seed, run.step)
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=g)
        xb = x[idx]
        # light augmentation: random horizontal flip (garments/shoes stay in class)
        flip = torch.rand(args.batch, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        logits = net(xb)
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.step += 1
        run.record(args.log_every, loss=loss.item(), acc=(logits.argmax(1) == y[idx]).float().mean().item())
        run.maybe_ckpt(args.ckpt_every, state)
    run.save(state())
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(xt[i:i + 1000]).argmax(1) for i in range(0, xt.shape[0], 1000)])
    acc = float((pred == yt).float().mean())
    out = os.path.join(args.out, "classifier.safetensors")
    save_safetensors(out, net.state_dict(), {"format": "pt"})
    with open(os.path.join(args.out, "classifier.json"), "w") as f:
        json.dump({"test_accuracy": acc, "params": nparams(net), "train_steps": run.step, "batch_size": args.batch,
                   "train_minutes": round(run.elapsed() / 60, 1), "class_names": CLASS_NAMES,
                   "input": "N x 1 x 28 x 28 float in [-1,1] (pixel/127.5-1)",
                   "features": "relu(fc1(...)), 128-d penultimate layer"}, f, indent=1)
    print(f"[classifier] test accuracy {acc * 100:.2f}% wrote {out}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def schedule(sp):
        sp.add_argument("--cosine", action="store_true", help="decay the learning rate over --steps (half a cosine)")
        sp.add_argument("--min-lr-ratio", type=float, default=0.05, help="with --cosine: the last step's rate / --lr")
        sp.add_argument("--warmup", type=int, default=0, help="linear warm-up steps of the learning rate")

    def common(sp, steps, batch, lr, log_every):
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--steps", type=int, default=steps)
        sp.add_argument("--batch", type=int, default=batch)
        sp.add_argument("--lr", type=float, default=lr)
        sp.add_argument("--resume", action="store_true")
        sp.add_argument("--max-minutes", type=float, default=None,
                        help="stop (and export) once this much wall time is spent, even before --steps")
        sp.add_argument("--until", default=None, help="HH:MM clock time at which to stop (and export)")
        sp.add_argument("--log-every", type=int, default=log_every)
        sp.add_argument("--ckpt-every", type=float, default=120.0, help="seconds between checkpoints")
        sp.add_argument("--threads", type=int, default=2)
        sp.add_argument("--out", default=HERE)
        sp.add_argument("--runs", default=os.path.join(HERE, "runs"))
        sp.add_argument("--logs", default=os.path.join(HERE, "logs"))

    sp = sub.add_parser("vae")
    common(sp, 3000, 64, 5e-4, 50)
    sp.add_argument("--vae-channels", type=int, nargs="+", default=[32, 64, 64])
    sp.add_argument("--vae-layers", type=int, default=1)
    sp.add_argument("--vae-groups", type=int, default=32)
    sp.add_argument("--kl-weight", type=float, default=1e-6)
    schedule(sp)
    sp.add_argument("--eval-every", type=int, default=200, help="steps between held-out reconstruction checks (0: none)")
    sp = sub.add_parser("encode")
    common(sp, 0, 500, 0.0, 1)
    sp = sub.add_parser("dit")
    common(sp, 10000, 256, 1e-4, 50)
    sp.add_argument("--hidden", type=int, default=128)
    sp.add_argument("--depth", type=int, default=6)
    sp.add_argument("--heads", type=int, default=4)
    sp.add_argument("--ema-decay", type=float, default=0.998)
    sp.add_argument("--fp16", action="store_true")
    schedule(sp)
    sp.add_argument("--warm-start", action="store_true",
                    help="continue from the exported EMA weights in --out (dit.safetensors, dit.json): their steps "
                         "and minutes count on, the loss log is appended to, the optimizer starts fresh")
    sp = sub.add_parser("classifier")
    common(sp, 1500, 128, 1e-3, 100)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"vae": cmd_vae, "encode": cmd_encode, "dit": cmd_dit, "classifier": cmd_classifier}[args.cmd](args)


if __name__ == "__main__":
    main()
