//! SplitMix64: a small seeded PRNG for the crate's randomized tests, so failures replay exactly.

pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Values over many magnitudes, so a different summation order gives different bits.
    pub(crate) fn float(&mut self) -> f32 {
        let m = (self.next() % 2001) as f32 - 1000.0;
        m * 10f32.powi((self.next() % 10) as i32 - 3)
    }
}
