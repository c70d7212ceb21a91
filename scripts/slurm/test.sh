#!/usr/bin/env bash
# The real fusion_bench under a real Slurm (run as root): a single-host cluster of three simulated
# nodes (scripts/slurm/cluster.sh), then
#   1. a 3-node evaluation job (`sbatch -N 3 --ntasks=3`, waited for, of scripts/slurm/eval-multinode.sbatch:
#      task arithmetic on the bundled fixtures, TA8, batches of 16); its report must equal the
#      single-process report byte for byte;
#   2. preemption of a sweep job (scripts/slurm/sweep.sbatch), three times: on one node by
#      `scontrol requeue` (Slurm's SIGTERM to every process) and by `scancel --signal=USR2 --batch`
#      (what --signal=B:USR2@120 does before the time limit; the script passes it on and requeues
#      itself), and on three nodes (a distributed sweep) by `scontrol requeue`. Each time at least
#      one cell is done first; the job must come back, skip the finished cells and complete:
#      every cell has a report, summary.csv has a row per cell, no cell is computed twice;
#   3. preemption of AdaMerging test-time adaptation (scripts/slurm/adamerging.sbatch, layer-wise
#      on the fixtures, seed 42, checkpointing every 5 steps in path.cache_dir/tta): on one node
#      by `scontrol requeue`, then in the resumed attempt by `scancel --signal=USR2 --batch`, and on
#      three nodes (a distributed adaptation) by `scontrol requeue`, each time once the attempt
#      has done a sixth of the steps. Each attempt must checkpoint at the signal, the next one
#      resume at that step, and the final λ file equal byte for byte the one of an uninterrupted
#      run outside Slurm; then the same for WE-MoE's router training (dense, the same script),
#      whose trained model (method.save_checkpoint) must equal the uninterrupted run's.
# Prints timings (cluster up, 3-node job, time to resume after the requeue, cells recomputed,
# AdaMerging steps done before each preemption).
# The cluster, its daemons (by PID) and the temp folder are removed on exit.
#
# Usage: scripts/slurm/test.sh [path/to/fusion_bench]
# Skips (exit 0, "SKIP: ...") only where Slurm cannot be installed; under CI=true a skip is a
# failure. Settings: FB_SLURM_SWEEP_CELLS (cells per sweep, 40), FB_SLURM_TTA_STEPS (steps of
# the AdaMerging runs, 300), FB_SLURM_PORT_BASE, FB_SLURM_KEEP=1 (keep the temp folder with the
# jobs' logs; the cluster is stopped anyway).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
FB=${1:-target/release/fusion_bench}
CELLS=${FB_SLURM_SWEEP_CELLS:-40}

HARNESS="Slurm test"
# shellcheck source=../harness-lib.sh
source scripts/harness-lib.sh

[[ -x "$FB" ]] || fail "no fusion_bench binary at $FB (cargo build --release)"
[[ $(id -u) -eq 0 ]] || skip "needs root (installs Slurm, starts its daemons)"

TMP=$(mktemp -d /tmp/fb-slurm-test.XXXXXX)
chmod 755 "$TMP"
S="$TMP/cluster"
cleanup() {
    local rc=$?
    scripts/slurm/cluster.sh down "$S" || echo "WARNING: cluster.sh down failed; state in $S"
    if [[ -n "${FB_SLURM_KEEP:-}" ]]; then
        echo "kept $TMP (FB_SLURM_KEEP)"
    elif [[ ! -d "$S" ]]; then
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
# Simulated nodes share this host: one port block per test run.
export FB_SLURM_PORT_BASE=${FB_SLURM_PORT_BASE:-$(( 17000 + ($$ % 400) * 5 ))}
# fusion_bench's coordinator listens on 20000 + job id % 40000: vary the job ids too.
export FB_SLURM_FIRST_JOB_ID=${FB_SLURM_FIRST_JOB_ID:-$(( 1000 + ($$ % 1000) * 30 ))}

T0=$(now)
rc=0
scripts/slurm/cluster.sh up "$S" || rc=$?
[[ $rc -eq 3 ]] && skip "Slurm cannot be installed here (see cluster.sh's message above)"
[[ $rc -eq 0 ]] \
    || fail "the Slurm cluster did not start (rc $rc); logs: $(tail -5 "$S"/log/*.log 2>/dev/null)"
T_UP=$(secs "$T0" "$(now)")
# shellcheck source=/dev/null
source "$S/env.sh"
echo "cluster up in ${T_UP} s: $(sinfo -h -N -o '%N:%T' | tr '\n' ' ')"

# Our own copy of the binary: a rebuild while the test runs cannot swap it under the jobs.
cp "$FB" "$TMP/fusion_bench"
export FUSION_BENCH="$TMP/fusion_bench"
# sbatch passes this environment on to the jobs.
fixture_job "$REPO"
# Jobs are small: one CPU per task, so three tasks fit on three 2-CPU nodes.
SB=(--cpus-per-task=1 --time=15)

# job_field ID NAME: a field of `scontrol show job`.
job_field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }

# wait_job ID: like `sbatch --wait`, polled every 0.1 s (sbatch --wait polls every few seconds).
wait_job() {
    local i
    for (( i = 0; i < 3000; i++ )); do
        [[ "$(job_field "$1" JobState)" =~ ^(PENDING|CONFIGURING|RUNNING|COMPLETING)$ ]] || return 0
        sleep 0.1
    done
    fail "job $1 still $(job_field "$1" JobState) after 300 s"
}

# ---- 1. The one-node recipe and a 3-node evaluation give the single-process report.
# Every run starts in $TMP, so default output folders (outputs/) land there, not in the repo.
(cd "$TMP" && RUST_LOG=warn "$FUSION_BENCH" "${ARGS[@]}" "report_save_path=$TMP/single.json") \
    >"$TMP/single.log" 2>&1 || fail "single-process run: $(tail -20 "$TMP/single.log")"
T0=$(now)
JOB=$(cd "$TMP" && RUST_LOG=info JOB_DIR="$TMP/job" sbatch --parsable "${SB[@]}" \
    -N 3 --ntasks=3 --ntasks-per-node=1 --output="$TMP/multi-%j.out" \
    "$REPO/scripts/slurm/eval-multinode.sbatch" "${ARGS[@]}" "report_save_path=$TMP/multi.json") \
    || fail "sbatch eval-multinode.sbatch failed"
wait_job "$JOB"
T_MULTI=$(secs "$T0" "$(now)")
OUT="$TMP/multi-$JOB.out"
[[ "$(job_field "$JOB" JobState)" == COMPLETED ]] \
    || fail "the 3-node job $JOB: $(scontrol show job "$JOB"); $(tail -30 "$TMP/multi-$JOB.out" 2>/dev/null)"
[[ "$(job_field "$JOB" NodeList)" == "n[1-3]" ]] || fail "job $JOB ran on $(job_field "$JOB" NodeList)"
for r in 0 1 2; do
    grep -q "Slurm task.*rank=$r" "$OUT" || fail "no 'Slurm task' line for rank $r in $OUT: $(cat "$OUT")"
done
cmp "$TMP/single.json" "$TMP/multi.json" \
    || fail "reports differ: $(cat "$TMP/single.json") vs $(cat "$TMP/multi.json")"
grep -q '"computed_twice": 0' "$TMP/multi.json.meta.json" \
    || fail "provenance: $(cat "$TMP/multi.json.meta.json")"
JOB1=$(cd "$TMP" && RUST_LOG=info sbatch --parsable "${SB[@]}" --output="$TMP/one-%j.out" \
    "$REPO/scripts/slurm/eval-1node.sbatch" "${ARGS[@]}" "report_save_path=$TMP/one.json") \
    || fail "sbatch eval-1node.sbatch failed"
wait_job "$JOB1"
[[ "$(job_field "$JOB1" JobState)" == COMPLETED ]] \
    || fail "the one-node job $JOB1: $(tail -30 "$TMP/one-$JOB1.out" 2>/dev/null)"
cmp "$TMP/single.json" "$TMP/one.json" || fail "eval-1node.sbatch's report differs from the single run"
echo "one-node job $JOB1 (eval-1node.sbatch): report equals the single-process one"
echo "3-node job $JOB (n[1-3], one task per node): ${T_MULTI} s from submission to COMPLETED;" \
    "report equals the single-process one"
PROV=$(tr -d '\n ' <"$TMP/multi.json.meta.json" | grep -o '"cluster":{[^}]*}' | head -c 400)
echo "  cluster provenance: $PROV"

# ---- 2. A sweep job preempted after its first cell comes back and completes, computing no cell
# twice.
VALUES=$(awk -v n="$CELLS" 'BEGIN { for (i = 1; i <= n; i++) printf "%s%.2f", (i > 1 ? "," : ""), i * 0.05 }')
# A one-cell sweep outside Slurm first: a binary without sweeps fails here, saying so.
if ! (cd "$TMP" && RUST_LOG=warn "$FUSION_BENCH" -m method=task_arithmetic \
        method.scaling_factor=0.3 "${ARGS[@]:2}" "sweep_dir=$TMP/probe") >"$TMP/probe.log" 2>&1 \
        || [[ ! -f "$TMP/probe/summary.csv" ]]; then
    fail "this fusion_bench cannot sweep (\`-m ... sweep_dir=DIR\`): $(tail -5 "$TMP/probe.log")"
fi

# Job states after which a job will not run again.
ENDED='^(FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE)$'

# cell_snapshot DIR: "cell inode mtime" for every finished cell.
cell_snapshot() {
    local f
    for f in "$1"/cells/*/report.json; do
        [[ -e "$f" ]] && stat -c "$(basename "$(dirname "$f")") %i %Y.%y" "$f"
    done | sort
}

# preempt_sweep MODE NODES: MODE is requeue (`scontrol requeue`) or usr2 (`scancel --signal=USR2
# --batch`); NODES tasks, one per node (a distributed sweep: every rank walks the cells, rank 0
# writes them).
preempt_sweep() {
    local mode=$1 nodes=$2 dir="$TMP/sweep-$1-$2" id i st t_pre t_back n_pre before after out line
    local computed skipped total rows recomputed changed done_lines
    id=$(cd "$TMP" && RUST_LOG=info sbatch --parsable "${SB[@]}" -N "$nodes" --ntasks="$nodes" \
        --ntasks-per-node=1 --output="$TMP/sweep-$mode-$nodes-%j.out" \
        "$REPO/scripts/slurm/sweep.sbatch" -m method=task_arithmetic "method.scaling_factor=$VALUES" \
        "${ARGS[@]:2}" "sweep_dir=$dir") || fail "sbatch sweep.sbatch failed"
    out="$TMP/sweep-$mode-$nodes-$id.out"
    for (( i = 0; i < 1200; i++ )); do
        compgen -G "$dir/cells/*/report.json" >/dev/null && break
        [[ "$(job_field "$id" JobState)" =~ ^(PENDING|RUNNING|CONFIGURING)$ ]] \
            || fail "sweep job $id ended before its first cell: $(job_field "$id" JobState)" \
                "$(tail -20 "$out")"
        sleep 0.1
    done
    compgen -G "$dir/cells/*/report.json" >/dev/null || fail "no cell done within 120 s: $(tail -20 "$out")"
    t_pre=$(now)
    case "$mode" in
        requeue) scontrol requeue "$id" ;;
        usr2) scancel --signal=USR2 --batch "$id" ;;
    esac || fail "could not preempt job $id ($mode); raise FB_SLURM_SWEEP_CELLS if the sweep was done"
    # The first attempt is over once the job is pending again (Slurm holds a requeued job for
    # cred_expire seconds): then the finished cells are exactly what it left behind.
    for (( i = 0; i < 600; i++ )); do
        st=$(job_field "$id" JobState)
        [[ "$st" == PENDING ]] && break
        [[ "$st" == COMPLETED ]] && fail "sweep job $id completed instead of being requeued" \
            "($mode); raise FB_SLURM_SWEEP_CELLS: $(tail -20 "$out")"
        [[ "$st" =~ $ENDED ]] && fail "sweep job $id: $st after $mode: $(tail -30 "$out")"
        sleep 0.1
    done
    [[ "$st" == PENDING ]] || fail "sweep job $id was not requeued within 60 s ($mode): state $st"
    before=$(cell_snapshot "$dir")
    n_pre=$(printf '%s\n' "$before" | grep -c . || true)
    (( n_pre < CELLS )) \
        || fail "all $CELLS cells were done before the preemption landed; raise FB_SLURM_SWEEP_CELLS"
    t_back=""
    for (( i = 0; i < 3000; i++ )); do
        [[ -z "$t_back" ]] && grep -q "attempt 2" "$out" 2>/dev/null && t_back=$(now)
        st=$(job_field "$id" JobState)
        [[ "$st" == COMPLETED ]] && break
        [[ "$st" =~ $ENDED ]] && fail "sweep job $id: $st after resuming: $(tail -30 "$out")"
        sleep 0.1
    done
    [[ "$st" == COMPLETED ]] \
        || fail "sweep job $id did not complete within 300 s after $mode: $st $(tail -20 "$out")"
    [[ -n "$t_back" ]] || t_back=$(now)
    [[ "$(job_field "$id" Restarts)" == 1 ]] || fail "job $id restarted $(job_field "$id" Restarts) times"
    [[ "$(job_field "$id" ExitCode)" == 0:0 ]] || fail "job $id exit code $(job_field "$id" ExitCode)"

    after=$(cell_snapshot "$dir")
    total=$(printf '%s\n' "$after" | grep -c . || true)
    [[ "$total" -eq "$CELLS" ]] || fail "$total of $CELLS cells have a report"
    [[ -f "$dir/summary.csv" ]] || fail "no $dir/summary.csv"
    rows=$(grep -c . "$dir/summary.csv" || true)
    (( rows == CELLS || rows == CELLS + 1 )) || fail "summary.csv has $rows lines for $CELLS cells"
    # A cell finished before the preemption must not have been written again.
    changed=$(comm -23 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | grep -c . || true)
    line=$(grep "sweep done cells=" "$out" | tail -1)
    [[ -n "$line" ]] || fail "no 'sweep done' line in $out"
    computed=$(sed -n 's/.*computed=\([0-9]*\).*/\1/p' <<<"$line")
    skipped=$(sed -n 's/.*skipped=\([0-9]*\).*/\1/p' <<<"$line")
    [[ "$line" == *"cells=$CELLS"* ]] || fail "'$line': expected cells=$CELLS"
    [[ "$skipped" == "$n_pre" ]] || fail "the resumed run skipped $skipped cells, $n_pre were done: $line"
    recomputed=$(( changed + computed - (CELLS - n_pre) ))
    [[ "$changed" -eq 0 && "$recomputed" -eq 0 ]] \
        || fail "$recomputed cells computed twice ($changed reports rewritten): $line"
    # Where the binary logs a line per finished cell, there must be exactly one per cell.
    done_lines=$(grep -c "cell done" "$out" || true)
    [[ "$done_lines" -eq 0 || "$done_lines" -eq "$CELLS" ]] \
        || fail "$done_lines 'cell done' lines for $CELLS cells in $out"
    echo "sweep job $id ($nodes node(s)) preempted by $mode after $n_pre of $CELLS cells:" \
        "back (attempt 2 started) $(secs "$t_pre" "$t_back") s later," \
        "completed $(secs "$t_pre" "$(now)") s after the preemption; cells recomputed: $recomputed;" \
        "'${line##*INFO }'"
}
preempt_sweep requeue 1
preempt_sweep usr2 1
preempt_sweep requeue 3

# ---- 3. Test-time adaptations preempted in the middle resume from their checkpoint
# (path.cache_dir/tta) and end at the result of an uninterrupted run, byte for byte: AdaMerging's
# λ file, then WE-MoE's trained model (method.save_checkpoint).
TTA_STEPS=${FB_SLURM_TTA_STEPS:-300}
# tta_kind adamerging|wemoe: which adaptation the runs below make: its name in messages
# (TTA_NAME), its checkpoint's file name under path.cache_dir/tta (TTA_GLOB), the line it logs
# when it resumes (RESUMING) and its result under the run's folder (TTA_RESULT).
tta_kind() {
    TTA_KIND=$1
    case $1 in
        adamerging)
            TTA_NAME=AdaMerging TTA_GLOB="adamerging-*.json" TTA_RESULT=logs/merging_weights.pt
            RESUMING="resuming test-time adaptation from its checkpoint" ;;
        wemoe)
            TTA_NAME=WE-MoE TTA_GLOB="wemoe-*.safetensors" TTA_RESULT=wemoe.ckpt
            RESUMING="resuming the router training from its checkpoint" ;;
        *) fail "tta_kind: unknown kind $1" ;;
    esac
}
# tta_args DIR: sets TTA to the run on the fixtures (AdaMerging layer-wise; WE-MoE dense),
# checkpointing every 5 steps in DIR/cache/tta, its result in DIR/$TTA_RESULT (one file name for
# every run: torch's archive inside the file is named after it).
tta_args() {
    TTA=(modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=dummy
         fabric.accelerator=cpu print_config=false seed=42 "method.max_steps=$TTA_STEPS"
         +method.checkpoint_every_steps=5 "path.cache_dir=$1/cache" "path.log_dir=$1/logs")
    case $TTA_KIND in
        adamerging) TTA+=(method=adamerging/clip method.name=clip_layer_wise_adamerging
                          method.save_merging_weights=merging_weights.pt) ;;
        wemoe) TTA+=(method=wemoe/weight_ensembling_moe method.name=clip_weight_ensembling_moe
                     method.use_grad_accumulate=false "method.save_checkpoint=$1/wemoe.ckpt") ;;
    esac
}
# tta_step DIR: the step of the checkpoint in DIR/cache/tta; empty while there is none. The
# step is the first "step" key of its JSON (AdaMerging's file; WE-MoE's safetensors header
# holds it as an escaped JSON string).
tta_step() {
    local f
    for f in "$1"/cache/tta/$TTA_GLOB; do
        [[ -f "$f" ]] || continue
        { head -c 65536 "$f" | grep -ao '\\\?"step\\\?":[0-9]*' || true; } | sed -n '1s/.*://p'
        return 0
    done
    return 0
}
# nth_step PATTERN N FILE: step=S of the Nth line of FILE matching PATTERN; empty if none.
nth_step() { { grep "$1" "$3" 2>/dev/null || true; } | sed -n "$2s/.* step=\([0-9]*\).*/\1/p"; }
STOPPED="signal received: checkpointed"

# tta_reference: the uninterrupted run outside Slurm, its result in TTA_REF.
tta_reference() {
    local dir="$TMP/tta-ref-$TTA_KIND" t0
    tta_args "$dir"
    t0=$(now)
    (cd "$TMP" && RUST_LOG=warn "$FUSION_BENCH" "${TTA[@]}") >"$dir.log" 2>&1 \
        || fail "single-process $TTA_NAME run: $(tail -20 "$dir.log")"
    TTA_REF="$dir/$TTA_RESULT"
    [[ -s "$TTA_REF" ]] \
        || fail "the single-process $TTA_NAME run wrote no $TTA_REF: $(tail -5 "$dir.log")"
    [[ "$(tta_step "$dir")" == "$TTA_STEPS" ]] \
        || fail "the single-process $TTA_NAME run's checkpoint is at step '$(tta_step "$dir")'," \
            "not $TTA_STEPS (no checkpoint in $dir/cache/tta?)"
    echo "$TTA_NAME outside Slurm ($TTA_STEPS steps, checkpoint every 5): $(secs "$t0" "$(now)") s"
}

# Each attempt is preempted once it has checkpointed at least this many steps of its own.
TTA_GAP=$(( TTA_STEPS / 6 > 5 ? TTA_STEPS / 6 : 5 ))
# preempt_tta NODES MODE...: an adamerging.sbatch job (of the kind tta_kind set) on NODES nodes, one task each (several: a
# distributed adaptation, rank 0 running the loop), preempted once per MODE: requeue (`scontrol
# requeue`) or usr2 (`scancel --signal=USR2 --batch`), each time once the running attempt has
# checkpointed TTA_GAP steps past where the one before stopped. Every attempt after the first
# must resume at the step the one before checkpointed when signalled, and the final λ must be
# the reference's.
preempt_tta() {
    local nodes=$1 dir="$TMP/tta-$TTA_KIND-$1" id out mode st s i k=0 last=0 t0 t_pre t_back sig res r
    local done_line msg report=()
    shift
    tta_args "$dir"
    t0=$(now)
    id=$(cd "$TMP" && RUST_LOG=info sbatch --parsable "${SB[@]}" -N "$nodes" --ntasks="$nodes" \
        --ntasks-per-node=1 --output="$TMP/tta-$TTA_KIND-$nodes-%j.out" \
        "$REPO/scripts/slurm/adamerging.sbatch" "${TTA[@]}") || fail "sbatch adamerging.sbatch failed"
    out="$TMP/tta-$TTA_KIND-$nodes-$id.out"
    for mode in "$@"; do
        k=$(( k + 1 ))
        # Attempt k has done steps of its own once the checkpoint is past where k-1 stopped.
        for (( i = 0; i < 1200; i++ )); do
            s=$(tta_step "$dir")
            [[ -n "$s" ]] && (( s >= last + TTA_GAP )) && break
            st=$(job_field "$id" JobState)
            [[ "$st" =~ ^(PENDING|RUNNING|CONFIGURING)$ ]] \
                || fail "$TTA_NAME job $id: $st before attempt $k checkpointed: $(tail -20 "$out")"
            sleep 0.1
        done
        [[ -n "$s" && "$s" -ge $(( last + TTA_GAP )) ]] || fail "attempt $k of $TTA_NAME job $id" \
            "did not checkpoint step $(( last + TTA_GAP )) within 120 s (at '$s'): $(tail -20 "$out")"
        (( s < TTA_STEPS )) \
            || fail "$TTA_NAME job $id finished before its preemption ($mode); raise FB_SLURM_TTA_STEPS"
        t_pre=$(now)
        case "$mode" in
            requeue) scontrol requeue "$id" ;;
            usr2) scancel --signal=USR2 --batch "$id" ;;
        esac || fail "could not preempt $TTA_NAME job $id ($mode)"
        # The attempt is over once the job is pending again: its checkpoint is where the next
        # attempt must resume.
        for (( i = 0; i < 600; i++ )); do
            st=$(job_field "$id" JobState)
            [[ "$st" == PENDING ]] && break
            [[ "$st" == COMPLETED ]] && fail "$TTA_NAME job $id completed instead of being" \
                "requeued ($mode); raise FB_SLURM_TTA_STEPS: $(tail -20 "$out")"
            [[ "$st" =~ $ENDED ]] && fail "$TTA_NAME job $id: $st after $mode: $(tail -30 "$out")"
            sleep 0.1
        done
        [[ "$st" == PENDING ]] || fail "$TTA_NAME job $id was not requeued within 60 s ($mode): state $st"
        last=$(tta_step "$dir")
        sig=$(nth_step "$STOPPED" "$k" "$out")
        [[ "$sig" == "$last" ]] || fail "attempt $k of $TTA_NAME job $id, stopped by $mode: expected" \
            "'$STOPPED ... step=$last' (the checkpoint it left), found '${sig:-no such line}':" \
            "$(grep -v ' round ' "$out" | tail -20)"
        (( last < TTA_STEPS )) || fail "$TTA_NAME job $id had done all $TTA_STEPS steps when $mode landed"
        # Back: the next attempt has read the checkpoint.
        t_back=""
        for (( i = 0; i < 1200; i++ )); do
            [[ -n "$(nth_step "$RESUMING" "$k" "$out")" ]] && { t_back=$(now); break; }
            st=$(job_field "$id" JobState)
            [[ "$st" =~ $ENDED || "$st" == COMPLETED ]] \
                && fail "$TTA_NAME job $id: $st before resuming after $mode: $(tail -30 "$out")"
            sleep 0.1
        done
        [[ -n "$t_back" ]] \
            || fail "$TTA_NAME job $id did not resume within 120 s after $mode: $(grep -v ' round ' "$out" | tail -20)"
        res=$(nth_step "$RESUMING" "$k" "$out")
        [[ "$res" == "$last" ]] \
            || fail "attempt $(( k + 1 )) of $TTA_NAME job $id resumed at step $res, the checkpoint was at $last"
        report+=("$mode at step $last, resumed $(secs "$t_pre" "$t_back") s later")
    done
    wait_job "$id"
    st=$(job_field "$id" JobState)
    [[ "$st" == COMPLETED ]] || fail "$TTA_NAME job $id: $st: $(grep -v ' round ' "$out" | tail -30)"
    [[ "$(job_field "$id" Restarts)" == "$k" ]] \
        || fail "$TTA_NAME job $id restarted $(job_field "$id" Restarts) times, not $k"
    [[ "$(job_field "$id" ExitCode)" == 0:0 ]] || fail "job $id exit code $(job_field "$id" ExitCode)"
    [[ "$(grep -c "$RESUMING" "$out" || true)" -eq "$k" ]] \
        || fail "$TTA_NAME job $id: $(grep -c "$RESUMING" "$out" || true) resumptions for $k preemptions"
    [[ "$(tta_step "$dir")" == "$TTA_STEPS" ]] \
        || fail "$TTA_NAME job $id ended with its checkpoint at step $(tta_step "$dir"), not $TTA_STEPS"
    [[ -s "$dir/$TTA_RESULT" ]] \
        || fail "$TTA_NAME job $id wrote no $dir/$TTA_RESULT: $(grep -v ' round ' "$out" | tail -20)"
    cmp "$TTA_REF" "$dir/$TTA_RESULT" \
        || fail "$TTA_NAME job $id ($nodes node(s), preempted: ${report[*]}): its result differs from the" \
            "uninterrupted run's ($TTA_REF vs $dir/$TTA_RESULT)"
    done_line=$(grep "test-time adaptation done" "$out" | tail -1)
    if (( nodes > 1 )); then
        [[ "$(job_field "$id" NodeList)" == "n[1-$nodes]" ]] \
            || fail "$TTA_NAME job $id ran on $(job_field "$id" NodeList)"
        for (( r = 0; r < nodes; r++ )); do
            grep -q "Slurm task.*rank=$r" "$out" || fail "no 'Slurm task' line for rank $r in $out"
        done
        # The last attempt's steps went to the other ranks too.
        for (( r = 1; r < nodes; r++ )); do
            [[ "$done_line" == *"rank-$r"* ]] \
                || fail "rank $r did no step of $TTA_NAME job $id's last attempt: '$done_line'"
        done
    fi
    msg=$(printf '%s; ' "${report[@]}")
    echo "$TTA_NAME job $id ($nodes node(s), $nodes task(s)): preempted by ${msg%; };" \
        "completed $(secs "$t0" "$(now)") s after submission; $TTA_RESULT equals the" \
        "uninterrupted run's byte for byte; '${done_line##*INFO }'"
}
tta_kind adamerging
tta_reference
preempt_tta 1 requeue usr2
preempt_tta 3 requeue
tta_kind wemoe
tta_reference
preempt_tta 1 requeue usr2
preempt_tta 3 requeue
echo "PASS: Slurm: the 3-node report equals the single-process report; preempted sweeps resume" \
    "without recomputing finished cells; preempted AdaMerging and WE-MoE jobs (1 and 3 nodes)" \
    "resume from their checkpoint to the uninterrupted result byte for byte (cluster up ${T_UP} s, 3-node job" \
    "${T_MULTI} s)"
