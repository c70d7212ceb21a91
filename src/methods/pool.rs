//! The model pool as methods see it: FusionBench's `CLIPVisionModelPool` (ordered names → hub ids
//! or directories; names like `_pretrained_` are special), opened lazily as mmap'd checkpoints.

use crate::config::ModelPoolConfig;
use crate::hub::{Hub, RepoType};
use crate::models::clip::{vision, CheckpointWeights, VisionConfig};
use crate::weights::{non_finite, SafetensorsWriter, WeightMap, WeightSource};
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{Kind, Tensor};

/// One opened checkpoint of the pool.
pub struct Checkpoint {
    name: String,
    dir: std::path::PathBuf,
    weights: CheckpointWeights,
    shapes: HashMap<String, Vec<i64>>,
    /// Tensors already found finite (a method may read a tensor in several passes).
    finite: Mutex<HashSet<String>>,
}

impl Checkpoint {
    /// The float32 values of tensor `name`, read in place from the mapped file when it is stored
    /// as F32 (else a converted copy), with its shape checked against the pool's architecture.
    /// Unlike [`get`](Self::get), values are not checked for NaN or ±inf here: kernels that read
    /// through this check what they compute and call [`non_finite_error`] to name the culprit.
    pub fn values(&self, name: &str) -> Result<std::borrow::Cow<'_, [f32]>> {
        match self.weights.f32_slice(name) {
            Some((values, shape)) => {
                if let Some(want) = self.shapes.get(name) {
                    if &shape != want {
                        bail!(
                            "model `{}`: tensor `{name}` has shape {shape:?}, but the pool's first model has {want:?}",
                            self.name
                        );
                    }
                }
                Ok(std::borrow::Cow::Borrowed(values))
            }
            None => {
                let t = self.get(name)?.contiguous();
                let mut v = vec![0f32; t.numel()];
                t.f_copy_data(&mut v, t.numel())?;
                Ok(std::borrow::Cow::Owned(v))
            }
        }
    }

    /// The model's name in the pool (`sun397`, `_pretrained_`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The folder its files are in (a hub snapshot or a local model folder).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The tensor `name` (`vision_model.…`) as float32, checked against the pool's architecture
    /// and for NaN or infinite values (an error naming the model and tensor).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let t = self.weights.tensor(name).with_context(|| format!("model `{}`", self.name))?;
        if let Some(shape) = self.shapes.get(name) {
            if &t.size() != shape {
                bail!(
                    "model `{}`: tensor `{name}` has shape {:?}, but the pool's first model has {:?}",
                    self.name,
                    t.size(),
                    shape
                );
            }
        }
        let t = if t.kind() == Kind::Float { t } else { t.to_kind(Kind::Float) };
        let mut finite = self.finite.lock().unwrap_or_else(|e| e.into_inner());
        if !finite.contains(name) {
            if let Some((at, count)) = non_finite(&t) {
                bail!(
                    "model `{}`: tensor `{name}` has {count} non-finite value(s) (NaN or ±inf), the first at flat index {at}; a merge of it would be meaningless",
                    self.name
                );
            }
            finite.insert(name.to_string());
        }
        Ok(t)
    }
}

/// The error for a merge of tensor `name` that produced a NaN or ±inf: names the first of
/// `inputs` holding one, or says the arithmetic overflowed when none does.
pub fn non_finite_error(name: &str, inputs: &[&Checkpoint]) -> anyhow::Error {
    for c in inputs {
        match c.get(name) {
            Err(e) => return e,
            Ok(_) => continue,
        }
    }
    anyhow::anyhow!(
        "merging tensor `{name}` overflowed float32 (the inputs are finite but the result is not)"
    )
}

/// A new float32 CPU tensor of `shape` and its values as a mutable slice, for kernels that fill
/// it in place.
pub fn output_tensor(shape: &[i64]) -> Tensor {
    Tensor::empty(shape, (Kind::Float, tch::Device::Cpu))
}

/// The values of a tensor made by [`output_tensor`], to be filled.
pub fn output_values(t: &mut Tensor) -> &mut [f32] {
    assert!(t.kind() == Kind::Float && t.is_contiguous() && t.device() == tch::Device::Cpu);
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: a contiguous CPU float32 tensor of `n` elements, borrowed mutably for the slice's
    // lifetime, so nothing else reads or writes it meanwhile.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) }
}

/// The pool: `(name, local directory)` in config order and the shared vision architecture.
pub struct ModelPool {
    models: Vec<(String, PathBuf)>,
    config: VisionConfig,
    names: Vec<String>,
    shapes: HashMap<String, Vec<i64>>,
    /// Where merged tensors are streamed instead of being kept (`model.safetensors`).
    stream_to: Option<PathBuf>,
}

fn is_special(name: &str) -> bool {
    name.len() > 1 && name.starts_with('_') && name.ends_with('_')
}

impl ModelPool {
    /// Resolves every model of the config through the hub cache (or local directories) and reads
    /// the architecture from the pretrained (else first) model's `config.json`.
    pub fn from_config(cfg: &ModelPoolConfig, hub: &Hub) -> Result<Self> {
        let mut models = Vec::new();
        for (name, spec) in &cfg.models {
            let dir = hub
                .resolve(&spec.path, RepoType::Model, None)
                .with_context(|| format!("modelpool.models.{name}"))?;
            models.push((name.clone(), dir));
        }
        let Some((_, first)) =
            models.iter().find(|(n, _)| n == "_pretrained_").or_else(|| models.first())
        else {
            bail!("modelpool.models is empty");
        };
        let config = VisionConfig::from_file(&first.join("config.json"))?;
        let names: Vec<String> =
            vision::parameter_names(&config).iter().map(|n| format!("vision_model.{n}")).collect();
        let shapes = names.iter().cloned().zip(vision::parameter_shapes(&config)).collect();
        Ok(Self { models, config, names, shapes, stream_to: None })
    }

    /// The merged tensors' names (`vision_model.…`) in `named_parameters()` order.
    pub fn parameter_names(&self) -> &[String] {
        &self.names
    }

    /// The shape of tensor `name` in the pool's architecture.
    pub fn shape(&self, name: &str) -> &[i64] {
        &self.shapes[name]
    }

    /// The shared vision architecture.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    fn open(&self, name: &str, dir: &std::path::Path) -> Result<Checkpoint> {
        let weights = CheckpointWeights::open(dir).with_context(|| format!("model `{name}`"))?;
        for n in &self.names {
            if !weights.contains(n) {
                bail!("model `{name}` ({}) has no tensor `{n}`", dir.display());
            }
        }
        Ok(Checkpoint {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            weights,
            shapes: self.shapes.clone(),
            finite: Mutex::new(HashSet::new()),
        })
    }

    /// The `_pretrained_` model; an error naming the pool when there is none.
    pub fn pretrained(&self) -> Result<Checkpoint> {
        match self.models.iter().find(|(n, _)| n == "_pretrained_") {
            Some((n, d)) => self.open(n, d),
            None => bail!("this method needs modelpool.models._pretrained_, and the pool has none"),
        }
    }

    /// The fine-tuned models (names that are not special), in config order.
    pub fn task_models(&self) -> Result<Vec<Checkpoint>> {
        self.models.iter().filter(|(n, _)| !is_special(n)).map(|(n, d)| self.open(n, d)).collect()
    }

    /// `_pretrained_` if the pool has it, else its first model (`from_config` refuses an empty
    /// pool).
    fn pretrained_or_first(&self) -> &(String, PathBuf) {
        self.models
            .iter()
            .find(|(n, _)| n == "_pretrained_")
            .or_else(|| self.models.first())
            .expect("a pool is never empty")
    }

    /// The directory whose `config.json` describes the merged model (pretrained, else first).
    pub fn config_source(&self) -> PathBuf {
        self.pretrained_or_first().1.join("config.json")
    }

    /// FusionBench's `load_pretrained_or_first_model`, as ordered vision weights.
    pub fn load_pretrained_or_first(&self) -> Result<WeightMap> {
        let (name, dir) = self.pretrained_or_first();
        let ckpt = self.open(name, dir)?;
        self.merge_per_tensor(|n, _| ckpt.get(n))
    }

    /// From now on, [`merge_per_tensor`](Self::merge_per_tensor) streams its tensors into the
    /// safetensors file `path` (written to a temporary name and renamed when the merge
    /// completes) instead of keeping them: the merge then holds one tensor of output at a time.
    pub fn stream_merged_to(&mut self, path: &Path) {
        self.stream_to = Some(path.to_path_buf());
    }

    /// Builds a map in `named_parameters()` order by calling `merge(name, shape)` once per
    /// tensor: inputs are read from the mmap when asked for and freed when `merge` returns.
    /// When the pool streams its output ([`stream_merged_to`](Self::stream_merged_to)), each
    /// tensor goes to the file as soon as it is merged and the returned map is empty.
    pub fn merge_per_tensor(
        &self,
        merge: impl FnMut(&str, &[i64]) -> Result<Tensor>,
    ) -> Result<WeightMap> {
        self.merge_per_tensor_then_patch(merge, || Ok(Vec::new()))
    }

    /// [`merge_per_tensor`](Self::merge_per_tensor), then `patch` gives values to overwrite once
    /// every tensor is merged: `(tensor index in parameter_names(), [(flat element index,
    /// value)])`. Streamed output is patched in the file before it is renamed into place.
    pub fn merge_per_tensor_then_patch(
        &self,
        mut merge: impl FnMut(&str, &[i64]) -> Result<Tensor>,
        patch: impl FnOnce() -> Result<Vec<(usize, Vec<(usize, f32)>)>>,
    ) -> Result<WeightMap> {
        let _guard = tch::no_grad_guard();
        let writer = match &self.stream_to {
            Some(path) => {
                let entries =
                    self.names.iter().map(|n| (n.clone(), self.shapes[n].clone())).collect();
                let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
                Some(SafetensorsWriter::create(path, entries, Some(meta))?)
            }
            None => None,
        };
        let bar = crate::progress::bar("merging", self.names.len(), "tensors");
        let mut out = WeightMap::new();
        // A streamed tensor is written by a thread of its own while the next one is merged (the
        // copy into the page cache would otherwise leave the merge's other threads idle).
        let writer = std::thread::scope(|scope| -> Result<Option<SafetensorsWriter>> {
            let (tx, handle) = match writer {
                Some(mut w) => {
                    let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Tensor)>(1);
                    let handle = scope.spawn(move || -> Result<SafetensorsWriter> {
                        let _guard = tch::no_grad_guard();
                        for (name, t) in rx {
                            w.write(&name, &t)?;
                        }
                        Ok(w)
                    });
                    (Some(tx), Some(handle))
                }
                None => (None, None),
            };
            for name in &self.names {
                let t = merge(name, &self.shapes[name])?;
                match &tx {
                    // A closed channel means the writer failed: its error is reported below.
                    Some(tx) => {
                        if tx.send((name.clone(), t)).is_err() {
                            break;
                        }
                    }
                    None => {
                        out.insert(name.clone(), t);
                    }
                }
                bar.inc(1);
            }
            drop(tx);
            match handle {
                Some(h) => match h.join() {
                    Ok(w) => Ok(Some(w?)),
                    Err(panic) => std::panic::resume_unwind(panic),
                },
                None => Ok(None),
            }
        })?;
        bar.finish_and_clear();
        let patches = patch()?;
        match writer {
            Some(mut w) => {
                for (i, values) in &patches {
                    w.patch(*i, values)?;
                }
                let t0 = std::time::Instant::now();
                w.finish()?;
                tracing::debug!(
                    seconds = t0.elapsed().as_secs_f64(),
                    "merged file patched and renamed"
                );
            }
            None => {
                for (i, values) in &patches {
                    let mut t =
                        out.get(&self.names[*i]).expect("every tensor is merged").shallow_clone();
                    let data = output_values(&mut t);
                    for &(j, v) in values {
                        data[j] = v;
                    }
                }
            }
        }
        Ok(out)
    }
}
