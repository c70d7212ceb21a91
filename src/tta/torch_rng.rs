//! libtorch's CPU random generator, replayed: the 32-bit Mersenne Twister of
//! `ATen/core/MT19937RNGEngine.h` as `CPUGeneratorImpl` drives it, and the two draws FusionBench's
//! shuffled loaders make from it (`torch.empty((), dtype=torch.int64).random_()` and
//! `torch.randperm(n, generator=...)`, `ATen/native/TensorFactories.cpp`).
//!
//! FusionBench seeds torch with `seed` and draws its test-time batches from torch's default CPU
//! generator; this module lets a run of ours draw the same permutations without touching
//! libtorch's global generator, and lets any worker compute any task's batches on its own. The
//! tests check every draw against libtorch itself.

use serde::{Deserialize, Serialize};

/// Held by whatever draws from libtorch's global default generator (seeding it, then drawing in
/// an order that must not interleave with another user's): WE-MoE's router initialisation, and
/// the tests that check this module against libtorch.
pub static GLOBAL_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

const N: usize = 624;
const M: usize = 397;

/// The generator's whole state: the twister's 624 words and its position.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TorchGenerator {
    state: Vec<u32>,
    index: usize,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TorchGenerator(index {}, word0 {:#x})", self.index, self.state[0])
    }
}

impl TorchGenerator {
    /// A generator as `torch.manual_seed(seed)` or `torch.Generator().manual_seed(seed)` leaves
    /// it: the twister seeded with the seed's low 32 bits (`mt19937::init_with_uint32`).
    pub fn seeded(seed: u64) -> Self {
        let mut state = vec![0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Self { state, index: N }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// `CPUGeneratorImpl::random()`: the next 32-bit output.
    pub fn random(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// Skips `n` 32-bit outputs.
    pub fn advance(&mut self, n: u64) {
        for _ in 0..n {
            self.random();
        }
    }

    /// How many 32-bit outputs `torch.randn(n)` takes on the CPU (its vectorised path for
    /// `n ≥ 16`: 16 at a time, the last block recomputed when `n` is not a multiple of 16);
    /// `None` for `n < 16`, whose serial path this module does not model.
    pub fn randn_draws(n: u64) -> Option<u64> {
        (n >= 16).then_some(if n.is_multiple_of(16) { n } else { n + 16 })
    }

    /// `CPUGeneratorImpl::random64()`: two outputs, the first in the high half.
    pub fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// `torch.empty((), dtype=torch.int64).random_().item()`: `random64() mod 2^63`.
    pub fn random_int64(&mut self) -> i64 {
        (self.random64() % (1u64 << 63)) as i64
    }

    /// `torch.randperm(n, generator=self)` on the CPU: a Fisher-Yates shuffle of `0..n` drawing
    /// `random() % (n - i)` for each position `i` (below `u32::MAX / 20` elements, the only sizes a
    /// test split has).
    pub fn randperm(&mut self, n: usize) -> Vec<usize> {
        let mut r: Vec<usize> = (0..n).collect();
        if n >= (u32::MAX / 20) as usize {
            // libtorch switches to 64-bit draws there; no dataset here comes close.
            for i in 0..n.saturating_sub(1) {
                let z = (self.random64() % (n - i) as u64) as usize;
                r.swap(i, z + i);
            }
            return r;
        }
        for i in 0..n.saturating_sub(1) {
            let z = (self.random() as u64 % (n - i) as u64) as usize;
            r.swap(i, z + i);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// libtorch's default generator is global: the tests that reseed it take turns.
    static GLOBAL: &std::sync::Mutex<()> = &GLOBAL_GENERATOR;

    #[test]
    fn int64_draws_match_libtorch() {
        let _g = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
        for seed in [0u64, 42, 1234, (1 << 40) + 7] {
            tch::manual_seed(seed as i64);
            let mut ours = TorchGenerator::seeded(seed);
            for k in 0..700 {
                let mut t = Tensor::empty([], (Kind::Int64, Device::Cpu));
                let theirs = t.random_().int64_value(&[]);
                assert_eq!(ours.random_int64(), theirs, "seed {seed}, draw {k}");
            }
        }
    }

    #[test]
    fn randperm_matches_libtorch() {
        let _g = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
        for (seed, n) in [(42u64, 1usize), (42, 2), (7, 17), (3_000_000_123, 100), (1, 1300)] {
            tch::manual_seed(seed as i64);
            let theirs =
                Vec::<i64>::try_from(Tensor::randperm(n as i64, (Kind::Int64, Device::Cpu)))
                    .expect("randperm values");
            let ours: Vec<i64> =
                TorchGenerator::seeded(seed).randperm(n).into_iter().map(|v| v as i64).collect();
            assert_eq!(ours, theirs, "seed {seed}, n {n}");
        }
    }

    #[test]
    fn randn_draw_counts_match_libtorch() {
        let _g = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
        for n in [16u64, 48, 40, 768, 1024, 1000] {
            tch::manual_seed(42);
            let _ = Tensor::randn([n as i64], (Kind::Float, Device::Cpu));
            let mut t = Tensor::empty([], (Kind::Int64, Device::Cpu));
            let theirs = t.random_().int64_value(&[]);
            let mut ours = TorchGenerator::seeded(42);
            ours.advance(TorchGenerator::randn_draws(n).unwrap());
            assert_eq!(ours.random_int64(), theirs, "randn({n})");
        }
        assert_eq!(TorchGenerator::randn_draws(8), None);
    }

    #[test]
    fn a_seed_keeps_only_its_low_32_bits() {
        let mut a = TorchGenerator::seeded(5);
        let mut b = TorchGenerator::seeded(5 + (1u64 << 32));
        assert_eq!(a.random64(), b.random64());
        let mut c = TorchGenerator::seeded(6);
        assert_ne!(TorchGenerator::seeded(5).random(), c.random());
    }
}
