#!/usr/bin/python3
"""Prints the model card's training table from the *.json files and logs/*_loss.csv of a run."""
import csv
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def last_row(stage):
    path = os.path.join(HERE, "logs", f"{stage}_loss.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def main():
    vae = json.load(open(os.path.join(HERE, "vae.json")))
    dit = json.load(open(os.path.join(HERE, "dit.json")))
    cls = json.load(open(os.path.join(HERE, "classifier.json")))
    v, d, c = last_row("vae"), last_row("dit"), last_row("classifier")
    size = sum(os.path.getsize(os.path.join(HERE, f)) for f in
               ("vae.safetensors", "dit.safetensors", "classifier.safetensors"))
    print("| stage | steps × batch | time | final numbers |")
    print("|---|---|---|---|")
    print(f"| classifier | {cls['train_steps']} × {cls['batch_size']} | {cls['train_minutes']} min | "
          f"train loss {float(c.get('loss', 'nan')):.4f}, test accuracy {cls['test_accuracy'] * 100:.2f}% |")
    print(f"| vae | {vae['train_steps']} × {vae.get('batch_size', 64)} | {vae['train_minutes']} min | per-pixel L1 "
          f"{float(v['l1']):.4f}, L2 {float(v['l2']):.4f}, KL {float(v['kl']):.1f}; test MSE "
          f"{vae.get('test_mse_1000', float('nan')):.4f} |")
    print(f"| encode | {vae.get('encoded_images')} images | | scaling factor {vae.get('scaling_factor', float('nan')):.5f} |")
    print(f"| dit | {dit['train_steps']} × {dit['batch_size']} | {dit['train_minutes']} min | "
          f"loss {float(d['loss']):.4f} (mse {float(d['mse']):.4f}, vb {float(d['vb']):.4f}) |")
    print(f"\nparams: vae {vae['params']}, dit {dit['params']}, classifier {cls['params']}; "
          f"committed weights {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
