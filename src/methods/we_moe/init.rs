//! FusionBench's router initialisation, replayed on libtorch's own default CPU generator (the
//! library both link), so a seeded run starts from FusionBench's routers bit for bit.
//!
//! With `seed`, FusionBench draws, in this order (torch 2.11, transformers 4.57.6): one
//! `torch.randn(hidden)` per `from_pretrained` vision tower (the pretrained model, then each
//! fine-tuned one: `CLIPVisionEmbeddings.__init__`'s class embedding, which `no_init_weights`
//! does not skip); then, per layer, the router's `nn.Linear`s with their default init
//! (`kaiming_uniform_(a=√5)` on the weight, `uniform_` on the bias, each layer in turn) and at once
//! its re-init (`normal_(std=0.01)` on the weights, zeros and `init_lambda` on the biases); then
//! the zero-shot heads' `CLIPModel` (one more `randn(hidden)`), then the test-time loaders.
//! [`RouterInit::draws`] counts the 32-bit draws taken, for the loaders' generator
//! ([`crate::tta::loaders::Loaders`]).

use super::construct::Layout;
use crate::tta::torch_rng::{TorchGenerator, GLOBAL_GENERATOR};
use anyhow::{bail, Result};
use std::sync::MutexGuard;
use tch::{Device, Kind, Tensor};

/// Draws routers from the default generator, layer after layer, holding it meanwhile.
pub struct RouterInit {
    _held: MutexGuard<'static, ()>,
    draws: u64,
    init_lambda: f64,
    /// The sparse variant's one router, made on first use and given to every layer.
    shared: Option<Option<Vec<(&'static str, Tensor)>>>,
}

/// 32-bit draws of `uniform_` on `n` float32 elements (one each).
pub fn uniform_draws(n: u64) -> u64 {
    n
}

/// 32-bit draws of `normal_` on `n` contiguous float32 elements (`n ≥ 16`; see
/// [`TorchGenerator::randn_draws`]).
pub fn normal_draws(n: u64) -> Result<u64> {
    match TorchGenerator::randn_draws(n) {
        Some(d) => Ok(d),
        None => bail!(
            "a router tensor of {n} elements: libtorch's serial normal_ path (under 16) is not replayed"
        ),
    }
}

impl RouterInit {
    /// Seeds the default generator with `seed` and takes the draws of the `towers` vision
    /// towers FusionBench loads first (of width `hidden`).
    pub fn new(
        seed: u64,
        towers: usize,
        hidden: i64,
        init_lambda: f64,
        shared: bool,
    ) -> Result<Self> {
        let held = GLOBAL_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed as i64);
        for _ in 0..towers {
            let _ = Tensor::randn([hidden], (Kind::Float, Device::Cpu));
        }
        let per_tower = normal_draws(hidden as u64)?;
        Ok(Self {
            _held: held,
            draws: towers as u64 * per_tower,
            init_lambda,
            shared: shared.then_some(None),
        })
    }

    /// 32-bit draws taken since seeding.
    pub fn draws(&self) -> u64 {
        self.draws
    }

    /// Layer `layer`'s router tensors under `gate.`, in `named_parameters()` order.
    pub fn layer(&mut self, _layer: usize, layout: &Layout) -> Result<Vec<(&'static str, Tensor)>> {
        if let Some(Some(made)) = &self.shared {
            return Ok(made.iter().map(|(n, t)| (*n, t.shallow_clone())).collect());
        }
        let made = self.draw(layout)?;
        if let Some(shared) = &mut self.shared {
            *shared = Some(made.iter().map(|(n, t)| (*n, t.shallow_clone())).collect());
        }
        Ok(made)
    }

    fn draw(&mut self, layout: &Layout) -> Result<Vec<(&'static str, Tensor)>> {
        let _guard = tch::no_grad_guard();
        let shapes = layout.router_shapes();
        let mut tensors: Vec<(&'static str, Tensor)> = shapes
            .iter()
            .map(|(n, s)| (*n, Tensor::empty(s.as_slice(), (Kind::Float, Device::Cpu))))
            .collect();
        if layout.depth == 0 {
            // `nn.Parameter(torch.empty(T))`, then `constant_(init_lambda)`: no draws.
            let _ = tensors[0].1.fill_(self.init_lambda);
            return Ok(tensors);
        }
        // Each nn.Linear's reset_parameters as it is constructed: weight, then bias.
        for pair in tensors.chunks_mut(2) {
            let fan_in = pair[0].1.size()[1] as f64;
            let a = 5f64.sqrt();
            let gain = (2.0 / (1.0 + a.powi(2))).sqrt();
            let bound = 3f64.sqrt() * (gain / fan_in.sqrt());
            let _ = pair[0].1.uniform_(-bound, bound);
            let b = 1.0 / fan_in.sqrt();
            let _ = pair[1].1.uniform_(-b, b);
            self.draws +=
                uniform_draws(pair[0].1.numel() as u64) + uniform_draws(pair[1].1.numel() as u64);
        }
        // init_weight: normal_(std=0.01) on each weight; biases zero but the last, init_lambda.
        let last = tensors.len() - 1;
        for (i, (name, t)) in tensors.iter_mut().enumerate() {
            if name.ends_with("weight") {
                let _ = t.normal_(0.0, 0.01);
                self.draws += normal_draws(t.numel() as u64)?;
            } else if i == last {
                let _ = t.fill_(self.init_lambda);
            } else {
                let _ = t.zero_();
            }
        }
        Ok(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The draw counts the loaders' generator is advanced by, checked against libtorch itself:
    /// after the routers, the next int64 draw of the default generator is the replica's.
    #[test]
    fn router_draws_are_counted_as_libtorch_takes_them() {
        for depth in [0usize, 1, 2] {
            let layout = Layout {
                layers: 2,
                hidden: 20,
                intermediate: 40,
                experts: 3,
                depth,
                position_dim: 0,
            };
            let mut init = RouterInit::new(42, 4, 20, 0.3, false).unwrap();
            let a = init.layer(0, &layout).unwrap();
            let b = init.layer(1, &layout).unwrap();
            let draws = init.draws();
            let theirs = Tensor::empty([], (Kind::Int64, Device::Cpu)).random_().int64_value(&[]);
            let mut ours = TorchGenerator::seeded(42);
            ours.advance(draws);
            assert_eq!(ours.random_int64(), theirs, "depth {depth}: {draws} draws");
            drop(init);
            assert_eq!(a.len(), layout.router_shapes().len());
            if depth > 0 {
                // Two layers' routers differ; biases are FusionBench's constants.
                assert_ne!(a[0].1, b[0].1);
                let last = &a[a.len() - 1].1;
                assert_eq!(Vec::<f32>::try_from(last).unwrap(), vec![0.3f32; 3]);
                let w = &a[0].1;
                let std = w.std(true).double_value(&[]);
                assert!((0.005..0.02).contains(&std), "std {std}");
            } else {
                assert_eq!(Vec::<f32>::try_from(&a[0].1).unwrap(), vec![0.3f32; 3]);
            }
        }
    }

    #[test]
    fn a_shared_router_is_drawn_once() {
        let layout = Layout {
            layers: 2,
            hidden: 20,
            intermediate: 40,
            experts: 3,
            depth: 2,
            position_dim: 8,
        };
        let mut init = RouterInit::new(7, 1, 20, 0.3, true).unwrap();
        let a = init.layer(0, &layout).unwrap();
        let before = init.draws();
        let b = init.layer(1, &layout).unwrap();
        assert_eq!(init.draws(), before);
        assert_eq!(a[0].1, b[0].1);
        assert_eq!(a[0].1.size(), vec![28, 28]);
    }
}
