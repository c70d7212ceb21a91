//! A real Slurm on one host (`scripts/slurm/test.sh`, run with this build's `fusion_bench`): three
//! simulated nodes (`slurmd -N n1..n3`); a 3-node `sbatch` evaluation job must write the
//! single-process report byte for byte, and a sweep job preempted after its first cell (by
//! `scontrol requeue`, and by the `USR2` that `--signal=B:USR2@120` sends) must come back, skip the
//! finished cells and complete without computing any cell twice. Installs Slurm from Debian when
//! missing; where it cannot (no root, no apt-get) the script skips, except under `CI=true`, where
//! a skip is a failure. Every daemon it starts is stopped by PID.

mod common;

#[test]
fn slurm_multinode_job_matches_single_process_and_preempted_sweep_resumes() {
    common::run_harness("slurm/test.sh");
}
