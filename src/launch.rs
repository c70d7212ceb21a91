//! Launch roles: which part of a job this process plays, from its flags or from Slurm.
//!
//! Every process of a job runs the same command line. The role comes from, in order:
//! - `--serve HOST:PORT` (coordinator: hands out work, also computes, writes the report) or
//!   `--join HOST:PORT` (worker);
//! - `--hosts h1:PORT,h2,h3 --rank R`, a launch by hand on a few hosts: rank 0 serves on the
//!   first host's port and waits for the others, which join it;
//! - under `srun` with several tasks, Slurm's variables: rank 0 serves on the first node of the
//!   job at port `20000 + SLURM_JOB_ID % 40000` and waits for the other ranks, which join it;
//! - otherwise the process runs alone.
//!
//! [`Launch::options`] turns a role into the cluster runtime's settings; [`job_id`] names the
//! job, so that a process started with another configuration is refused at the handshake.

use crate::config::ProgramConfig;
use anyhow::{bail, Context, Result};
use fusion_cluster::runtime::ClusterOptions;
use fusion_cluster::slurm::SlurmTask;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The launch flags as given on the command line (values not yet checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchFlags {
    /// `--serve HOST:PORT`.
    pub serve: Option<String>,
    /// `--join HOST:PORT`.
    pub join: Option<String>,
    /// `--min-workers N`.
    pub min_workers: Option<String>,
    /// `--job-dir DIR`.
    pub job_dir: Option<String>,
    /// `--node-name NAME`.
    pub node_name: Option<String>,
    /// `--wait SECONDS`.
    pub wait: Option<String>,
    /// `--hosts h1:PORT,h2,...`.
    pub hosts: Option<String>,
    /// `--rank R`.
    pub rank: Option<String>,
}

/// This process's role in a job and its options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launch {
    /// Coordinate, listening here.
    pub serve: Option<SocketAddr>,
    /// Work for the coordinator at this address.
    pub join: Option<SocketAddr>,
    /// Remote workers the coordinator waits for before handing out work.
    pub min_workers: usize,
    /// The folder of the job's credentials, shared by its processes.
    pub job_dir: Option<PathBuf>,
    /// This worker's name in logs and provenance.
    pub node_name: Option<String>,
    /// `--wait SECONDS`: how long a coordinator waits for `--min-workers`, and a worker for its
    /// coordinator.
    pub wait: Option<Duration>,
}

/// The address a coordinator of this process actually bound (`--serve HOST:0` picks a free
/// port): a later phase of the same run (evaluation after test-time adaptation) listens there
/// again, where the workers already are.
static BOUND: std::sync::Mutex<Option<SocketAddr>> = std::sync::Mutex::new(None);

impl Launch {
    /// Records the address a coordinator of this process bound for `--serve`.
    pub fn remember_bound(addr: SocketAddr) {
        *BOUND.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }

    /// Where this process coordinates: `--serve`, with port 0 replaced by the port an earlier
    /// phase of the run bound ([`Self::remember_bound`]).
    pub fn serve_addr(&self) -> Option<SocketAddr> {
        let serve = self.serve?;
        match *BOUND.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(bound) if serve.port() == 0 || serve.port() == bound.port() => Some(bound),
            _ => Some(serve),
        }
    }

    /// This process alone.
    pub fn local() -> Self {
        Self::default()
    }

    /// The role `flags` ask for; when they name none, the one Slurm gives (`slurm` is asked
    /// only then, so a launch by hand never reads Slurm's variables).
    pub fn from_flags(
        flags: &LaunchFlags,
        slurm: impl FnOnce() -> Result<Option<SlurmTask>>,
    ) -> Result<Self> {
        let serve = flags.serve.as_deref().map(|v| socket_addr("--serve", v)).transpose()?;
        let join = flags.join.as_deref().map(|v| socket_addr("--join", v)).transpose()?;
        if serve.is_some() && join.is_some() {
            bail!("--serve (coordinator) and --join (worker) exclude each other");
        }
        let min_workers = match &flags.min_workers {
            Some(v) => v.parse().with_context(|| format!("--min-workers {v}: not a number"))?,
            None => 0,
        };
        let wait = match &flags.wait {
            Some(v) => Some(Duration::from_secs_f64(
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .with_context(|| format!("--wait {v}: not a number of seconds"))?,
            )),
            None => None,
        };
        let mut l = Launch {
            serve,
            join,
            min_workers,
            job_dir: flags.job_dir.as_ref().map(PathBuf::from),
            node_name: flags.node_name.clone(),
            wait,
        };
        match (&flags.hosts, &flags.rank) {
            (Some(hosts), Some(rank)) => {
                if l.serve.is_some() || l.join.is_some() {
                    bail!("--hosts/--rank choose the role: leave out --serve and --join");
                }
                l.host_roles(hosts, rank)?;
            }
            (None, None) => {
                if l.serve.is_none() && l.join.is_none() {
                    if let Some(task) = slurm()? {
                        l.slurm_roles(&task)?;
                    }
                }
            }
            _ => bail!("--hosts and --rank go together (--hosts h1:7000,h2,h3 --rank 0 on h1, --rank 1 on h2, ...)"),
        }
        Ok(l)
    }

    /// Whether this process is part of a cluster (coordinator or worker).
    pub fn is_distributed(&self) -> bool {
        self.serve.is_some() || self.join.is_some()
    }

    /// This worker's name: `--node-name`, the rank's, or `worker-<pid>`.
    pub fn worker_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| format!("worker-{}", std::process::id()))
    }

    /// `--hosts h1:PORT,h2,h3 --rank R`.
    fn host_roles(&mut self, hosts: &str, rank: &str) -> Result<()> {
        let list: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if list.iter().any(|h| h.is_empty()) {
            bail!("--hosts {hosts}: an empty host in the list");
        }
        let rank: usize = rank.parse().with_context(|| format!("--rank {rank}: not a number"))?;
        if rank >= list.len() {
            bail!("--rank {rank}: the list --hosts {hosts} has {} hosts", list.len());
        }
        let (host, port) = list[0]
            .rsplit_once(':')
            .with_context(|| format!("--hosts {hosts}: the first host needs a port (host:PORT)"))?;
        let port: u16 =
            port.parse().with_context(|| format!("--hosts {hosts}: `{port}` is not a port"))?;
        if rank == 0 {
            self.serve = Some(SocketAddr::from(([0, 0, 0, 0], port)));
            if self.min_workers == 0 {
                self.min_workers = list.len() - 1;
            }
        } else {
            self.join = Some(socket_addr("--hosts", &format!("{host}:{port}"))?);
        }
        if self.node_name.is_none() {
            self.node_name = Some(format!("rank-{rank}"));
        }
        Ok(())
    }

    /// Under `srun` with several tasks: rank 0 serves on the first node at a port derived from
    /// the job id and waits for the other ranks, which join it. One task: alone.
    fn slurm_roles(&mut self, task: &SlurmTask) -> Result<()> {
        if task.world_size < 2 {
            return Ok(());
        }
        let port = task.coordinator_port();
        if task.is_coordinator() {
            self.serve = Some(SocketAddr::from(([0, 0, 0, 0], port)));
            if self.min_workers == 0 {
                self.min_workers = task.world_size - 1;
            }
        } else {
            let host = format!("{}:{port}", task.coordinator_host());
            self.join = Some(socket_addr("the Slurm coordinator", &host)?);
        }
        if self.node_name.is_none() {
            self.node_name = Some(format!("rank-{}", task.rank));
        }
        tracing::info!(
            rank = task.rank,
            of = task.world_size,
            job = task.job_id,
            coordinator = %format!("{}:{port}", task.coordinator_host()),
            "Slurm task"
        );
        Ok(())
    }

    /// The cluster runtime's settings for job `id`: credentials in `--job-dir`, else in
    /// `default_dir`; `FUSION_BENCH_FAST_TIMEOUTS` (tests) shortens the timeouts.
    pub fn options(&self, id: String, default_dir: PathBuf) -> ClusterOptions {
        let dir = self.job_dir.clone().unwrap_or(default_dir);
        let mut o = ClusterOptions::new(id, dir);
        if std::env::var_os("FUSION_BENCH_FAST_TIMEOUTS").is_some() {
            o = o.fast(); // tests: idle 1 s, keep-alive 0.3 s
        }
        o.min_workers = self.min_workers;
        if let Some(w) = self.wait {
            o.wait_for_workers = w;
        }
        o
    }

    /// [`Launch::options`] for a run of `cfg`: job [`job_id`], credentials by default in
    /// `<path.output_dir>/.cluster/<job id>`.
    pub fn options_for(&self, cfg: &ProgramConfig) -> ClusterOptions {
        let id = job_id(cfg);
        let dir = PathBuf::from(cfg.path.output_dir.as_deref().unwrap_or("outputs"))
            .join(".cluster")
            .join(&id);
        self.options(id, dir)
    }
}

/// A stable hash of what a job's processes must agree on: the method, model pool and task pool
/// configs and `fast_dev_run`.
pub fn job_id(cfg: &ProgramConfig) -> String {
    let key = format!("{:?}", (&cfg.method, &cfg.modelpool, &cfg.taskpool, cfg.fast_dev_run));
    crate::report::stable_hash(key.as_bytes())
}

/// `HOST:PORT` → an address, IPv4 first (a coordinator serves on 0.0.0.0).
fn socket_addr(flag: &str, v: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = v
        .to_socket_addrs()
        .with_context(|| format!("{flag} {v}: not a HOST:PORT address"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("{flag} {v}: the host name resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn flags(pairs: &[(&str, &str)]) -> LaunchFlags {
        let mut f = LaunchFlags::default();
        for (k, v) in pairs {
            let v = Some(v.to_string());
            match *k {
                "serve" => f.serve = v,
                "join" => f.join = v,
                "min_workers" => f.min_workers = v,
                "job_dir" => f.job_dir = v,
                "node_name" => f.node_name = v,
                "wait" => f.wait = v,
                "hosts" => f.hosts = v,
                "rank" => f.rank = v,
                _ => panic!("{k}"),
            }
        }
        f
    }

    fn no_slurm() -> Result<Option<SlurmTask>> {
        Ok(None)
    }

    fn slurm(rank: u32, ntasks: u32) -> impl FnOnce() -> Result<Option<SlurmTask>> {
        move || {
            let vars: HashMap<String, String> = [
                ("SLURM_PROCID", rank.to_string()),
                ("SLURM_NTASKS", ntasks.to_string()),
                ("SLURM_NODEID", rank.to_string()),
                ("SLURM_LOCALID", "0".into()),
                ("SLURM_JOB_ID", "4242".into()),
                ("SLURM_JOB_NODELIST", "127.0.0.[1-3]".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            Ok(SlurmTask::from_vars(&vars)?)
        }
    }

    #[test]
    fn serve_and_join_flags() {
        let l = Launch::from_flags(
            &flags(&[("serve", "127.0.0.1:7000"), ("min_workers", "2")]),
            no_slurm,
        )
        .unwrap();
        assert_eq!(l.serve, Some("127.0.0.1:7000".parse().unwrap()));
        assert_eq!((l.join, l.min_workers), (None, 2));
        assert!(l.is_distributed());
        let e = Launch::from_flags(
            &flags(&[("serve", "127.0.0.1:7000"), ("join", "127.0.0.1:7001")]),
            no_slurm,
        )
        .unwrap_err();
        assert!(e.to_string().contains("exclude each other"), "{e}");
        let e = Launch::from_flags(&flags(&[("join", "nowhere")]), no_slurm).unwrap_err();
        assert!(format!("{e:#}").contains("--join nowhere"), "{e:#}");
        let e = Launch::from_flags(&flags(&[("wait", "-1")]), no_slurm).unwrap_err();
        assert!(e.to_string().contains("--wait -1"), "{e}");
        let l = Launch::from_flags(&flags(&[("wait", "2.5")]), no_slurm).unwrap();
        assert_eq!(l.wait, Some(Duration::from_millis(2500)));
        assert!(!l.is_distributed());
    }

    #[test]
    fn hosts_and_rank_choose_the_role() {
        let hosts = "127.0.0.1:7100,127.0.0.2,127.0.0.3";
        let l0 = Launch::from_flags(&flags(&[("hosts", hosts), ("rank", "0")]), no_slurm).unwrap();
        assert_eq!(l0.serve, Some("0.0.0.0:7100".parse().unwrap()));
        assert_eq!((l0.min_workers, l0.node_name.as_deref()), (2, Some("rank-0")));
        let l2 = Launch::from_flags(&flags(&[("hosts", hosts), ("rank", "2")]), no_slurm).unwrap();
        assert_eq!(l2.join, Some("127.0.0.1:7100".parse().unwrap()));
        assert_eq!(l2.worker_name(), "rank-2");
        for (bad, want) in [
            (vec![("hosts", hosts), ("rank", "3")], "has 3 hosts"),
            (vec![("hosts", "a,,b"), ("rank", "0")], "empty host"),
            (vec![("hosts", "127.0.0.1,b"), ("rank", "0")], "needs a port"),
            (vec![("hosts", hosts)], "go together"),
            (vec![("hosts", hosts), ("rank", "1"), ("serve", "127.0.0.1:1")], "leave out"),
        ] {
            let e = Launch::from_flags(&flags(&bad), no_slurm).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{bad:?}: {e:#}");
        }
    }

    #[test]
    fn slurm_gives_the_role_unless_flags_do() {
        let l0 = Launch::from_flags(&LaunchFlags::default(), slurm(0, 3)).unwrap();
        let port = 24_242; // 20000 + job id 4242 % 40000
        assert_eq!(l0.serve, Some(SocketAddr::from(([0, 0, 0, 0], port as u16))));
        assert_eq!((l0.min_workers, l0.node_name.as_deref()), (2, Some("rank-0")));
        let l1 = Launch::from_flags(&LaunchFlags::default(), slurm(1, 3)).unwrap();
        assert_eq!(l1.join, Some(SocketAddr::from(([127, 0, 0, 1], port as u16))));
        assert_eq!(l1.node_name.as_deref(), Some("rank-1"));
        // One task: alone. Flags: Slurm is not asked.
        assert!(!Launch::from_flags(&LaunchFlags::default(), slurm(0, 1))
            .unwrap()
            .is_distributed());
        let asked = std::cell::Cell::new(false);
        let l = Launch::from_flags(&flags(&[("join", "127.0.0.1:9")]), || {
            asked.set(true);
            no_slurm()
        })
        .unwrap();
        assert!(!asked.get() && l.join.is_some());
    }

    #[test]
    fn options_take_the_flags() {
        let l = Launch::from_flags(
            &flags(&[("min_workers", "3"), ("wait", "7"), ("job_dir", "/x/job")]),
            no_slurm,
        )
        .unwrap();
        let o = l.options("id".into(), PathBuf::from("/default"));
        assert_eq!((o.min_workers, o.wait_for_workers), (3, Duration::from_secs(7)));
        assert_eq!(o.job_dir, PathBuf::from("/x/job"));
        let o = Launch::local().options("id".into(), PathBuf::from("/default"));
        assert_eq!(o.job_dir, PathBuf::from("/default"));
    }
}
