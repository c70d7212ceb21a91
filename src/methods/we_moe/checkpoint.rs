//! WE-MoE checkpoints both ways: FusionBench's `fabric.save(path, {"model": moe})` (a
//! `torch.save`d dict holding the MoE model's state dict, pickle protocol 2, ZIP64 when large),
//! and `fabric.load(path, {"model": moe})`, which is `load_state_dict(strict=True)`: every key
//! of the constructed model must be there with its shape, and nothing else.

use crate::weights::torch_file::{self, Dtype, SaveValue, TensorRef, TorchValue};
use crate::weights::WeightMap;
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::path::Path;
use tch::Tensor;

/// Reads the model's state dict from `path` and checks it against `keys` (the constructed
/// model's names and shapes, in order). With a shared router, each layer's `gate.*` is loaded
/// into the one router in turn, so the last layer's copy is the router (as in FusionBench).
pub fn load(path: &Path, keys: &[(String, Vec<i64>)], shared_gate: bool) -> Result<WeightMap> {
    let shown = path.display();
    let value = torch_file::load(path).with_context(|| format!("method.checkpoint={shown}"))?;
    let model = match value.get("model") {
        Some(TorchValue::Dict(items)) => items,
        Some(_) => bail!("{shown}: `model` is not a state dict"),
        None => bail!("{shown}: no `model` entry (a WE-MoE checkpoint is fabric.save(path, {{\"model\": moe}}))"),
    };
    let found: std::collections::HashMap<&str, &TorchValue> =
        model.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let expected: std::collections::HashSet<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    if let Some((extra, _)) = model.iter().find(|(k, _)| !expected.contains(k.as_str())) {
        bail!(
            "{shown}: unexpected key `{extra}` in the state dict: the checkpoint is of another configuration (router depth, sparse variant, architecture or model pool)"
        );
    }
    let mut out = WeightMap::new();
    for (name, shape) in keys {
        let t = match found.get(name.as_str()) {
            Some(TorchValue::Tensor(t)) => t,
            Some(other) => bail!("{shown}: `{name}` is {other:?}, not a tensor"),
            None => bail!(
                "{shown}: missing key `{name}`: the checkpoint is of another configuration (task count, router depth, sparse variant or architecture)"
            ),
        };
        let found_shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        if &found_shape != shape {
            bail!("{shown}: `{name}` has shape {found_shape:?}, this model needs {shape:?} (another architecture, task count or router)");
        }
        let values =
            t.to_f32().with_context(|| format!("{shown}: `{name}` is not a float tensor"))?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!("{shown}: `{name}` holds a non-finite value ({}) at element {i}", values[i]);
        }
        out.insert(name.clone(), Tensor::from_slice(&values).view(shape.as_slice()));
    }
    if shared_gate {
        share_last_router(&mut out);
    }
    Ok(out)
}

/// Gives every layer the last layer's `…mlp.gate.*` tensors.
fn share_last_router(map: &mut WeightMap) {
    let gate = |name: &str| -> Option<String> {
        let (_, rest) = name.split_once(".mlp.gate.")?;
        Some(rest.to_string())
    };
    let mut last: std::collections::HashMap<String, Tensor> = Default::default();
    for (name, t) in map.iter() {
        if let Some(rest) = gate(name) {
            last.insert(rest, t.shallow_clone());
        }
    }
    let names: Vec<String> = map.names().to_vec();
    for name in names {
        if let Some(rest) = gate(&name) {
            map.insert(name, last[&rest].shallow_clone());
        }
    }
}

/// Writes `{"model": state_dict}` as FusionBench's `fabric.save` does (a plain dict holding an
/// OrderedDict), atomically.
pub fn save(path: &Path, map: &WeightMap) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tensors: Vec<(String, Tensor)> = map
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.detach().to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).contiguous(),
            )
        })
        .collect();
    let entries: Vec<(Cow<'_, str>, SaveValue<'_>)> = tensors
        .iter()
        .map(|(n, t)| (Cow::Borrowed(n.as_str()), SaveValue::Tensor(tensor_ref(t))))
        .collect();
    let value = SaveValue::Dict(vec![(Cow::Borrowed("model"), SaveValue::OrderedDict(entries))]);
    torch_file::save(path, &value)
        .with_context(|| format!("saving the WE-MoE checkpoint to {}", path.display()))
}

/// A borrowed view of a contiguous CPU float32 tensor's bytes.
fn tensor_ref(t: &Tensor) -> TensorRef<'_> {
    let n = t.numel() * 4;
    // SAFETY: `t` is a contiguous CPU float32 tensor (made so by the caller) that outlives the
    // borrow; its storage holds `numel` floats from `data_ptr`.
    let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) };
    TensorRef { dtype: Dtype::F32, shape: t.size().iter().map(|&d| d as usize).collect(), bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<(String, Vec<i64>)> {
        vec![
            ("vision_model.a".into(), vec![2, 3]),
            ("vision_model.encoder.layers.0.mlp.gate.weight".into(), vec![2]),
            ("vision_model.encoder.layers.1.mlp.gate.weight".into(), vec![2]),
        ]
    }

    fn map(values: [f32; 2]) -> WeightMap {
        let mut m = WeightMap::new();
        m.insert("vision_model.a", Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.]).view([2, 3]));
        m.insert(
            "vision_model.encoder.layers.0.mlp.gate.weight",
            Tensor::from_slice(&[0.1f32, 0.2]),
        );
        m.insert("vision_model.encoder.layers.1.mlp.gate.weight", Tensor::from_slice(&values));
        m
    }

    #[test]
    fn a_saved_checkpoint_loads_back_bit_for_bit_and_a_wrong_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moe.ckpt");
        let m = map([0.3, -0.7]);
        save(&path, &m).unwrap();
        let back = load(&path, &keys(), false).unwrap();
        assert_eq!(back.names(), m.names());
        for ((_, a), (_, b)) in back.iter().zip(m.iter()) {
            assert_eq!(a, b);
        }
        // The shared router: every layer gets the last layer's copy.
        let shared = load(&path, &keys(), true).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(
                shared.get("vision_model.encoder.layers.0.mlp.gate.weight").unwrap()
            )
            .unwrap(),
            vec![0.3, -0.7]
        );
        let mut fewer = keys();
        fewer.pop();
        let e = format!("{:#}", load(&path, &fewer, false).unwrap_err());
        assert!(
            e.contains("unexpected key `vision_model.encoder.layers.1.mlp.gate.weight`"),
            "{e}"
        );
        let mut more = keys();
        more.push(("vision_model.b".into(), vec![1]));
        let e = format!("{:#}", load(&path, &more, false).unwrap_err());
        assert!(e.contains("missing key `vision_model.b`") && e.contains("moe.ckpt"), "{e}");
        let mut shaped = keys();
        shaped[0].1 = vec![3, 2];
        let e = format!("{:#}", load(&path, &shaped, false).unwrap_err());
        assert!(e.contains("`vision_model.a` has shape [2, 3]"), "{e}");
        save(&path, &map([f32::NAN, 0.0])).unwrap();
        let e = format!("{:#}", load(&path, &keys(), false).unwrap_err());
        assert!(e.contains("non-finite") && e.contains("layers.1.mlp.gate.weight"), "{e}");
    }
}
