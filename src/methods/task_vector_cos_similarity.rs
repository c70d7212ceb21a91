//! `method=analysis/task_vector_cos_similarity` (FusionBench's `TaskVectorCosSimilarity`; the
//! seed's `method=task_vector_cos_similarity method.save_to_csv=…` is accepted as an alias):
//! the pairwise cosine similarity of the pool's task vectors τᵢ = θᵢ − θ₀.
//!
//! As FusionBench computes it: each τᵢ is the float32 difference, flattened in sorted-key order,
//! then widened to float64, and `C[i,j] = cosine_similarity(τᵢ, τⱼ)` is libtorch's own function
//! on those vectors, so the matrix is bit-identical to FusionBench's on the same machine with the
//! same thread count (ATen splits the float64 sums by vector width and threads; elsewhere the
//! last bits may differ, `tests/merge_bad_input.rs`). It is written as pandas writes the
//! `DataFrame` (`task_vector_cos_similarity.csv`), with a heatmap PNG beside it (FusionBench
//! draws a PDF with seaborn), and printed. The method returns the pretrained model, so it is run
//! with `taskpool=dummy`.
//!
//! Memory: the T flattened float32 task vectors (FusionBench holds them in float64) plus two
//! float64 vectors during each comparison.
//!
//! `output_path` (alias `save_to_csv`) is a directory, as in FusionBench; a path ending in
//! `.csv` (the seed's form) names the CSV file itself. Unset, the program's `path.log_dir` is
//! used. `max_points_per_model` subsamples each τ at random positions, as FusionBench does with
//! an unseeded NumPy draw; here the draw is seeded from the program's `seed` (0 when unset), so
//! values differ from FusionBench's, whose draw cannot be replayed.

use super::{Checkpoint, Context as MethodContext, Merged, Method, ModelPool, RunContext};
use crate::config::MethodConfig;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The analysis with FusionBench's options.
pub struct TaskVectorCosSimilarity {
    plot_heatmap: bool,
    max_points_per_model: Option<i64>,
    csv: Option<PathBuf>,
    seed: u64,
}

impl TaskVectorCosSimilarity {
    /// Reads `plot_heatmap` (true), `trainable_only` (true), `max_points_per_model` (null) and
    /// `output_path` (null: `path.log_dir`).
    pub fn from_config(cfg: &MethodConfig, ctx: &MethodContext) -> Result<Self> {
        let s = &cfg.section;
        crate::config::warn_unknown_keys(
            s,
            &["_target_", "plot_heatmap", "trainable_only", "max_points_per_model", "output_path"],
        );
        let plot_heatmap = s.get::<bool>("plot_heatmap").context("method.plot_heatmap")?;
        // Every parameter of a CLIPVisionModel is trainable and its only buffer (`position_ids`)
        // is not persistent, so `trainable_only` selects the same tensors either way.
        s.get::<bool>("trainable_only").context("method.trainable_only")?;
        let max_points_per_model =
            s.get::<i64>("max_points_per_model").context("method.max_points_per_model")?;
        let output: Option<String> = s.get("output_path").context("method.output_path")?;
        let csv = match output.or_else(|| ctx.log_dir.clone()) {
            Some(p) if p.ends_with(".csv") => Some(PathBuf::from(p)),
            Some(dir) => Some(Path::new(&dir).join("task_vector_cos_similarity.csv")),
            None => None,
        };
        Ok(Self {
            plot_heatmap: plot_heatmap.unwrap_or(true),
            max_points_per_model: max_points_per_model.filter(|&m| m > 0),
            csv,
            seed: ctx.seed.unwrap_or(0),
        })
    }

    /// τᵢ flattened in sorted-key order (FusionBench's `state_dict_to_vector`), float32.
    fn task_vector(&self, pool: &ModelPool, base: &Checkpoint, m: &Checkpoint) -> Result<Tensor> {
        let mut names: Vec<&String> = pool.parameter_names().iter().collect();
        names.sort();
        let parts = names
            .iter()
            .map(|n| Ok((m.get(n)? - base.get(n)?).reshape([-1])))
            .collect::<Result<Vec<Tensor>>>()?;
        let flat = Tensor::cat(&parts, 0);
        Ok(match self.max_points_per_model {
            Some(max) if flat.size()[0] > max => {
                let d = flat.size()[0];
                tracing::info!(max, "downsampling task vectors");
                let _held = crate::tta::torch_rng::GLOBAL_GENERATOR
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                tch::manual_seed(self.seed as i64);
                let idx = Tensor::randperm(d, (Kind::Int64, Device::Cpu)).narrow(0, 0, max);
                flat.index_select(0, &idx)
            }
            _ => flat,
        })
    }
}

impl Method for TaskVectorCosSimilarity {
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged> {
        let pool = ctx.pool;
        let _guard = tch::no_grad_guard();
        let base = pool.pretrained()?;
        let models = pool.task_models()?;
        if models.is_empty() {
            bail!("task_vector_cos_similarity: the model pool has no fine-tuned models");
        }
        let bar = crate::progress::bar("task vectors", models.len(), "models");
        let mut vectors = Vec::with_capacity(models.len());
        for m in &models {
            tracing::info!(model = m.name(), "computing the task vector");
            vectors.push(self.task_vector(pool, &base, m)?);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let t = vectors.len();
        let mut c = vec![vec![0f64; t]; t];
        for i in 0..t {
            let vi = vectors[i].to_kind(Kind::Double);
            for j in i..t {
                let vj = vectors[j].to_kind(Kind::Double);
                let v = Tensor::cosine_similarity(&vi, &vj, 0, 1e-8).double_value(&[]);
                c[i][j] = v;
                c[j][i] = v;
            }
        }
        drop(vectors);
        let names: Vec<String> = models.iter().map(|m| m.name().to_string()).collect();
        let csv = crate::report::matrix_csv(&names, &c);
        println!("{csv}");
        if let Some(path) = &self.csv {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            crate::report::write_atomic(path, csv.as_bytes())?;
            tracing::info!(path = %path.display(), "cosine similarities saved");
            if self.plot_heatmap {
                let png = path.with_extension("png");
                crate::report::heatmap::save_png(
                    &png,
                    &names,
                    &c,
                    "cos similarity of task vectors",
                )?;
                tracing::info!(path = %png.display(), "heatmap saved");
            }
        } else if self.plot_heatmap {
            tracing::warn!("no output_path and no path.log_dir: the heatmap is not drawn");
        }
        let weights = pool.merge_per_tensor(|n, _| base.get(n))?;
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
