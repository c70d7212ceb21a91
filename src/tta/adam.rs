//! Adam (Kingma & Ba, <https://arxiv.org/abs/1412.6980>) exactly as `torch.optim.Adam` updates a
//! CPU parameter with its defaults (betas 0.9/0.999, eps 1e-8, no weight decay, no amsgrad; the
//! single-tensor path `_single_tensor_adam` of torch 2.11 `torch/optim/adam.py`, which CPU
//! tensors take): the same libtorch kernels in the same order, with the same float64 scalars, so
//! a step of ours is bit-identical to torch's on the same machine.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Adam's hyperparameters (torch's defaults but the learning rate).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
}

impl AdamConfig {
    /// torch's defaults with learning rate `lr`.
    pub fn with_lr(lr: f64) -> Self {
        Self { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// Adam's state for one parameter tensor: step count and both moments (float32, the
/// parameter's shape).
#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// [`Adam`]'s state as plain numbers, for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamState {
    /// Steps taken.
    pub step: u64,
    /// First moment, flattened.
    pub exp_avg: Vec<f32>,
    /// Second moment, flattened.
    pub exp_avg_sq: Vec<f32>,
}

impl Adam {
    /// Fresh state for a parameter of `shape` (moments zero, as torch's lazy init).
    pub fn new(config: AdamConfig, shape: &[i64]) -> Self {
        let z = || Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu));
        Self { config, step: 0, exp_avg: z(), exp_avg_sq: z() }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of `param` (float32, CPU, contiguous) by `grad`, in place.
    pub fn step(&mut self, param: &mut Tensor, grad: &Tensor) {
        let _guard = tch::no_grad_guard();
        let c = self.config;
        self.step += 1;
        // exp_avg.lerp_(grad, 1 - beta1)
        let _ = self.exp_avg.lerp_(grad, 1.0 - c.beta1);
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): tch's addcmul_ has no
        // `value`; the kernel computes self + (value·t1)·t2, so passing value·t1 (rounded as
        // the kernel rounds it) with value 1 gives the same bits.
        let _ = self.exp_avg_sq.g_mul_scalar_(c.beta2);
        let scaled = grad.g_mul_scalar(1.0 - c.beta2);
        let _ = self.exp_avg_sq.addcmul_(&scaled, grad);
        // Python floats: bias corrections in float64.
        let step = self.step as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(step);
        let bias_correction2 = 1.0 - c.beta2.powf(step);
        let step_size = c.lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        let mut denom = self.exp_avg_sq.sqrt().g_div_scalar(bias_correction2_sqrt);
        let _ = denom.g_add_scalar_(c.eps);
        // param.addcdiv_(exp_avg, denom, value=-step_size): self + (value·t1)/t2, as above.
        let scaled = self.exp_avg.g_mul_scalar(-step_size);
        let _ = param.addcdiv_(&scaled, &denom);
    }

    /// The state, for a checkpoint.
    pub fn state(&self) -> AdamState {
        let v = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap_or_default();
        AdamState { step: self.step, exp_avg: v(&self.exp_avg), exp_avg_sq: v(&self.exp_avg_sq) }
    }

    /// Adam resumed from a checkpoint's `state` for a parameter of `shape`; `None` if the
    /// state's sizes do not fit the shape.
    pub fn restore(config: AdamConfig, shape: &[i64], state: &AdamState) -> Option<Self> {
        let n: i64 = shape.iter().product();
        if state.exp_avg.len() as i64 != n || state.exp_avg_sq.len() as i64 != n {
            return None;
        }
        Some(Self {
            config,
            step: state.step,
            exp_avg: Tensor::from_slice(&state.exp_avg).view(shape),
            exp_avg_sq: Tensor::from_slice(&state.exp_avg_sq).view(shape),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grads(step: usize, n: usize) -> Vec<f32> {
        // Gradients of mixed signs and magnitudes (1e-9 .. 1e1), the same in Python below.
        (0..n)
            .map(|i| {
                let x = ((i * 7919 + step * 104729) % 1000) as f32 / 1000.0 - 0.5;
                x * 10f32.powi(((i + step) % 11) as i32 - 9)
            })
            .collect()
    }

    /// 25 steps of ours against `torch.optim.Adam` in Python (the torch wheel this crate links),
    /// bit for bit.
    #[test]
    fn steps_are_bit_identical_to_torch_optim_adam() {
        let (n, steps, lr) = (37usize, 25usize, 1e-3);
        let mut p = Tensor::full([n as i64], 0.3, (Kind::Float, tch::Device::Cpu));
        let mut adam = Adam::new(AdamConfig::with_lr(lr), &[n as i64]);
        for s in 0..steps {
            adam.step(&mut p, &Tensor::from_slice(&grads(s, n)));
        }
        let ours: Vec<u32> =
            Vec::<f32>::try_from(&p).unwrap().iter().map(|v| v.to_bits()).collect();
        // The gradients travel as bit patterns, so Python sees exactly ours.
        let bits: Vec<String> = (0..steps)
            .map(|s| {
                let g: Vec<String> =
                    grads(s, n).iter().map(|v| (v.to_bits() as i32).to_string()).collect();
                format!("[{}]", g.join(","))
            })
            .collect();
        let script = format!(
            r#"
import torch
grads = [{grads}]
p = torch.nn.Parameter(torch.full(({n},), 0.3))
opt = torch.optim.Adam([p], lr={lr})
for g in grads:
    p.grad = torch.tensor(g, dtype=torch.int32).view(torch.float32)
    opt.step()
print(" ".join(str(int(v)) for v in p.detach().view(torch.int32).tolist()))
"#,
            grads = bits.join(",")
        );
        let out = std::process::Command::new("python")
            .args(["-c", &script])
            .output()
            .expect("`python` with torch must be on PATH: `source scripts/env.sh` first");
        assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
        let theirs: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|v| v.parse::<i32>().unwrap() as u32)
            .collect();
        assert_eq!(theirs.len(), n);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn state_round_trips() {
        let mut p = Tensor::full([3], 0.3, (Kind::Float, tch::Device::Cpu));
        let mut a = Adam::new(AdamConfig::with_lr(1e-2), &[3]);
        a.step(&mut p, &Tensor::from_slice(&[1f32, -2.0, 0.5]));
        let s = a.state();
        let mut b = Adam::restore(AdamConfig::with_lr(1e-2), &[3], &s).unwrap();
        let mut q = p.copy();
        let g = Tensor::from_slice(&[0.1f32, 0.2, -0.3]);
        a.step(&mut p, &g);
        b.step(&mut q, &g);
        assert!(p.equal(&q));
        assert!(Adam::restore(AdamConfig::with_lr(1e-2), &[4], &s).is_none());
    }
}
