//! GPU check (run by `scripts/gpu-check.sh` on a machine with CUDA; prints and exits 0 on CPU).
//!
//! 1. CUDA vs CPU parity of the CLIP forward on the real B/32 and L/14 vision shapes with random
//!    weights (seeded), fp32. Tolerance: max |diff| ≤ 1e-3 on LayerNorm'd outputs of O(1) —
//!    cuDNN may run the patch convolution in TF32 (torch's default), so bit equality is not
//!    expected.
//! 2. Forward throughput (images/s) at batch 128, fp32 and bf16, for both shapes.
//! 3. A test-time adaptation step's forward and backward passes at both sizes (eight task
//!    batches: 16 images at B/32, 4 at L/14 as in the seed's L/14 recipe), gradients to every
//!    parameter: the dominant cost of an AdaMerging or WE-MoE step. FusionBench's own profile of
//!    layer-wise AdaMerging at B/32 on one GPU: 0.72 s per step, 0.61 s of it these passes.
//!
//! `GPU_CHECK_STEP_ON_CPU=1` times part 3 at B/32 on the CPU instead (to try the code path on a
//! machine without a GPU).

use fusion_bench::models::clip::{vision, ClipVision, VisionConfig};
use fusion_bench::weights::{Scope, WeightMap};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn shape_config(name: &str) -> VisionConfig {
    let json = match name {
        "B/32" => {
            r#"{"hidden_size":768,"intermediate_size":3072,"num_attention_heads":12,"num_hidden_layers":12,"patch_size":32,"image_size":224}"#
        }
        _ => {
            r#"{"hidden_size":1024,"intermediate_size":4096,"num_attention_heads":16,"num_hidden_layers":24,"patch_size":14,"image_size":224}"#
        }
    };
    VisionConfig::from_json(name, json).expect("built-in config")
}

fn random_weights(c: &VisionConfig) -> WeightMap {
    tch::manual_seed(0);
    let mut map = WeightMap::new();
    for (name, shape) in vision::parameter_names(c).iter().zip(vision::parameter_shapes(c)) {
        let t = if name.contains("norm") && name.ends_with("weight") {
            Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
        } else if name.contains("norm") || name.ends_with("bias") {
            Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu))
        } else {
            Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02
        };
        map.insert(format!("vision_model.{name}"), t);
    }
    map
}

fn load(map: &WeightMap, c: &VisionConfig, device: Device, kind: Kind) -> ClipVision {
    ClipVision::load(&Scope::new(map, device, kind).pp("vision_model"), c).expect("weights match")
}

/// Seconds of one adaptation step's forward and backward passes: `tasks` batches of `batch`
/// images, each through the tower and back to every parameter (mean of 3 steps after one warm-up).
fn step_seconds(
    map: &WeightMap,
    c: &VisionConfig,
    device: Device,
    tasks: usize,
    batch: i64,
) -> f64 {
    tch::with_grad(|| {
        let mut leaves = WeightMap::new();
        for (name, t) in map.iter() {
            leaves.insert(name, t.to_device(device).set_requires_grad(true));
        }
        let model = load(&leaves, c, device, Kind::Float);
        let inputs: Vec<&Tensor> = leaves.iter().map(|(_, t)| t).collect();
        tch::manual_seed(2);
        let x = Tensor::randn([batch, 3, 224, 224], (Kind::Float, device));
        let step = || {
            for _ in 0..tasks {
                let loss = model.forward(&x).square().mean(None::<Kind>);
                let grads = Tensor::run_backward(&[&loss], &inputs, false, false);
                assert_eq!(grads.len(), inputs.len());
            }
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        };
        step();
        let t0 = Instant::now();
        for _ in 0..3 {
            step();
        }
        t0.elapsed().as_secs_f64() / 3.0
    })
}

fn main() {
    let _g = tch::no_grad_guard();
    println!("torch threads: {}", tch::get_num_threads());
    if !tch::Cuda::is_available() && std::env::var_os("GPU_CHECK_STEP_ON_CPU").is_some() {
        let c = shape_config("B/32");
        let s = step_seconds(&random_weights(&c), &c, Device::Cpu, 2, 4);
        println!("adaptation step B/32 on the CPU (2 × batch 4, forward + backward): {s:.3} s");
        return;
    }
    if !tch::Cuda::is_available() {
        println!(
            "no CUDA device visible to libtorch: nothing to check (this is fine on CPU machines)"
        );
        return;
    }
    let gpu = Device::Cuda(0);
    println!(
        "CUDA devices: {}, cudnn: {}",
        tch::Cuda::device_count(),
        tch::Cuda::cudnn_is_available()
    );
    let mut ok = true;
    for name in ["B/32", "L/14"] {
        let c = shape_config(name);
        let map = random_weights(&c);
        tch::manual_seed(1);
        let x = Tensor::randn([8, 3, 224, 224], (Kind::Float, Device::Cpu));
        let cpu = load(&map, &c, Device::Cpu, Kind::Float).forward(&x);
        let cuda =
            load(&map, &c, gpu, Kind::Float).forward(&x.to_device(gpu)).to_device(Device::Cpu);
        let diff = (&cpu - &cuda).abs().max().double_value(&[]);
        let pass = diff <= 1e-3;
        ok &= pass;
        println!(
            "parity {name} fp32 CUDA vs CPU: max |diff| = {diff:.3e} (tol 1e-3) {}",
            if pass { "PASS" } else { "FAIL" }
        );
        for kind in [Kind::Float, Kind::BFloat16] {
            let model = load(&map, &c, gpu, kind);
            let batch = Tensor::randn([128, 3, 224, 224], (kind, gpu));
            for _ in 0..3 {
                let _ = model.forward(&batch);
            }
            tch::Cuda::synchronize(0);
            let iters = 10;
            let t0 = Instant::now();
            for _ in 0..iters {
                let _ = model.forward(&batch);
            }
            tch::Cuda::synchronize(0);
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "throughput {name} {kind:?}: {:.0} images/s (batch 128, {iters} iterations)",
                128.0 * iters as f64 / secs
            );
        }
        let batch = if name == "B/32" { 16 } else { 4 };
        let s = step_seconds(&map, &c, gpu, 8, batch);
        println!(
            "adaptation step {name} (8 × batch {batch}, forward + backward to every parameter): {s:.3} s \
             (FusionBench, layer-wise AdaMerging at B/32 on one GPU: 0.72 s per step, 0.61 s of it these passes)"
        );
    }
    if !ok {
        std::process::exit(1);
    }
}
