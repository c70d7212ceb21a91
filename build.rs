//! Link libtorch so that CUDA stays reachable (DESIGN.md §3).
//!
//! Without `--no-as-needed -ltorch` the linker drops `libtorch_cuda.so` (nothing references it
//! directly) and `tch::Cuda::is_available()` is false even on a GPU node. The rpath to the venv's
//! `torch/lib` lets `target/release/fusion_bench` run with no `LD_LIBRARY_PATH`; on a GPU machine
//! whose own torch 2.11 lives elsewhere, `LD_LIBRARY_PATH` naming that `lib` folder takes precedence
//! over this RUNPATH.
fn main() {
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.to_string_lossy());
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    // The commit built, for sweep cell keys (a new build never serves an old build's results).
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FUSION_BENCH_GIT={git}");
    // Where HEAD and the branch refs live: `.git/…` in a clone, elsewhere in a `git worktree`
    // (where `.git` is a file, and a path that never exists would rerun this script every build).
    for (path, default) in [("HEAD", ".git/HEAD"), ("refs/heads", ".git/refs/heads")] {
        let found = std::process::Command::new("git")
            .args(["rev-parse", "--git-path", path])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        println!("cargo:rerun-if-changed={}", found.as_deref().unwrap_or(default));
    }
}
