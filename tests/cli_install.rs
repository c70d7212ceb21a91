//! An installed binary: copied out of the build tree and run from an empty folder, it composes
//! every command line of the seed document from the config tree built into it, exactly as the
//! build run from the repository (whose `./config` it reads) does; `./config` and `--config-dir`
//! still take precedence; `--help` lists every flag; the Slurm recipes pick this binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "common/seed.rs"]
mod seed;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of the built binary in `dir/bin`, as `cargo install` or a copy by hand leaves it.
fn installed(dir: &Path) -> PathBuf {
    let bin = dir.join("bin/fusion_bench");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_fusion_bench"), &bin).unwrap();
    bin
}

/// Runs the copied binary. Exec can fail with ETXTBSY right after the copy: another test thread
/// that forks a child at that moment holds the copy's write descriptor until the child execs
/// (rust-lang/rust#114554), so that error is retried briefly.
fn run(bin: &Path, cwd: &Path, args: &[&str]) -> Output {
    let mut tries = 0;
    loop {
        let out = Command::new(bin)
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .env_remove("HF_HOME")
            .output();
        match out {
            Err(e) if e.raw_os_error() == Some(26) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[test]
fn an_installed_binary_composes_the_seed_command_lines_from_an_empty_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = installed(tmp.path());
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let repo_config = [root().join("config")];
    let mut composed = 0;
    for line in seed::SEED {
        let mut args = words(line);
        args.extend(["--cfg", "job"]);
        // What the build run from the repository composes (its ./config), in-process.
        let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let from_repo =
            fusion_bench::config::compose_from_args(&owned, &repo_config).and_then(|c| c.to_yaml());
        let anywhere = run(&bin, &empty, &args);
        let log = String::from_utf8_lossy(&anywhere.stderr);
        match from_repo {
            Ok(yaml) => {
                assert!(anywhere.status.success(), "{line}: {log}");
                assert_eq!(yaml, String::from_utf8_lossy(&anywhere.stdout), "{line}");
                assert!(
                    log.contains("config composed tree=<built-in config tree>"),
                    "{line}: {log}"
                );
                composed += 1;
            }
            Err(e) => {
                // A method this build lacks (or the seed's `tsakpool` typo): the same error.
                assert!(!anywhere.status.success(), "{line} composed from the built-in tree only");
                let first = e.to_string().lines().next().unwrap_or("").to_string();
                assert!(log.contains(&first), "{line}: expected `{first}` in {log}");
            }
        }
    }
    // Every dummy, model-pool and data-free-method line composes today (20 of them); the
    // number only grows as method configs land.
    assert!(composed >= 20, "only {composed} of {} seed lines composed", seed::SEED.len());
}

#[test]
fn a_config_folder_in_the_working_directory_and_config_dirs_take_precedence() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = installed(tmp.path());
    // ./config replaces the built-in tree (FusionBench's search order): a copy with one edit.
    let work = tmp.path().join("work");
    copy_tree(&root().join("config"), &work.join("config"));
    let dummy = work.join("config/method/dummy.yaml");
    let text = std::fs::read_to_string(&dummy).unwrap();
    std::fs::write(&dummy, format!("{text}\nmarker_from_cwd: 1\n")).unwrap();
    let out = run(&bin, &work, &["method=dummy", "--cfg", "job", "--package", "method"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("marker_from_cwd: 1"));
    // --config-dir adds a folder after the primary tree: a method only it has composes.
    let extra = tmp.path().join("extra");
    std::fs::create_dir_all(extra.join("method")).unwrap();
    std::fs::write(
        extra.join("method/my_method.yaml"),
        "_target_: fusion_bench.method.DummyAlgorithm\nmy_key: 7\n",
    )
    .unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let dir = extra.display().to_string();
    let out = run(&bin, &empty, &["--config-dir", &dir, "method=my_method", "--cfg", "job"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.contains("my_key: 7") && yaml.contains("modelpool:"), "{yaml}");
}

/// `cp -r src dst` (files as they are, links as links).
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    let ok = Command::new("cp").arg("-r").arg(src).arg(dst).status().unwrap();
    assert!(ok.success(), "cp -r {} {}", src.display(), dst.display());
}

#[test]
fn help_lists_every_flag_and_version_names_the_program() {
    let out = run(Path::new(env!("CARGO_BIN_EXE_fusion_bench")), &root(), &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "-m",
        "--multirun",
        "--serve",
        "--join",
        "--hosts",
        "--rank",
        "--wait",
        "--job-dir",
        "--node-name",
        "--min-workers",
        "--prefetch",
        "--cfg",
        "--config-name",
        "--config-dir",
        "--config-path",
        "--resolve",
        "--package",
        "--version",
    ] {
        let listed = help.lines().any(|l| l.trim_start().split([',', ' ']).any(|w| w == flag));
        assert!(listed, "--help does not list {flag}:\n{help}");
    }
    assert!(help.contains("task_arithmetic") && help.contains("ties_merging"), "{help}");
    let out = run(Path::new(env!("CARGO_BIN_EXE_fusion_bench")), &root(), &["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("fusion_bench (Rust) "));
    // An unknown flag is refused with the list of known ones.
    let out = run(Path::new(env!("CARGO_BIN_EXE_fusion_bench")), &root(), &["--serv", "x"]);
    assert!(!out.status.success());
}

/// `scripts/slurm/binary.sh`: the recipes run this project's binary, never a Python
/// `fusion_bench` that happens to be first on PATH.
#[test]
fn slurm_recipes_pick_this_projects_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("python-bin");
    std::fs::create_dir_all(&fake).unwrap();
    let script = fake.join("fusion_bench");
    std::fs::write(&script, "#!/bin/sh\necho 'fusion_bench 0.2.33 (Python)'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lib = root().join("scripts/slurm/binary.sh");
    let choose = |env: &[(&str, String)]| {
        // The library is read from a copy outside the checkout, as sbatch runs a copy.
        let copy = tmp.path().join("spool/binary.sh");
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(&lib, &copy).unwrap();
        let mut c = Command::new("bash");
        c.arg("-c").arg(format!("source {} && fusion_bench_binary", copy.display()));
        c.env_remove("FUSION_BENCH").env("HOME", tmp.path()).env_remove("CARGO_HOME");
        c.env("PATH", format!("{}:/usr/bin:/bin", fake.display()));
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    // Only the Python one is reachable: refused, with the reason.
    let out = choose(&[("SLURM_SUBMIT_DIR", tmp.path().display().to_string())]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("is not this project's fusion_bench"), "{e}");
    // Submitted from a checkout with a build: that build, ahead of PATH.
    let checkout = tmp.path().join("checkout");
    let ours = checkout.join("target/release/fusion_bench");
    std::fs::create_dir_all(ours.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_fusion_bench"), &ours).unwrap();
    let out = choose(&[("SLURM_SUBMIT_DIR", checkout.display().to_string())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ours.display().to_string());
    // `cargo install` puts it in ~/.cargo/bin.
    let cargo_bin = tmp.path().join(".cargo/bin/fusion_bench");
    std::fs::create_dir_all(cargo_bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_fusion_bench"), &cargo_bin).unwrap();
    let out = choose(&[("SLURM_SUBMIT_DIR", tmp.path().join("nowhere").display().to_string())]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), cargo_bin.display().to_string());
    // FUSION_BENCH is taken as given, and checked.
    let out = choose(&[("FUSION_BENCH", script.display().to_string())]);
    assert!(!out.status.success());
}
