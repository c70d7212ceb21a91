//! Distributed evaluation and WE-MoE router training across network namespaces with a worker's
//! link (or the workers' link to each other) cut mid-run (`scripts/netns-eval.sh`,
//! `scripts/netns-wemoe.sh`, run with this build's `fusion_bench`): the coordinator's report (and
//! trained model) must equal the single-process one byte for byte. Needs root and `ip netns`;
//! without them the script skips, except under `CI=true`, where a skip is a failure (of the
//! script, and of this test).

mod common;

#[test]
fn link_cut_during_distributed_evaluation_keeps_the_report() {
    common::run_harness("netns-eval.sh");
}

/// WE-MoE's router training with its gradients going round a ring of three processes in three
/// namespaces (`scripts/netns-wemoe.sh`): a worker's link cut mid-training breaks the ring; the
/// step runs again on a ring of the two left, and the trained model and report are the single
/// process's, byte for byte. Then the workers lose each other mid-training (the hub stops
/// forwarding) while both keep their coordinator link: the gradients go through the
/// coordinator, with the same bytes again.
#[test]
fn link_cut_during_ring_router_training_keeps_the_model() {
    common::run_harness("netns-wemoe.sh");
}

/// The skip chain itself: `harness-lib.sh`'s `skip` exits 0 with `SKIP:` outside CI and fails
/// under `CI=true`, and the Rust side refuses a `SKIP` (or no `PASS`) under CI.
#[test]
fn a_harness_skip_is_a_failure_under_ci() {
    let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/harness-lib.sh");
    let skip = |ci: Option<&str>| {
        let mut c = std::process::Command::new("bash");
        c.arg("-c").arg(format!("source '{}'; skip 'no root here'", lib.display()));
        c.env_remove("CI");
        if let Some(v) = ci {
            c.env("CI", v);
        }
        let out = c.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = skip(None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("SKIP: "), "{out}");
    let (code, out) = skip(Some("true"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("FAIL: ") && out.contains("no root here"), "{out}");

    common::assert_harness_verdict("PASS: the report is the same", true);
    common::assert_harness_verdict("SKIP: netns: needs root", false);
    let fails = |out: &'static str, ci: bool| {
        std::panic::catch_unwind(|| common::assert_harness_verdict(out, ci)).is_err()
    };
    assert!(fails("SKIP: netns: needs root", true));
    assert!(fails("PASS: one\nSKIP: another", true));
    assert!(fails("done", false));
    assert!(fails("done", true));
}
