//! A worker or coordinator child process of the actor-runtime tests (`tests/runtime.rs` starts
//! it; not a tool), computing the toy items of `tests/support/runtime.rs`:
//! - `test_runtime_node worker <addr> <job dir> <name> <sleep ms> [<marker file> <after>]` joins
//!   the coordinator at `addr` and executes items (sleeping `sleep ms` in each, touching the
//!   marker file when it starts its `after`-th item); exits non-zero (panics) if its run fails;
//! - `test_runtime_node coordinator <job dir> <items>` prints `LISTENING <addr>` and runs its
//!   items on whoever joins;
//! - `test_runtime_node stepper <addr> <job dir> <name> <sleep ms> [<marker> <round> <after>]`
//!   joins a job with rounds (`tests/rounds.rs`) and executes its step items, touching the
//!   marker file and hanging (to be killed) on its `after`-th item of round `round`.

#[path = "../tests/support/runtime.rs"]
mod runtime;

use std::path::{Path, PathBuf};

use fusion_cluster::runtime::{run_coordinator, run_worker};
use runtime::{items, loopback, opts, stepper, toy};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args[..] {
        ["worker", addr, dir, name, sleep_ms, ref marker @ ..] => {
            let mut exec = toy(sleep_ms.parse().unwrap());
            if let [path, after] = marker {
                exec.marker = Some((PathBuf::from(path), after.parse().unwrap()));
            }
            let summary =
                run_worker(addr.parse().unwrap(), name, Box::new(exec), &opts(Path::new(dir)))
                    .unwrap();
            println!("worker {name} executed {}", summary.executed);
        }
        ["stepper", addr, dir, name, sleep_ms, ref hang @ ..] => {
            let mut exec = stepper(sleep_ms.parse().unwrap());
            if let [path, round, after] = hang {
                let at = (PathBuf::from(path), round.parse().unwrap(), after.parse().unwrap());
                exec.hang = Some(at);
            }
            let summary =
                run_worker(addr.parse().unwrap(), name, Box::new(exec), &opts(Path::new(dir)))
                    .unwrap();
            println!("stepper {name} executed {}", summary.executed);
        }
        ["coordinator", dir, n] => {
            let o = opts(Path::new(dir));
            let _ = run_coordinator(items(n.parse().unwrap()), None, loopback(), &o, |addr| {
                println!("LISTENING {addr}");
            });
        }
        _ => panic!(
            "usage: test_runtime_node worker <addr> <job dir> <name> <sleep ms> [<marker> <after>] \
             | coordinator <job dir> <items> | stepper <addr> <job dir> <name> <sleep ms> \
             [<marker> <round> <after>]; got {args:?}"
        ),
    }
}
