//! Shared by the integration tests: driving a bash harness with this build's `fusion_bench`,
//! comparing safetensors files byte for byte, comparing reports with FusionBench's, and
//! multi-process runs ([`cluster`]).
#![allow(dead_code)]

pub mod cluster;

use std::path::Path;
use std::process::Command;

/// Runs `scripts/<script>` with the built `fusion_bench` as its argument, prints its output, and
/// asserts it passed. A harness that cannot run here (no root, no `ip netns`, no Slurm) prints
/// `SKIP: …` and exits 0; that is accepted only outside CI: under `CI=true` the harness itself
/// fails instead of skipping, and a `SKIP` line or a missing `PASS` line fails the test too.
pub fn run_harness(script: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(script);
    let out =
        Command::new("bash").arg(&script).arg(env!("CARGO_BIN_EXE_fusion_bench")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed: {}", script.display(), out.status);
    assert_harness_verdict(&stdout, std::env::var("CI").as_deref() == Ok("true"));
}

/// A harness's output must hold a `PASS:` line, or (outside CI only) a `SKIP:` line.
pub fn assert_harness_verdict(stdout: &str, ci: bool) {
    let line = |tag: &str| stdout.lines().any(|l| l.starts_with(tag));
    if ci {
        assert!(!line("SKIP:"), "a harness skipped under CI=true, where a skip is a failure");
        assert!(line("PASS:"), "no PASS line from the harness:\n{stdout}");
    } else {
        assert!(
            line("PASS:") || line("SKIP:"),
            "neither PASS nor SKIP from the harness:\n{stdout}"
        );
    }
}

/// Asserts that two safetensors files hold the same tensors, by the names in their headers: same
/// set of names, and for each the same dtype, shape and data bytes (so `-0.0` differs from `0.0`
/// and a NaN's payload counts). The order of the header and of the data may differ. Returns how
/// many tensors were compared (at least one).
pub fn assert_same_safetensors(ours: &Path, golden: &Path) -> usize {
    let (ob, gb) = (std::fs::read(ours).unwrap(), std::fs::read(golden).unwrap());
    let o = safetensors::SafeTensors::deserialize(&ob).unwrap();
    let g = safetensors::SafeTensors::deserialize(&gb).unwrap();
    let sorted = |st: &safetensors::SafeTensors| {
        let mut v: Vec<String> = st.names().into_iter().map(String::from).collect();
        v.sort();
        v
    };
    let names = sorted(&g);
    assert!(!names.is_empty(), "{} holds no tensor", golden.display());
    assert_eq!(sorted(&o), names, "{} vs {}: tensor names", ours.display(), golden.display());
    for name in &names {
        let (a, b) = (o.tensor(name).unwrap(), g.tensor(name).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "`{name}`: dtype or shape");
        if a.data() != b.data() {
            let words = |d: &[u8]| -> Vec<[u8; 4]> {
                d.chunks_exact(4).map(|w| [w[0], w[1], w[2], w[3]]).collect()
            };
            let (x, y) = (words(a.data()), words(b.data()));
            let differing = x.iter().zip(&y).filter(|(p, q)| p != q).count();
            let max = (b.dtype() == safetensors::Dtype::F32).then(|| {
                let f = |w: &[u8; 4]| f32::from_le_bytes(*w);
                x.iter().zip(&y).map(|(p, q)| (f(p) - f(q)).abs()).fold(0f32, f32::max)
            });
            panic!(
                "`{name}` differs from {}: {differing} of {} 4-byte words; max |diff| {max:?}",
                golden.display(),
                y.len()
            );
        }
    }
    names.len()
}

/// Relative tolerance of a report's losses against FusionBench's (BLAS differs in the last bits
/// between CPUs; accuracies must be equal).
pub const LOSS_REL_TOL: f64 = 1.0 / 65536.0;

/// Accuracies equal, losses within [`LOSS_REL_TOL`], the same keys in the same order and the
/// same `model_info`: our report against FusionBench's (its tasks and the average).
pub fn assert_same_report(ours: &serde_json::Value, theirs: &serde_json::Value) {
    let (o, t) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
    assert_eq!(o.keys().collect::<Vec<_>>(), t.keys().collect::<Vec<_>>());
    assert_eq!(o["model_info"], t["model_info"]);
    let mut compared = 0;
    for (k, v) in t {
        if k == "model_info" {
            continue;
        }
        assert_eq!(o[k]["accuracy"], v["accuracy"], "{k}: accuracy");
        let (a, b) = (o[k]["loss"].as_f64().unwrap(), v["loss"].as_f64().unwrap());
        assert!((a - b).abs() <= LOSS_REL_TOL * b.abs(), "{k}: loss {a} vs FusionBench's {b}");
        compared += 1;
    }
    assert!(compared >= 2 && t.contains_key("average"), "tasks and the average: {t:?}");
}

/// Whether this machine's CPU is the one the goldens in `dir` were made on: the vendor and model
/// name in its `machine.json` (`scripts/fixtures/machine_record.py`) against `/proc/cpuinfo`'s
/// first processor. Elsewhere MKL and ATen take other kernels, so FusionBench's own results
/// move in their last bits, which an ill-conditioned step (a linear solve, twenty Adam steps)
/// amplifies: the parity tests compare within their strict tolerance on the goldens' CPU and
/// within the measured spread of FusionBench's own results between CPUs elsewhere.
pub fn on_goldens_cpu(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("machine.json")) else { return false };
    let Ok(m) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let same = m["cpu_vendor"].as_str().map(String::from) == field("vendor_id")
        && m["cpu_model"].as_str().map(String::from) == field("model name");
    if !same {
        eprintln!(
            "the goldens in {} come from another CPU ({} {}): cross-CPU tolerances",
            dir.display(),
            m["cpu_vendor"],
            m["cpu_model"]
        );
    }
    same
}

/// Every tensor of `golden` against the tensor of `ours` that `ours_name` maps its name to,
/// within `rel` relative: max|ours − theirs| ≤ `rel` · max|theirs| per tensor (BLAS may differ in
/// the last bits between CPUs). Returns how many tensors were compared (at least one).
pub fn assert_close_safetensors(
    ours: &Path,
    golden: &Path,
    rel: f64,
    ours_name: &dyn Fn(&str) -> String,
) -> usize {
    assert_close_safetensors_floor(ours, golden, rel, 0.0, ours_name)
}

/// [`assert_close_safetensors`], each tensor's scale at least `floor` times the file's largest
/// value: a tensor that is analytically zero (the Fisher of `k_proj.bias`, whose gradient the
/// softmax cancels) holds float32 rounding noise whose bits depend on the summation order, so
/// it must only stay at that noise level.
pub fn assert_close_safetensors_floor(
    ours: &Path,
    golden: &Path,
    rel: f64,
    floor: f64,
    ours_name: &dyn Fn(&str) -> String,
) -> usize {
    let (ob, gb) = (std::fs::read(ours).unwrap(), std::fs::read(golden).unwrap());
    let o = safetensors::SafeTensors::deserialize(&ob).unwrap();
    let g = safetensors::SafeTensors::deserialize(&gb).unwrap();
    let floats = |d: &[u8]| -> Vec<f64> {
        d.chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]) as f64).collect()
    };
    let names = g.names();
    assert!(!names.is_empty(), "{} holds no tensor", golden.display());
    let file_scale = names
        .iter()
        .map(|n| floats(g.tensor(n).unwrap().data()).iter().fold(0f64, |m, v| m.max(v.abs())))
        .fold(0f64, f64::max);
    for name in &names {
        let b = g.tensor(name).unwrap();
        let mine = ours_name(name);
        let a = o.tensor(&mine).unwrap_or_else(|_| panic!("{} has no `{mine}`", ours.display()));
        assert_eq!(a.shape(), b.shape(), "`{name}`: shape");
        let (x, y) = (floats(a.data()), floats(b.data()));
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs())).max(floor * file_scale);
        let diff = x.iter().zip(&y).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= rel * scale,
            "`{name}` of {}: max|diff| {diff:e} against max|FusionBench| {scale:e}",
            ours.display()
        );
    }
    names.len()
}

/// Overwrites the first element of float32 tensor `name` in the safetensors file `file` with a
/// NaN, in place (a corrupted statistics cache).
pub fn poison_safetensors(file: &Path, name: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    let (header, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.info(name).unwrap_or_else(|| panic!("{} has no `{name}`", file.display()));
    assert_eq!(info.dtype, safetensors::Dtype::F32);
    let at = 8 + header + info.data_offsets.0;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

/// Copies the folder `from` into `to` (created), recursively.
#[allow(dead_code)]
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Every file under `dir`, recursively.
#[allow(dead_code)]
pub fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
