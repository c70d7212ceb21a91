//! A real Slurm on one host (`scripts/slurm/test.sh`, run with this build's `fusion_bench`): three
//! simulated nodes (`slurmd -N n1..n3`). A 3-node `sbatch` evaluation job must write the
//! single-process report byte for byte; a sweep job preempted after its first cell (by
//! `scontrol requeue`, and by the `USR2` that `--signal=B:USR2@120` sends) must come back, skip the
//! finished cells and complete without computing any cell twice; and AdaMerging jobs
//! (`scripts/slurm/adamerging.sbatch`, on one node and on three) preempted in the middle of the
//! test-time adaptation, by `scontrol requeue` and by that `USR2`, must resume from their
//! checkpoint in `path.cache_dir/tta` at the step where they stopped and end at the λ file of an
//! uninterrupted run outside Slurm, byte for byte; WE-MoE jobs the same, to the uninterrupted
//! run's trained model (`method.save_checkpoint`). Installs Slurm from Debian when missing; where
//! it cannot (no root, no apt-get) the script skips, except under `CI=true`, where a skip is a
//! failure. Every daemon it starts is stopped by PID.

mod common;

#[test]
fn slurm_multinode_job_matches_single_process_and_preempted_sweep_resumes() {
    common::run_harness("slurm/test.sh");
}
