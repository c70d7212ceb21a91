//! libtorch's CPU `x.sum(dim=0)` of a contiguous float32 `[T, D]` matrix, float operation by
//! float operation: FusionBench's TIES sums its trimmed task vectors this way, so a merge that
//! is to be bit-identical must add the same numbers in the same order.
//!
//! ATen 2.11 (`aten/src/ATen/native/cpu/SumKernel.cpp`: `cascade_sum`, `vectorized_outer_sum`,
//! `multi_row_sum`, `row_sum`):
//! - the output is filled with +0 and each column's sum is added to it (so no sum is −0);
//! - columns go in blocks of `4 × Vectorized<float>::size()` ([`CpuCapability::outer_sum_block`]).
//!   A column of a full block is [`cascade`] over its T rows; the last `D mod block` columns
//!   (the *reduction tail*) are [`row_sum`] instead;
//! - with several threads (`parallel_dim_reduction`) the columns are split at multiples of 32
//!   floats (128 bytes), which every block size below divides, so the split never moves the
//!   tail: it is the last `D mod block` columns of the whole matrix, whatever the thread count.
//!
//! Which kernel runs is ATen's run-time dispatch on its CPU capability ([`CpuCapability`]):
//! `ATEN_CPU_CAPABILITY` when set, else the CPU's best. `sum_stub` is registered with
//! `REGISTER_DISPATCH`, which leaves its AVX-512 slot empty, and the dispatcher then falls back
//! to the AVX2 kernel: on x86-64 the block is 32 columns under every capability.
//! Checked bit for bit against torch 2.11 under `default`, `avx2` and a forced `avx512`
//! (`scripts/fixtures/aten_sum_order.py`), and against the linked libtorch by the tests below.

use std::sync::OnceLock;

/// The instruction set ATen's CPU kernels are dispatched for (`at::native::CPUCapability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuCapability {
    /// The baseline build (`ATEN_CPU_CAPABILITY=default`).
    Default,
    /// x86-64 AVX2 + FMA.
    Avx2,
    /// x86-64 AVX-512 (F, VL, BW, DQ) + FMA.
    Avx512,
    /// aarch64 SVE with 256-bit vectors and BF16.
    Sve256,
}

impl CpuCapability {
    /// The capability ATen uses in this process (and in FusionBench's, run on this machine with
    /// this environment), computed once.
    pub(crate) fn current() -> Self {
        static CURRENT: OnceLock<CpuCapability> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            let var = std::env::var("ATEN_CPU_CAPABILITY").ok();
            Self::from_env(var.as_deref(), Self::detect)
        })
    }

    /// ATen's `compute_cpu_capability`: a value of `ATEN_CPU_CAPABILITY` naming a capability of
    /// this architecture is taken as is (`avx512` even on a CPU without it; `sve256` only where
    /// the CPU has it); anything else is ignored (ATen warns) and the CPU decides.
    pub(crate) fn from_env(var: Option<&str>, detect: impl Fn() -> Self) -> Self {
        let named = match var {
            None => return detect(),
            Some("default") => Some(Self::Default),
            Some("avx2") if cfg!(target_arch = "x86_64") => Some(Self::Avx2),
            Some("avx512") if cfg!(target_arch = "x86_64") => Some(Self::Avx512),
            Some("sve256") if cfg!(target_arch = "aarch64") => Some(match detect() {
                Self::Sve256 => Self::Sve256,
                _ => Self::Default,
            }),
            Some(_) => None,
        };
        named.unwrap_or_else(|| {
            tracing::warn!(
                value = var.unwrap_or_default(),
                "ignoring invalid value for ATEN_CPU_CAPABILITY (as libtorch does)"
            );
            detect()
        })
    }

    /// The CPU's best, as ATen's `cpuinfo` checks decide it.
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512vl") && has!("avx512bw") && has!("avx512dq") && has!("fma") {
                return Self::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Self::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            use std::arch::is_aarch64_feature_detected as has;
            // cpuinfo asks the kernel for the SVE vector length; new processes get the default.
            let vl = std::fs::read_to_string("/proc/sys/abi/sve_default_vector_length")
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if has!("sve") && has!("bf16") && vl == Some(32) {
                return Self::Sve256;
            }
        }
        Self::Default
    }

    /// Columns per step of `vectorized_outer_sum` for float32: `4 × Vectorized<float>::size()`
    /// of the kernel that `sum_stub` dispatches to under this capability.
    pub(crate) fn outer_sum_block(self) -> usize {
        match self {
            // The generic Vectorized<float> is 32 bytes on x86-64; aarch64's is NEON's 4 lanes.
            Self::Default if cfg!(target_arch = "aarch64") => 16,
            Self::Default => 32,
            Self::Avx2 => 32,
            // No AVX-512 sum kernel: ATen runs the AVX2 one.
            Self::Avx512 => 32,
            Self::Sve256 => 32,
        }
    }
}

/// `utils::CeilLog2` (1 for n ≤ 2).
fn ceil_log2(n: usize) -> u32 {
    if n <= 2 {
        1
    } else {
        usize::BITS - (n - 1).leading_zeros()
    }
}

/// `multi_row_sum`'s level width for `n` rows: groups of `2^power` rows.
fn level_power(n: usize) -> u32 {
    (ceil_log2(n) / 4).max(4)
}

/// One lane of `multi_row_sum` over `n` values: four accumulators from +0; the values are added
/// to the first in order, and after each full group of `2^p` values (p = max(4, ⌈log₂ n⌉/4),
/// so 16 below 2^20 values) each level is added into the next and cleared, climbing while the
/// count is a multiple of the next level's group; at the end levels 1, 2, 3 are added to the
/// first. Fewer than 16 values: `((0 + x₀) + x₁) + …`.
pub(crate) fn cascade(values: impl ExactSizeIterator<Item = f32>) -> f32 {
    let power = level_power(values.len());
    let mask = (1usize << power) - 1;
    let mut acc = [0f32; 4];
    for (i, x) in values.enumerate() {
        acc[0] += x;
        let done = i + 1;
        if done & mask == 0 {
            for j in 1..4 {
                acc[j] += acc[j - 1];
                acc[j - 1] = 0.0;
                if done & (mask << (j as u32 * power)) != 0 {
                    break;
                }
            }
        }
    }
    ((acc[0] + acc[1]) + acc[2]) + acc[3]
}

/// `row_sum` over one column `v` of T values (the reduction tail): four lanes, lane k being
/// [`cascade`] over rows `k, k + 4, …` of the first `4·⌊T/4⌋` rows; the remaining rows are added
/// to lane 0 in order, then lanes 1, 2 and 3.
pub(crate) fn row_sum(v: &[f32]) -> f32 {
    let groups = v.len() / 4;
    let mut lanes = [0f32; 4];
    for (k, lane) in lanes.iter_mut().enumerate() {
        *lane = cascade((0..groups).map(|i| v[4 * i + k]));
    }
    for &x in &v[4 * groups..] {
        lanes[0] += x;
    }
    ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3]
}

/// libtorch's sum of one column `v` of the `[T, D]` matrix, inside or outside the tail.
pub(crate) fn column_sum(v: &[f32], in_tail: bool) -> f32 {
    if in_tail {
        row_sum(v)
    } else {
        cascade(v.iter().copied())
    }
}

/// [`cascade`] on `n` lanes at once (the columns of a chunk outside the tail), fed one row at a
/// time: add row i into [`LaneCascade::acc`], then call [`LaneCascade::row_done`]. The adds
/// are the caller's loops, so they vectorise.
pub(crate) struct LaneCascade {
    /// Level 0, then levels 1 to 3 (allocated only when a row count reaches a full group).
    levels: Vec<Vec<f32>>,
    power: u32,
    done: usize,
}

impl LaneCascade {
    /// For `rows` rows of `n` lanes.
    pub(crate) fn new(rows: usize, n: usize) -> Self {
        let power = level_power(rows);
        let mut levels = vec![vec![0f32; n]];
        if rows >= 1 << power {
            levels.extend((1..4).map(|_| vec![0f32; n]));
        }
        Self { levels, power, done: 0 }
    }

    /// The accumulator the next row is added into.
    #[inline(always)]
    pub(crate) fn acc(&mut self) -> &mut [f32] {
        &mut self.levels[0]
    }

    /// Marks one row added.
    #[inline(always)]
    pub(crate) fn row_done(&mut self) {
        self.done += 1;
        let mask = (1usize << self.power) - 1;
        if self.done & mask == 0 {
            for j in 1..4 {
                let (lower, upper) = self.levels.split_at_mut(j);
                for (hi, lo) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                    *hi += *lo;
                    *lo = 0.0;
                }
                if self.done & (mask << (j as u32 * self.power)) != 0 {
                    break;
                }
            }
        }
    }

    /// The lanes' sums. Without the upper levels nothing is added: they are +0, and level 0
    /// (from +0) is never −0, so adding them would change nothing.
    pub(crate) fn finish(mut self) -> Vec<f32> {
        let upper = self.levels.split_off(1);
        let mut acc = self.levels.pop().expect("level 0");
        for level in upper {
            for (a, x) in acc.iter_mut().zip(level) {
                *a += x;
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// Random float32 of magnitudes 1e-4 .. 1e4 (so the order of the adds shows), some zeros.
    fn data(t: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        (0..t * d)
            .map(|_| {
                let r = next();
                let mant = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let exp = ((r >> 8) % 9) as i32 - 4;
                let x = mant * 10f32.powi(exp);
                match r % 16 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => x,
                }
            })
            .collect()
    }

    /// Our emulation of `x.sum(dim=0)` for a `[t, d]` row-major `x`, with tail block `block`:
    /// the lanes outside the tail through [`LaneCascade`], the tail through [`column_sum`].
    fn emulate(x: &[f32], t: usize, d: usize, block: usize) -> Vec<f32> {
        let tail = d - d % block;
        let mut lanes = LaneCascade::new(t, tail);
        for i in 0..t {
            for (a, &v) in lanes.acc().iter_mut().zip(&x[i * d..i * d + tail]) {
                *a += v;
            }
            lanes.row_done();
        }
        let mut out = lanes.finish();
        for c in tail..d {
            let col: Vec<f32> = (0..t).map(|i| x[i * d + c]).collect();
            out.push(column_sum(&col, true));
            // The scalar cascade agrees with the lanes' on the same column.
            if c == tail && tail > 0 {
                let first: Vec<f32> = (0..t).map(|i| x[i * d]).collect();
                assert_eq!(column_sum(&first, false).to_bits(), out[0].to_bits());
            }
        }
        out
    }

    fn torch_sum(x: &[f32], t: usize, d: usize) -> Vec<f32> {
        let m = Tensor::from_slice(x).view([t as i64, d as i64]);
        let s = m.sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
        Vec::<f32>::try_from(s).unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn the_block_per_capability() {
        let x86 = cfg!(target_arch = "x86_64");
        assert_eq!(CpuCapability::Avx2.outer_sum_block(), 32);
        assert_eq!(CpuCapability::Avx512.outer_sum_block(), 32);
        assert_eq!(CpuCapability::Sve256.outer_sum_block(), 32);
        assert_eq!(CpuCapability::Default.outer_sum_block(), if x86 { 32 } else { 16 });
    }

    #[test]
    fn the_environment_decides_as_aten_does() {
        let cpu = || CpuCapability::Avx2;
        assert_eq!(CpuCapability::from_env(None, cpu), CpuCapability::Avx2);
        assert_eq!(CpuCapability::from_env(Some("default"), cpu), CpuCapability::Default);
        for invalid in ["", "AVX2", "avx", "sse4", "zvector"] {
            assert_eq!(CpuCapability::from_env(Some(invalid), cpu), CpuCapability::Avx2);
        }
        if cfg!(target_arch = "x86_64") {
            assert_eq!(CpuCapability::from_env(Some("avx2"), cpu), CpuCapability::Avx2);
            // Taken as is, as ATen does, even when the CPU lacks it.
            assert_eq!(CpuCapability::from_env(Some("avx512"), cpu), CpuCapability::Avx512);
            assert_eq!(CpuCapability::from_env(Some("sve256"), cpu), CpuCapability::Avx2);
        }
        let neon = || CpuCapability::Default;
        if cfg!(target_arch = "aarch64") {
            let sve = || CpuCapability::Sve256;
            assert_eq!(CpuCapability::from_env(Some("sve256"), sve), CpuCapability::Sve256);
            assert_eq!(CpuCapability::from_env(Some("sve256"), neon), CpuCapability::Default);
            assert_eq!(CpuCapability::from_env(Some("avx2"), neon), CpuCapability::Default);
        }
    }

    #[test]
    fn the_cascade_in_groups_of_16_and_the_tail_lanes() {
        // 18 rows: the first 16 make a group; the last two are added (from +0) before it.
        let mut v = vec![0.1f32; 16];
        v.extend([1.0, 0.3]);
        let group = v[..16].iter().fold(0f32, |s, x| s + x);
        assert_eq!(cascade(v.iter().copied()), ((0.0 + 1.0) + 0.3) + group);
        assert_ne!(cascade(v.iter().copied()), v.iter().fold(0f32, |s, x| s + x));
        // The tail with 6 rows: lanes from rows 0..4, rows 4 and 5 both into lane 0.
        let w = [1e8f32, 3.0, 0.0, 0.0, 1.0, 3.0];
        assert_eq!(row_sum(&w), ((((0.0 + 1e8) + 1.0) + 3.0) + 3.0) + 0.0 + 0.0);
        // … not rows i % 4 (the rule this file replaced).
        assert_ne!(row_sum(&w), ((1e8f32 + 1.0) + (3.0 + 3.0)) + 0.0 + 0.0);
        // No sum is −0.
        assert_eq!(column_sum(&[-0.0, -0.0], false).to_bits(), 0);
        assert_eq!(column_sum(&[-0.0, -0.0], true).to_bits(), 0);
    }

    /// Our emulation equals the linked libtorch's `sum(dim=0)` bit for bit, under this process's
    /// capability, for T around the multiples of 4 and 16 and D on both sides of 32 and 64; and
    /// another block size (or the rule of adding rows `i % 4` in the tail, or left to right
    /// outside it) would not.
    #[test]
    fn matches_libtorch_and_tells_the_block_apart() {
        let block = CpuCapability::current().outer_sum_block();
        let mut told_apart = [false; 3];
        for t in [1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 16, 17, 18, 20, 33, 70] {
            for d in [8, 31, 40, 63, 95, 100, 130] {
                let x = data(t, d, (t * 1000 + d) as u64);
                let want = bits(&torch_sum(&x, t, d));
                assert_eq!(bits(&emulate(&x, t, d, block)), want, "T={t} D={d} block={block}");
                for (k, other) in [16, 32, 64].into_iter().enumerate() {
                    if other != block && bits(&emulate(&x, t, d, other)) != want {
                        told_apart[k] = true;
                    }
                }
            }
        }
        for (k, other) in [16, 32, 64].into_iter().enumerate() {
            assert!(other == block || told_apart[k], "no case tells block {other} apart");
        }
        // Libtorch's own columns split between threads: large enough for parallel_reduce.
        let (t, d) = (14, 8192 + 57);
        let x = data(t, d, 7);
        assert_eq!(bits(&emulate(&x, t, d, block)), bits(&torch_sum(&x, t, d)));
    }

    /// The same check under ATEN_CPU_CAPABILITY=default: libtorch reads the variable once, so
    /// this test runs the one above in a child process of this test binary.
    #[test]
    fn matches_libtorch_under_the_default_capability() {
        if std::env::var_os("ATEN_CPU_CAPABILITY").is_some() {
            return; // the child itself, or a run that chose its capability
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "methods::aten_sum::tests::matches_libtorch_and_tells_the_block_apart",
            ])
            .env("ATEN_CPU_CAPABILITY", "default")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("1 passed"), "{stdout}");
    }
}
