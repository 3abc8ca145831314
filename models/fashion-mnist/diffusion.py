"""Training loss of the original DiT/ADM Gaussian diffusion for the case DiT uses:
linear 1000-step beta schedule, epsilon prediction, LossType.MSE with ModelVarType.LEARNED_RANGE
(loss = mean-flat MSE on eps + variational-bound term in bits with the mean frozen)."""
import math

import numpy as np
import torch


def _extract(arr, t, ndim):
    out = torch.from_numpy(arr).to(torch.float32)[t]
    return out.view(-1, *([1] * (ndim - 1)))


def _mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    cx = x - means
    inv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv * (cx + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv * (cx - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class Diffusion:
    def __init__(self, steps=1000):
        scale = 1000 / steps
        betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
        self.num_timesteps = steps
        self.betas = betas
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_ac = np.sqrt(ac)
        self.sqrt_1m_ac = np.sqrt(1.0 - ac)
        self.sqrt_recip_ac = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / ac - 1)
        pv = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.post_logvar_clipped = np.log(np.append(pv[1], pv[1:]))
        self.post_c1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.post_c2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)

    def q_sample(self, x0, t, noise):
        return _extract(self.sqrt_ac, t, x0.ndim) * x0 + _extract(self.sqrt_1m_ac, t, x0.ndim) * noise

    def q_posterior_mean(self, x0, xt, t):
        return _extract(self.post_c1, t, xt.ndim) * x0 + _extract(self.post_c2, t, xt.ndim) * xt

    def training_losses(self, model, x0, t, y, gen):
        noise = torch.randn(x0.shape, generator=gen)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, y, gen)
        c = x0.shape[1]
        eps, v = out[:, :c], out[:, c:]
        n = x0.ndim
        # variational bound term; the mean is detached so only the variance learns from it
        min_log = _extract(self.post_logvar_clipped, t, n)
        max_log = _extract(self.log_betas, t, n)
        frac = (v + 1) / 2
        model_logvar = frac * max_log + (1 - frac) * min_log
        pred_x0 = _extract(self.sqrt_recip_ac, t, n) * xt - _extract(self.sqrt_recipm1_ac, t, n) * eps.detach()
        model_mean = self.q_posterior_mean(pred_x0, xt, t)
        true_mean = self.q_posterior_mean(x0, xt, t)
        true_logvar = _extract(self.post_logvar_clipped, t, n)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = _mean_flat((noise - eps) ** 2)
        return mse, vb
