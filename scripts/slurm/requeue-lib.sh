# shellcheck shell=bash
# Sourced by the sbatch recipes whose jobs stop early and come back later (sweep.sbatch,
# adamerging.sbatch): the job step runs under traps that pass Slurm's signals on to fusion_bench,
# and the job is requeued when its time limit is near. Needs --requeue and --signal=B:USR2@N.
#   srun_requeueable WHAT ARGS...
#       Runs `srun ARGS...` in the background (so that the traps run while it works; srun passes
#       the signals on to every task) and waits for it, then exits the script. WHAT names the
#       work in the messages ("the sweep").
#         * SIGUSR2 (--signal=B:USR2@N, N s before the time limit; `scancel --signal=USR2 --batch`):
#           passed on; fusion_bench stops at the next safe point, saves its state and exits with
#           status 143; the job is then requeued (`scontrol requeue`, same job id) and the script
#           exits 0. A run that finished anyway (status 0) is done and is not requeued.
#         * SIGTERM (preemption, `scontrol requeue`, `scancel`): passed on; Slurm itself requeues a
#           preempted or requeued job (--requeue), not a cancelled one. The script exits with
#           srun's status.
#       Otherwise the script exits with srun's status.

REQUEUE=0
SRUN=""
REQUEUE_WHAT="the job"
# pass_on SIGNAL: to srun, which passes it on to fusion_bench.
# shellcheck disable=SC2317 # run by the traps below
pass_on() {
    if [[ -n "$SRUN" ]]; then
        kill "-$1" "$SRUN" 2>/dev/null || true
    fi
}
# shellcheck disable=SC2317 # run by the traps below
on_usr2() {
    echo "SIGUSR2 (time limit near): stopping ${REQUEUE_WHAT}, then requeueing job ${SLURM_JOB_ID}"
    REQUEUE=1
    pass_on USR2
}
# shellcheck disable=SC2317 # run by the traps below
on_term() {
    echo "SIGTERM (preempted, requeued or cancelled): stopping ${REQUEUE_WHAT}"
    pass_on TERM
}

srun_requeueable() {
    REQUEUE_WHAT=$1
    shift
    trap on_usr2 USR2
    trap on_term TERM
    srun "$@" &
    SRUN=$!
    local rc=0
    # A trapped signal interrupts `wait`; wait again until srun has really exited.
    while true; do
        wait "$SRUN" && rc=0 || rc=$?
        kill -0 "$SRUN" 2>/dev/null || break
    done
    echo "fusion_bench exited with status $rc"
    # Requeue only if the work stopped early (status 143): work that just finished is done.
    if (( REQUEUE && rc != 0 )); then
        scontrol requeue "${SLURM_JOB_ID}"
        exit 0
    fi
    exit "$rc"
}
