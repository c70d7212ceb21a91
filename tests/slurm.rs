//! A real Slurm on one host (`scripts/slurm/test.sh`, run with this build's `fusion_bench`): three
//! simulated nodes (`slurmd -N n1..n3`); a 3-node `sbatch` evaluation job must write the
//! single-process report byte for byte, and a sweep job preempted after its first cell (by
//! `scontrol requeue`, and by the `USR2` that `--signal=B:USR2@120` sends) must come back, skip the
//! finished cells and complete without computing any cell twice. Installs Slurm from Debian when
//! missing; where it cannot (no root, no apt-get) the script skips, except under `CI=true`, where
//! a skip is a failure. Every daemon it starts is stopped by PID.

use std::path::Path;
use std::process::Command;

#[test]
fn slurm_multinode_job_matches_single_process_and_preempted_sweep_resumes() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/test.sh");
    let out =
        Command::new("bash").arg(&script).arg(env!("CARGO_BIN_EXE_fusion_bench")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed: {}", script.display(), out.status);
    assert!(stdout.contains("PASS") || stdout.contains("SKIP"), "{stdout}");
}
