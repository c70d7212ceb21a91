//! Device choice: FusionBench's `fabric.accelerator` / `fabric.devices`, and which GPU this process
//! binds (`SLURM_LOCALID`, `LOCAL_RANK`, `CUDA_VISIBLE_DEVICES`; see
//! [`fusion_cluster::placement`]). CPU when no GPU is present and none was demanded.
//!
//! `fabric.devices` is Lightning's: `N` devices, `auto` or `-1` for every visible GPU (one on
//! the CPU), or a list of GPU indices. This process runs one worker per device ([`select_all`]),
//! unless a launcher started several processes on this node (Slurm tasks, torchrun): then
//! `devices` counts the node's devices, as in Lightning, and each process takes the one GPU of
//! its local rank. On the CPU, `N` workers share the intra-op threads ([`cpu_thread_shares`]).

use fusion_cluster::placement::Placement;
use tch::Device;

/// Errors choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `fabric.accelerator` has a value we do not know.
    #[error("fabric.accelerator: unknown value `{0}` (expected auto, cpu, gpu or cuda)")]
    UnknownAccelerator(String),
    /// CUDA was demanded but libtorch sees no GPU.
    #[error("fabric.accelerator={0} but libtorch sees no CUDA device (CUDA_VISIBLE_DEVICES={1:?}); use fabric.accelerator=cpu, or check LD_LIBRARY_PATH names a CUDA build of torch 2.11's lib folder")]
    NoCuda(String, Option<String>),
    /// `fabric.devices` has a value we cannot read.
    #[error(
        "fabric.devices: `{0}` is not a number of devices, `auto`, -1 or a list of GPU indices"
    )]
    BadDevices(String),
    /// More GPUs asked for than there are, or an index out of range.
    #[error("fabric.devices={asked} but libtorch sees {count} GPU(s) (CUDA_VISIBLE_DEVICES={visible:?})")]
    TooFewGpus {
        /// The setting as written.
        asked: String,
        /// GPUs visible to libtorch.
        count: usize,
        /// `CUDA_VISIBLE_DEVICES`.
        visible: Option<String>,
    },
    /// GPU indices asked for on the CPU.
    #[error("fabric.devices={0} names GPUs, but this run is on the CPU (fabric.accelerator=cpu, or no GPU); give a number of CPU workers instead")]
    GpuListOnCpu(String),
}

/// What `fabric.devices` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// This many devices (GPUs 0..N, or N CPU workers).
    Count(usize),
    /// `auto` or `-1`: every visible GPU (one CPU worker on the CPU).
    All,
    /// These GPU indices (a list, or a string like `"0,2"`).
    Indices(Vec<usize>),
}

impl Default for Devices {
    fn default() -> Self {
        Devices::Count(1)
    }
}

impl std::fmt::Display for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Devices::Count(n) => write!(f, "{n}"),
            Devices::All => write!(f, "auto"),
            Devices::Indices(v) => {
                write!(f, "[{}]", v.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","))
            }
        }
    }
}

impl Devices {
    /// Reads the config's `fabric.devices` node (absent or null: one device).
    pub fn from_node(node: &crate::config::Node) -> Result<Self, DeviceError> {
        use crate::config::Node;
        let bad = || DeviceError::BadDevices(node.to_yaml_string().trim().to_string());
        match node {
            Node::Null => Ok(Devices::Count(1)),
            Node::Int(-1) => Ok(Devices::All),
            Node::Int(n) if *n > 0 => Ok(Devices::Count(*n as usize)),
            Node::List(l) => {
                let v = l
                    .iter()
                    .map(|n| match n {
                        Node::Int(i) if *i >= 0 => Ok(*i as usize),
                        _ => Err(bad()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if v.is_empty() {
                    return Err(bad());
                }
                Ok(Devices::Indices(v))
            }
            Node::Str(s) => Self::parse_str(s).ok_or_else(bad),
            _ => Err(bad()),
        }
    }

    /// Lightning's string forms: `auto`, `-1`, `"3"` (a count), `"0,2"` or `"1,"` (indices).
    fn parse_str(s: &str) -> Option<Self> {
        let s = s.trim();
        match s {
            "auto" | "-1" => return Some(Devices::All),
            _ => {}
        }
        if !s.contains(',') {
            return s.parse::<usize>().ok().filter(|n| *n > 0).map(Devices::Count);
        }
        let v: Option<Vec<usize>> =
            s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(|p| p.parse().ok()).collect();
        v.filter(|v| !v.is_empty()).map(Devices::Indices)
    }
}

/// What `fabric.accelerator` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// CUDA when available, else CPU (FusionBench's default `auto`).
    Auto,
    /// Always the CPU.
    Cpu,
    /// A CUDA GPU; an error when there is none.
    Cuda,
}

impl std::str::FromStr for Accelerator {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "gpu" | "cuda" => Ok(Self::Cuda),
            other => Err(DeviceError::UnknownAccelerator(other.to_string())),
        }
    }
}

/// The device this process computes on, given the accelerator setting, the launcher's placement
/// and how many CUDA devices libtorch reports.
pub fn choose(
    accelerator: Accelerator,
    placement: &Placement,
    cuda_count: usize,
) -> Result<Device, DeviceError> {
    match (accelerator, placement.gpu_index(cuda_count)) {
        (Accelerator::Cpu, _) | (Accelerator::Auto, None) => Ok(Device::Cpu),
        (_, Some(i)) => Ok(Device::Cuda(i)),
        (Accelerator::Cuda, None) => Err(DeviceError::NoCuda(
            "cuda".into(),
            placement.visible_devices.as_ref().map(|v| v.join(",")),
        )),
    }
}

/// The devices this process runs one worker each on: `devices` of `accelerator`, given the
/// launcher's placement and libtorch's CUDA device count (see the module doc).
pub fn choose_all(
    accelerator: Accelerator,
    devices: &Devices,
    placement: &Placement,
    cuda_count: usize,
) -> Result<Vec<Device>, DeviceError> {
    let cpu = match (accelerator, placement.gpu_index(cuda_count)) {
        (Accelerator::Cpu, _) | (Accelerator::Auto, None) => true,
        (Accelerator::Cuda, None) => {
            return Err(DeviceError::NoCuda(
                "cuda".into(),
                placement.visible_devices.as_ref().map(|v| v.join(",")),
            ))
        }
        _ => false,
    };
    if cpu {
        return match devices {
            Devices::Count(n) => Ok(vec![Device::Cpu; (*n).max(1)]),
            Devices::All => Ok(vec![Device::Cpu]),
            Devices::Indices(_) => Err(DeviceError::GpuListOnCpu(devices.to_string())),
        };
    }
    if placement.local_world_size.is_some_and(|n| n > 1) {
        // The launcher placed one process per device: this one takes its local rank's GPU.
        return Ok(vec![choose(accelerator, placement, cuda_count)?]);
    }
    let too_few = || DeviceError::TooFewGpus {
        asked: devices.to_string(),
        count: cuda_count,
        visible: placement.visible_devices.as_ref().map(|v| v.join(",")),
    };
    let indices: Vec<usize> = match devices {
        Devices::Count(n) if *n <= cuda_count => (0..*n).collect(),
        Devices::Count(_) => return Err(too_few()),
        Devices::All => (0..cuda_count).collect(),
        Devices::Indices(v) if v.iter().all(|&i| i < cuda_count) => v.clone(),
        Devices::Indices(_) => return Err(too_few()),
    };
    Ok(indices.into_iter().map(Device::Cuda).collect())
}

/// Runs `f` on one intra-op thread, then restores this thread's setting.
///
/// For the few CPU steps whose float32 results depend on libtorch's intra-op thread count:
/// measured here (torch 2.11, 1 vs 2 threads), the text tower's masked
/// `scaled_dot_product_attention` (zero-shot heads, up to 2.7e-7 apart) and the loss over the
/// transposed logits (`log_softmax` along a strided dimension; 1 ulp apart), in FusionBench as
/// in ours. Run on one thread, they give FusionBench's one-thread numbers on any machine and with
/// any thread count, so a report does not depend on how many threads, workers or processes
/// computed it. They are cheap; the vision forward, which is thread-invariant, keeps every
/// thread.
pub fn single_threaded<T>(f: impl FnOnce() -> T) -> T {
    let before = tch::get_num_threads();
    tch::set_num_threads(1);
    let out = f();
    tch::set_num_threads(before.max(1));
    out
}

/// The intra-op threads of each of `workers` CPU workers sharing `threads`: as even as
/// possible, the first ones taking the remainder, at least one each.
pub fn cpu_thread_shares(threads: usize, workers: usize) -> Vec<usize> {
    let workers = workers.max(1);
    (0..workers).map(|i| (threads / workers + usize::from(i < threads % workers)).max(1)).collect()
}

/// [`choose_all`] with this process's environment and libtorch's device count.
pub fn select_all(accelerator: Accelerator, devices: &Devices) -> Result<Vec<Device>, DeviceError> {
    let count =
        if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
    let chosen = choose_all(accelerator, devices, &Placement::from_env(), count)?;
    tracing::info!(devices = ?chosen, asked = %devices, cuda_devices = count, "devices selected");
    Ok(chosen)
}

/// This process's resident memory in MiB as `(anonymous, file-backed)` (Linux's
/// `/proc/self/status`; `None` elsewhere): what the memory figures of the logs and benchmarks
/// report, mapped checkpoints counted apart from the memory the process owns.
pub fn resident_mib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some((field("RssAnon:")? / 1024, field("RssFile:")? / 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerator_and_placement_decide() {
        let rank2 = Placement { local_rank: Some(2), ..Default::default() };
        assert_eq!(choose(Accelerator::Auto, &rank2, 0).unwrap(), Device::Cpu);
        assert_eq!(choose(Accelerator::Auto, &rank2, 4).unwrap(), Device::Cuda(2));
        assert_eq!(choose(Accelerator::Cpu, &rank2, 4).unwrap(), Device::Cpu);
        assert!(choose(Accelerator::Cuda, &rank2, 0).is_err());
        assert_eq!("GPU".parse::<Accelerator>().unwrap(), Accelerator::Cuda);
        assert!("tpu".parse::<Accelerator>().is_err());
    }

    #[test]
    fn devices_read_as_lightning_reads_them() {
        use crate::config::Node;
        let read = |n: Node| Devices::from_node(&n);
        assert_eq!(read(Node::Int(2)).unwrap(), Devices::Count(2));
        assert_eq!(read(Node::Int(-1)).unwrap(), Devices::All);
        assert_eq!(read(Node::Str("auto".into())).unwrap(), Devices::All);
        assert_eq!(read(Node::Str("3".into())).unwrap(), Devices::Count(3));
        assert_eq!(read(Node::Str("1,".into())).unwrap(), Devices::Indices(vec![1]));
        assert_eq!(
            read(Node::List(vec![Node::Int(0), Node::Int(2)])).unwrap(),
            Devices::Indices(vec![0, 2])
        );
        assert_eq!(read(Node::Null).unwrap(), Devices::Count(1));
        for bad in [Node::Int(0), Node::Int(-2), Node::Str("two".into()), Node::List(vec![])] {
            let e = read(bad.clone()).unwrap_err().to_string();
            assert!(e.contains("fabric.devices"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn one_worker_per_device() {
        let alone = Placement::default();
        let cpu = |d: Devices, cuda| choose_all(Accelerator::Auto, &d, &alone, cuda);
        assert_eq!(cpu(Devices::Count(3), 0).unwrap(), vec![Device::Cpu; 3]);
        assert_eq!(cpu(Devices::All, 0).unwrap(), vec![Device::Cpu]);
        assert!(cpu(Devices::Indices(vec![0]), 0).unwrap_err().to_string().contains("on the CPU"));
        assert_eq!(cpu(Devices::Count(2), 4).unwrap(), vec![Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(cpu(Devices::All, 3).unwrap(), (0..3).map(Device::Cuda).collect::<Vec<_>>());
        assert_eq!(
            cpu(Devices::Indices(vec![2, 0]), 3).unwrap(),
            vec![Device::Cuda(2), Device::Cuda(0)]
        );
        let e = cpu(Devices::Count(4), 2).unwrap_err().to_string();
        assert!(e.contains("fabric.devices=4") && e.contains("sees 2"), "{e}");
        assert!(cpu(Devices::Indices(vec![5]), 2).is_err());
        let forced = choose_all(Accelerator::Cpu, &Devices::Count(2), &alone, 8).unwrap();
        assert_eq!(forced, vec![Device::Cpu; 2]);
        // Four Slurm tasks on the node: each takes its own GPU, whatever `devices` says.
        let placed =
            Placement { local_rank: Some(3), local_world_size: Some(4), ..Default::default() };
        let one = choose_all(Accelerator::Auto, &Devices::Count(4), &placed, 4).unwrap();
        assert_eq!(one, vec![Device::Cuda(3)]);
    }

    #[test]
    fn cpu_workers_share_the_threads() {
        assert_eq!(cpu_thread_shares(16, 2), [8, 8]);
        assert_eq!(cpu_thread_shares(5, 2), [3, 2]);
        assert_eq!(cpu_thread_shares(2, 4), [1, 1, 1, 1]);
        assert_eq!(cpu_thread_shares(8, 1), [8]);
    }
}
