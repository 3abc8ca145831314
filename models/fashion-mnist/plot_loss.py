#!/usr/bin/python3
"""Draws the training curves of logs/*.csv (losses, the VAE's held-out reconstruction) as one SVG (no plotting library needed).

  /usr/bin/python3 models/fashion-mnist/plot_loss.py   ->  models/fashion-mnist/loss.svg
"""
import csv
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# (csv in logs/, columns, title)
PANELS = [("dit_loss", ["loss", "mse"], "DiT: hybrid loss and its MSE term"),
          ("vae_loss", ["l1", "l2"], "VAE: training reconstruction (per pixel)"),
          ("vae_eval", ["test_l1", "test_mse"], "VAE: 1,000 held-out test images"),
          ("classifier_loss", ["loss"], "classifier: cross-entropy")]
COLORS = ["#1f77b4", "#d62728", "#2ca02c"]
W, H, PAD = 420, 220, 40


def panel(name, keys, title, ox):
    with open(os.path.join(HERE, "logs", f"{name}.csv")) as f:
        rows = list(csv.DictReader(f))
    steps = [float(r["step"]) for r in rows]
    out = [f'<text x="{ox + W / 2}" y="16" text-anchor="middle" font-size="13">{title}</text>']
    vals = [math.log10(float(r[k])) for r in rows for k in keys if float(r[k]) > 0]
    lo, hi = min(vals), max(vals)
    x = lambda s: ox + PAD + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (W - 2 * PAD)  # noqa: E731
    y = lambda v: 24 + (hi - v) / max(1e-9, hi - lo) * (H - PAD - 24)  # noqa: E731
    out.append(f'<rect x="{ox + PAD}" y="24" width="{W - 2 * PAD}" height="{H - PAD - 24}" fill="none" stroke="#999"/>')
    for i, k in enumerate(keys):
        pts = " ".join(f"{x(float(r['step'])):.1f},{y(math.log10(float(r[k]))):.1f}" for r in rows if float(r[k]) > 0)
        out.append(f'<polyline fill="none" stroke="{COLORS[i]}" stroke-width="1.5" points="{pts}"/>')
        out.append(f'<text x="{ox + W - PAD - 4}" y="{40 + 14 * i}" text-anchor="end" font-size="11" fill="{COLORS[i]}">{k}</text>')
    for v in (lo, hi):
        out.append(f'<text x="{ox + PAD - 4}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="10">{10 ** v:.3g}</text>')
    out.append(f'<text x="{ox + PAD}" y="{H - PAD + 14}" font-size="10">step {int(steps[0])}</text>')
    out.append(f'<text x="{ox + W - PAD}" y="{H - PAD + 14}" text-anchor="end" font-size="10">{int(steps[-1])}</text>')
    out.append(f'<text x="{ox + W / 2}" y="{H - 8}" text-anchor="middle" font-size="10">training step (log-scale loss)</text>')
    return out


def main():
    parts = []
    for i, (name, keys, title) in enumerate(PANELS):
        parts += panel(name, keys, title, i * W)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(PANELS)}" height="{H}" font-family="sans-serif">'
           f'<rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>\n')
    out = os.path.join(HERE, "loss.svg")
    with open(out, "w") as f:
        f.write(svg)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
