#!/usr/bin/python3
"""Scores generated sets (from eval_generate.ts) with the separately trained classifier:
class accuracy (does the classifier see the class that was asked for?) and the Frechet distance
between the classifier's penultimate features of the generated images and of the 10k test images.

Two reference rows come first: the two halves of the test set against each other (the floor of
this feature space), and the test images after a round trip through the VAE (posterior mean,
decoded, rounded to 8 bits, cropped): the best any latent model on this autoencoder can score.

  /usr/bin/python3 models/fashion-mnist/eval.py models/fashion-mnist/runs/eval/*.safetensors
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from nets import Classifier  # noqa: E402
from train import PAD, load_safetensors, load_split, load_vae, pad32  # noqa: E402


def features_and_logits(net, x):
    feats, logits = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], 1000):
            f = net.features(x[i:i + 1000])
            feats.append(f.double())
            logits.append(net.fc2(f))
    return torch.cat(feats), torch.cat(logits)


def vae_round_trip(x):
    """Test images through the committed VAE, quantized the way served images are."""
    vae, _ = load_vae(HERE)
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], 250):
            mean, _ = vae.encode(pad32(x[i:i + 250]))
            # This row runs the VAE in torch, not through ditpipe's decoder, so it crops the
            # padding itself, as the served model directory does (vae.json output_crop).
            rec = vae.decode(mean)[:, :, PAD:PAD + 28, PAD:PAD + 28]
            out.append(((rec + 1) * 127.5 + 0.5).floor().clamp(0, 255) / 127.5 - 1.0)
    return torch.cat(out)


def sqrtm_psd(m):
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    r1 = sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


def main():
    torch.manual_seed(0)
    net = Classifier()
    net.load_state_dict(load_safetensors(os.path.join(HERE, "classifier.safetensors")))
    net.eval()
    xt, yt = load_split("test")
    ft, lt = features_and_logits(net, xt)
    test_acc = float((lt.argmax(1) == yt).float().mean())
    # Reference: FD between two halves of the real test set (the floor for this feature space).
    half = ft.shape[0] // 2
    rows = [{"set": "test images (classifier check)", "n": int(xt.shape[0]), "class_accuracy": test_acc,
             "frechet_distance": frechet(ft[:half], ft[half:]), "note": "FD between the two halves of the test set"}]
    xr = vae_round_trip(xt)
    fr, lr = features_and_logits(net, xr)
    rows.append({"set": "test images through the VAE", "n": int(xr.shape[0]),
                 "class_accuracy": float((lr.argmax(1) == yt).float().mean()), "frechet_distance": frechet(fr, ft),
                 "note": "encode (posterior mean), decode, 8-bit rounding: the autoencoder's ceiling"})
    for path in sys.argv[1:]:
        d = load_safetensors(path)
        x = d["images"].float().unsqueeze(1) / 127.5 - 1.0
        y = d["labels"]
        f, logits = features_and_logits(net, x)
        rows.append({"set": os.path.basename(path).removesuffix(".safetensors"), "n": int(x.shape[0]),
                     "class_accuracy": float((logits.argmax(1) == y).float().mean()), "frechet_distance": frechet(f, ft)})
    print("| set | images | class accuracy | Frechet distance (classifier features) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['n']} | {r['class_accuracy'] * 100:.1f}% | {r['frechet_distance']:.2f} |")
    # EVAL_JSON: where to write the rows (default the model card's eval.json beside this file).
    out = os.environ.get("EVAL_JSON", os.path.join(HERE, "eval.json"))
    with open(out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
