//! Link libtorch so that CUDA stays reachable (DESIGN.md §3).
//!
//! Without `--no-as-needed -ltorch` the linker drops `libtorch_cuda.so` (nothing references it
//! directly) and `tch::Cuda::is_available()` is false even on a GPU node. The rpath to the venv's
//! `torch/lib` lets `target/release/fusion_bench` run with no `LD_LIBRARY_PATH`; on a GPU machine
//! whose own torch 2.11 lives elsewhere, `LD_LIBRARY_PATH` naming that `lib` folder takes precedence
//! over this RUNPATH.
//!
//! It also embeds the `config/` tree into the binary (`$OUT_DIR/embedded_config.rs`).
fn main() {
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.to_string_lossy());
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    embed_config_tree();
}

/// Writes `$OUT_DIR/embedded_config.rs`: every file of `config/` as `(relative path, contents)`,
/// sorted by path, so the binary carries FusionBench's config tree and runs from any folder.
fn embed_config_tree() {
    let root = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("config");
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())).path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let rel = path.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
                files.push((rel, path));
            }
        }
    }
    files.sort();
    let mut out = String::from("/// `(path relative to config/, contents)`, sorted by path.\npub static FILES: &[(&str, &str)] = &[\n");
    for (rel, path) in &files {
        out.push_str(&format!("    ({rel:?}, include_str!({:?})),\n", path.display().to_string()));
    }
    out.push_str("];\n");
    let dest = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("embedded_config.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
    println!("cargo:rerun-if-changed=config");
}
