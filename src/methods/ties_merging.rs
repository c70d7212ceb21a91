//! `method=ties_merging` (FusionBench's `TiesMergingAlgorithm`; Yadav et al. 2023, TIES-Merging,
//! <https://arxiv.org/abs/2306.01708>), streamed: the models × parameters matrix is never built.
//!
//! FusionBench's algorithm, on the flattened (sorted-key) task vectors τᵢ = θᵢ − θ₀:
//! 1. Trim: keep entries with |τᵢ| ≥ the k-th smallest |τᵢ| over the *whole* model
//!    (k = D − ⌊D·K⌋, K = threshold/100 when threshold > 1), giving τ̂ᵢ.
//! 2. Elect: γ = sign(Σᵢ τ̂ᵢ) per coordinate; zeros take the sign of Σ γ over all coordinates.
//! 3. Disjoint merge (FusionBench's default `merge_func: sum`, or `mean`/`max`) of the entries
//!    agreeing with γ, then θ = θ₀ + λ·τₘ.
//!
//! Here it takes two passes over the mapped checkpoints, each tensor read in place:
//! - Pass A: a histogram per task of |τᵢ|'s float32 bit patterns (which order like the values),
//!   keyed by their top bits. It tells which bin holds each task's k-th value and its rank there.
//! - Pass B: the merge itself. An entry outside its task's threshold bin is decided (kept above,
//!   trimmed below); entries inside it are collected, and their coordinates, with those whose
//!   elected sign is 0 (they depend on the global majority sign) and the few in libtorch's
//!   reduction tail (the last `D mod 32` coordinates on x86-64, summed another way), are set
//!   aside as exceptions. All other coordinates are final.
//!
//! Then each task's exact k-th value is selected among its bin's entries, the exceptions are
//! computed exactly (adding their signs to the global total first) and patched into the output.
//!
//! Memory: one histogram per task, the bin entries, the exceptions, and one tensor of output at a
//! time when it streams to disk.
//!
//! Every float32 operation is FusionBench's, on the same values and in libtorch's order (its
//! `sum(dim=0)`'s, under the CPU capability it dispatches to: [`super::aten_sum`]), so the result
//! is bit-identical.

use super::aten_sum::{column_sum, CpuCapability, LaneCascade};
use super::pool::{non_finite_error, output_tensor, output_values};
use super::simd::{prefetch, widest_simd, PREFETCH_AHEAD};
use super::{Merged, Method, ModelPool, RunContext};
use crate::config::MethodConfig;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::borrow::Cow;

/// How the elected entries are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MergeFunc {
    Sum,
    Mean,
    Max,
}

/// TIES-merging with FusionBench's hyperparameters.
pub struct TiesMerging {
    scaling_factor: f64,
    threshold: f64,
    merge_func: MergeFunc,
}

impl TiesMerging {
    /// Reads `scaling_factor` (0.3), `threshold` (20: a percentage when > 1, else a fraction),
    /// `remove_keys` (must stay empty for CLIP) and `merge_func` (`sum`).
    pub fn from_config(cfg: &MethodConfig) -> Result<Self> {
        let s = &cfg.section;
        crate::config::warn_unknown_keys(
            s,
            &["_target_", "scaling_factor", "threshold", "remove_keys", "merge_func"],
        );
        let scaling_factor =
            s.get::<f64>("scaling_factor").context("method.scaling_factor")?.unwrap_or(0.3);
        let threshold = s.get::<f64>("threshold").context("method.threshold")?.unwrap_or(20.0);
        if !(threshold > 0.0 && threshold <= 100.0) {
            bail!("method.threshold must be in (0, 1] (a fraction) or (1, 100] (a percentage), got {threshold}");
        }
        let remove: Vec<String> =
            s.get("remove_keys").context("method.remove_keys")?.unwrap_or_default();
        if !remove.is_empty() {
            bail!("method.remove_keys must be empty for CLIP models (FusionBench would fail to load the merged state dict), got {remove:?}");
        }
        let func: String =
            s.get("merge_func").context("method.merge_func")?.unwrap_or("sum".into());
        let merge_func = match func.rsplit('-').next().unwrap_or("") {
            "sum" => MergeFunc::Sum,
            "mean" => MergeFunc::Mean,
            "max" => MergeFunc::Max,
            other => bail!("method.merge_func: unknown `{other}` (expected sum, mean or max)"),
        };
        Ok(Self { scaling_factor, threshold, merge_func })
    }
}

impl Method for TiesMerging {
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged> {
        let pool = ctx.pool;
        let base = pool.pretrained()?;
        let models = pool.task_models()?;
        if models.is_empty() {
            bail!("ties_merging: the model pool has no fine-tuned models");
        }
        let names = pool.parameter_names();
        let d: i64 = names.iter().map(|n| pool.shape(n).iter().product::<i64>()).sum();
        let k_frac = if self.threshold > 1.0 { self.threshold / 100.0 } else { self.threshold };
        // FusionBench: k = d - int(d * K), the k-th smallest |τ| (1-based) is the threshold.
        let k = (d - (d as f64 * k_frac) as i64).max(1) as u64;

        let t0 = std::time::Instant::now();
        // Pass A: per-task histograms of |τ| bit patterns.
        let mut hist = vec![vec![0u32; BINS]; models.len()];
        let bar = crate::progress::bar("ties: thresholds", names.len(), "tensors");
        // Tasks are split between the threads; each walks the tensor in chunks, so a chunk of
        // θ₀ is read from memory once per thread, not once per task.
        let threads = rayon::current_num_threads().clamp(1, models.len());
        for name in names {
            let theta0 = base.values(name)?;
            let thetas = models.iter().map(|m| m.values(name)).collect::<Result<Vec<_>>>()?;
            let mut groups: Vec<Vec<(usize, &mut Vec<u32>)>> =
                (0..threads).map(|_| Vec::new()).collect();
            for (ti, h) in hist.iter_mut().enumerate() {
                groups[ti % threads].push((ti, h));
            }
            let finite = groups
                .into_par_iter()
                .map(|mut group| {
                    let mut ok = true;
                    for start in (0..theta0.len()).step_by(PASS_A_CHUNK) {
                        let end = (start + PASS_A_CHUNK).min(theta0.len());
                        for (ti, h) in group.iter_mut() {
                            ok &= histogram(h, &thetas[*ti][start..end], &theta0[start..end]);
                        }
                    }
                    ok
                })
                .collect::<Vec<bool>>();
            if finite.iter().any(|ok| !ok) {
                let mut inputs = vec![&base];
                inputs.extend(models.iter());
                return Err(non_finite_error(name, &inputs));
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        // The bin holding the k-th value, and the value's rank (1-based) inside it.
        let bins: Vec<(u32, u64)> = hist
            .iter()
            .map(|h| {
                let mut below = 0u64;
                for (bin, &c) in h.iter().enumerate() {
                    if below + c as u64 >= k {
                        return (bin as u32, k - below);
                    }
                    below += c as u64;
                }
                unreachable!("the histograms count all d >= k entries")
            })
            .collect();
        drop(hist);
        tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "ties: pass A (thresholds' bins)");

        // Pass B: the merge of every decided coordinate.
        let lambda = self.scaling_factor as f32;
        let capability = CpuCapability::current();
        let block = capability.outer_sum_block();
        tracing::debug!(
            ?capability,
            block,
            "ties: libtorch's sum(dim=0) tail: the last D mod block columns"
        );
        let tails = tail_starts(pool, block);
        let merge_func = self.merge_func;
        let state = std::cell::RefCell::new(PassB {
            candidates: vec![Vec::new(); models.len()],
            exceptions: Vec::new(),
            sign_total: 0,
            index: 0,
        });
        let weights = pool.merge_per_tensor_then_patch(
            |name, shape| {
                let theta0 = base.values(name)?;
                let thetas = models.iter().map(|m| m.values(name)).collect::<Result<Vec<_>>>()?;
                let tail = tails[name] as usize;
                let mut out = output_tensor(shape);
                let values = output_values(&mut out);
                let parts: Vec<ChunkResult> = values
                    .par_chunks_mut(CHUNK)
                    .enumerate()
                    .map(|(c, out)| {
                        let at = c * CHUNK;
                        merge_chunk(&thetas, &theta0, at, out, &bins, tail, lambda, merge_func)
                    })
                    .collect();
                let mut st = state.borrow_mut();
                let mut exc = Vec::new();
                for p in parts {
                    st.sign_total += p.sign_total;
                    for (t, v) in p.candidates.into_iter().enumerate() {
                        st.candidates[t].extend(v);
                    }
                    exc.extend(p.exceptions);
                }
                let index = st.index;
                if !exc.is_empty() {
                    st.exceptions.push((index, exc));
                }
                st.index += 1;
                Ok(out)
            },
            || {
                tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "ties: pass B (merge)");
                let mut st = state.borrow_mut();
                let PassB { candidates, exceptions, sign_total, .. } = &mut *st;
                // The exact thresholds, then the exceptions.
                let kth: Vec<f32> = candidates
                    .iter_mut()
                    .zip(&bins)
                    .map(|(c, &(_, rank))| {
                        let r = rank as usize - 1;
                        let (_, v, _) = c.select_nth_unstable(r);
                        f32::from_bits(*v)
                    })
                    .collect();
                let mut fixed = Vec::with_capacity(exceptions.len());
                let mut gammas = Vec::with_capacity(exceptions.len());
                for (i, coords) in exceptions.iter() {
                    let name = &names[*i];
                    let theta0 = base.values(name)?;
                    let thetas =
                        models.iter().map(|m| m.values(name)).collect::<Result<Vec<_>>>()?;
                    let tail = tails[name] as usize;
                    let g: Vec<(usize, Vec<f32>, f32)> = coords
                        .iter()
                        .map(|&j| {
                            let v: Vec<f32> = thetas
                                .iter()
                                .zip(&kth)
                                .map(|(t, &kth)| {
                                    let tau = t[j] - theta0[j];
                                    tau * f32::from(u8::from(tau.abs() >= kth))
                                })
                                .collect();
                            let s = column_sum(&v, j >= tail);
                            (j, v, sign(s))
                        })
                        .collect();
                    *sign_total += g.iter().map(|(_, _, s)| *s as i64).sum::<i64>();
                    gammas.push((*i, g));
                }
                let majority = sign_total.signum() as f32;
                for (i, g) in gammas {
                    let name = &names[i];
                    let theta0 = base.values(name)?;
                    let tail = tails[name] as usize;
                    let patches: Vec<(usize, f32)> = g
                        .into_iter()
                        .map(|(j, v, s)| {
                            let gamma = if s == 0.0 { majority } else { s };
                            let agg = disjoint(&v, gamma, j >= tail, merge_func);
                            (j, theta0[j] + lambda * agg)
                        })
                        .collect();
                    if patches.iter().any(|(_, x)| !x.is_finite()) {
                        return Err(anyhow::anyhow!(
                            "merging tensor `{name}` overflowed float32 (the inputs are finite but the result is not)"
                        ));
                    }
                    fixed.push((i, patches));
                }
                tracing::debug!(
                    exceptions = fixed.iter().map(|(_, p)| p.len()).sum::<usize>(),
                    seconds = t0.elapsed().as_secs_f64(),
                    "ties: exceptional coordinates patched"
                );
                Ok(fixed)
            },
        )?;
        Ok(Merged {
            weights,
            trainable: true,
            workers_done: false,
            params: None,
            options: Default::default(),
            rejoin: None,
        })
    }
}

/// Bits of a bin key: |τ| bit patterns shifted right by [`SHIFT`] (2¹⁹ bins of 4096 patterns).
const SHIFT: u32 = 12;
const BINS: usize = 1 << (31 - SHIFT);
/// Elements of one tensor histogrammed for every task of a thread before moving on (θ₀'s chunk
/// stays in cache).
const PASS_A_CHUNK: usize = 1 << 14;
/// Elements per work unit of pass B.
const CHUNK: usize = 1 << 12;

/// torch.sign on float32 (0 for ±0).
fn sign(x: f32) -> f32 {
    f32::from(u8::from(x > 0.0)) - f32::from(u8::from(x < 0.0))
}

/// The disjoint merge of one coordinate's trimmed entries `v` under elected sign `gamma`.
fn disjoint(v: &[f32], gamma: f32, in_tail: bool, func: MergeFunc) -> f32 {
    let keep = |x: f32| if gamma > 0.0 { x > 0.0 } else { x < 0.0 };
    let selected: Vec<f32> = v.iter().map(|&x| x * f32::from(u8::from(keep(x)))).collect();
    match func {
        MergeFunc::Sum => column_sum(&selected, in_tail),
        MergeFunc::Mean => {
            let count = selected.iter().filter(|x| **x != 0.0).count() as f32;
            column_sum(&selected, in_tail) / count.max(1.0)
        }
        MergeFunc::Max => selected.iter().fold(0f32, |m, x| m.max(x.abs())) * gamma,
    }
}

/// Pass B's state across tensors: each task's threshold-bin entries, the exceptional
/// coordinates `(tensor index, local indices)`, the signs' total over decided coordinates.
struct PassB {
    candidates: Vec<Vec<u32>>,
    exceptions: Vec<(usize, Vec<usize>)>,
    sign_total: i64,
    index: usize,
}

/// What one chunk of pass B leaves for the global steps.
struct ChunkResult {
    sign_total: i64,
    candidates: Vec<Vec<u32>>,
    exceptions: Vec<usize>,
}

widest_simd! {
    /// Pass A on one task's tensor: counts |τ|'s bit patterns into `h` by bin; false if an entry is
    /// not finite.
    fn histogram(h: &mut [u32], theta: &[f32], theta0: &[f32]) -> bool {
        let mut finite = true;
        let n = theta.len().min(theta0.len());
        for start in (0..n).step_by(16) {
            prefetch(theta, start + PREFETCH_AHEAD);
            let end = (start + 16).min(n);
            for (&x, &b) in theta[start..end].iter().zip(&theta0[start..end]) {
                let bits = (x - b).abs().to_bits();
                finite &= bits < 0x7f80_0000;
                h[(bits >> SHIFT) as usize] += 1;
            }
        }
        finite
    }
}

widest_simd! {
    /// Pass B on elements `at..at + out.len()` of one tensor: writes every decided coordinate's
    /// merged value and reports the rest. Written as loops over contiguous rows so they vectorise;
    /// each element still sees FusionBench's float32 operations in FusionBench's order.
    fn merge_chunk(
        thetas: &[Cow<'_, [f32]>],
        theta0: &[f32],
        at: usize,
        out: &mut [f32],
        bins: &[(u32, u64)],
        tail: usize,
        lambda: f32,
        func: MergeFunc,
    ) -> ChunkResult {
        let n = out.len();
        let t = thetas.len();
        let b = &theta0[at..at + n];
        // Trimmed entries τ̂ (task-major); an entry in its task's threshold bin is undecided.
        let mut v = vec![0f32; t * n];
        let mut undecided = vec![0u8; n];
        let mut candidates = vec![Vec::new(); t];
        for (ti, theta) in thetas.iter().enumerate() {
            let bin = bins[ti].0;
            let row = &mut v[ti * n..(ti + 1) * n];
            let x = &theta[at..at + n];
            for start in (0..n).step_by(16) {
                prefetch(theta, at + start + PREFETCH_AHEAD);
                let end = (start + 16).min(n);
                let lanes = row[start..end]
                    .iter_mut()
                    .zip(&mut undecided[start..end])
                    .zip(&x[start..end])
                    .zip(&b[start..end]);
                for (((r, u), &x), &b) in lanes {
                    let tau = x - b;
                    let key = tau.abs().to_bits() >> SHIFT;
                    *r = tau * if key > bin { 1.0 } else { 0.0 };
                    *u |= u8::from(key == bin);
                }
            }
        }
        // The threshold bins' entries are rare (a few per chunk): collect them where they are.
        for j in nonzero_positions(&undecided) {
            for (ti, theta) in thetas.iter().enumerate() {
                let bits = (theta[at + j] - b[j]).abs().to_bits();
                if bits >> SHIFT == bins[ti].0 {
                    candidates[ti].push(bits);
                }
            }
        }
        let row = |ti: usize| &v[ti * n..(ti + 1) * n];
        // γ = sign(Σ τ̂), rows added in libtorch's order (outside the tail; the tail's
        // coordinates are exceptions); `nonzero` marks coordinates with a kept entry.
        let mut sum = LaneCascade::new(t, n);
        let mut nonzero = vec![0u8; n];
        for ti in 0..t {
            for ((s, nz), &x) in sum.acc().iter_mut().zip(nonzero.iter_mut()).zip(row(ti)) {
                *s += x;
                *nz |= u8::from(x != 0.0);
            }
            sum.row_done();
        }
        let gamma: Vec<f32> = sum.finish().iter().map(|&s| sign(s)).collect();
        // Coordinates whose γ is 0 take the global majority sign, unknown yet; with every entry zero
        // it cannot change the result (except `max` on a zero θ₀, whose sign of zero it sets).
        let g: Vec<f32> = gamma.iter().map(|&x| if x == 0.0 { 1.0 } else { x }).collect();
        // x · [γ > 0 ? x > 0 : x < 0], branch-free so the loops vectorise.
        let select = |x: f32, g: f32| {
            let up = u8::from(g > 0.0);
            let keep = (up & u8::from(x > 0.0)) | ((1 - up) & u8::from(x < 0.0));
            x * f32::from(keep)
        };
        match func {
            MergeFunc::Sum | MergeFunc::Mean => {
                // From +0, as libtorch's sum: a column of −0 entries sums to +0.
                let mut sum = LaneCascade::new(t, n);
                let mut count = vec![0f32; n];
                for ti in 0..t {
                    let lanes = sum.acc().iter_mut().zip(count.iter_mut()).zip(row(ti)).zip(&g);
                    for (((a, c), &x), &g) in lanes {
                        let sel = select(x, g);
                        *a += sel;
                        *c += f32::from(u8::from(sel != 0.0));
                    }
                    sum.row_done();
                }
                let mut agg = sum.finish();
                if func == MergeFunc::Mean {
                    for (a, c) in agg.iter_mut().zip(&count) {
                        *a /= c.max(1.0);
                    }
                }
                for ((o, &b), &a) in out.iter_mut().zip(b).zip(&agg) {
                    *o = b + lambda * a;
                }
            }
            MergeFunc::Max => {
                let mut agg = vec![0f32; n];
                for ti in 0..t {
                    for ((a, &x), &g) in agg.iter_mut().zip(row(ti)).zip(&g) {
                        *a = a.max(select(x, g).abs());
                    }
                }
                for (((o, &b), &a), &g) in out.iter_mut().zip(b).zip(&agg).zip(&g) {
                    *o = b + lambda * (a * g);
                }
            }
        }
        let mut sign_total: i64 = gamma.iter().map(|&x| x as i64).sum();
        // Exceptional: undecided, in the reduction tail, or a zero γ with a kept entry (or `max` on
        // a zero θ₀). Marked branch-free, then visited sparsely.
        let zero_base = u8::from(func == MergeFunc::Max);
        let tail_from = tail.saturating_sub(at).min(n);
        let mut special = undecided;
        for (((s, &nz), &gm), &bj) in special.iter_mut().zip(&nonzero).zip(&gamma).zip(b) {
            *s |= u8::from(gm == 0.0) & (nz | (zero_base & u8::from(bj == 0.0)));
        }
        special[tail_from..].fill(1);
        let mut exceptions = Vec::new();
        for j in nonzero_positions(&special) {
            exceptions.push(at + j);
            sign_total -= gamma[j] as i64;
            out[j] = 0.0;
        }
        ChunkResult { sign_total, candidates, exceptions }
    }
}

/// The indices of the non-zero bytes of a mostly-zero mask, in order (eight bytes at a time).
fn nonzero_positions(mask: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let words = mask.chunks(8).enumerate().filter(|(_, w)| w.iter().any(|&x| x != 0));
    words.flat_map(|(i, w)| {
        w.iter().enumerate().filter(|(_, &x)| x != 0).map(move |(k, _)| i * 8 + k)
    })
}

/// For each tensor name, the local index where libtorch's reduction tail (the flattened model's
/// last `D mod block` coordinates) starts, or the tensor's length when it lies before the tail.
/// FusionBench flattens in sorted-key order.
fn tail_starts(pool: &ModelPool, block: usize) -> std::collections::HashMap<String, i64> {
    let names = pool.parameter_names();
    let numel: Vec<i64> = names.iter().map(|n| pool.shape(n).iter().product()).collect();
    let total: i64 = numel.iter().sum();
    let tail_from = total - total % block as i64;
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&a, &b| names[a].cmp(&names[b]));
    let mut offset = 0;
    let mut out = std::collections::HashMap::new();
    for i in order {
        let start = (tail_from - offset).clamp(0, numel[i]);
        out.insert(names[i].clone(), start);
        offset += numel[i];
    }
    out
}
