//! Which GPU a process binds, from the launcher's environment.
//!
//! One process per GPU: under Slurm the node-local rank is `SLURM_LOCALID`; by hand,
//! `LOCAL_RANK` (torchrun's name) is honoured too. `CUDA_VISIBLE_DEVICES` is applied by the CUDA
//! runtime itself, so the index returned here is an index into the *visible* devices.

/// The launcher-provided facts that decide placement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Node-local rank of this process, if a launcher gave one.
    pub local_rank: Option<usize>,
    /// The devices `CUDA_VISIBLE_DEVICES` lists (`None` when unset; empty when set to "").
    pub visible_devices: Option<Vec<String>>,
    /// How many processes the launcher started on this node, if it says: `LOCAL_WORLD_SIZE`
    /// (torchrun), `SLURM_NTASKS_PER_NODE`, or the first count of `SLURM_STEP_TASKS_PER_NODE` /
    /// `SLURM_TASKS_PER_NODE` (`4(x2)` → 4).
    pub local_world_size: Option<usize>,
}

impl Placement {
    /// Reads `SLURM_LOCALID` (then `LOCAL_RANK`) and `CUDA_VISIBLE_DEVICES` through `get`.
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Self {
        let local_rank = ["SLURM_LOCALID", "LOCAL_RANK"]
            .iter()
            .find_map(|k| get(k).and_then(|v| v.trim().parse().ok()));
        let visible_devices = get("CUDA_VISIBLE_DEVICES").map(|v| {
            v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
        });
        let local_world_size = [
            "LOCAL_WORLD_SIZE",
            "SLURM_NTASKS_PER_NODE",
            "SLURM_STEP_TASKS_PER_NODE",
            "SLURM_TASKS_PER_NODE",
        ]
        .iter()
        .find_map(|k| {
            let v = get(k)?;
            let digits: String = v.trim().chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        });
        Self { local_rank, visible_devices, local_world_size }
    }

    /// [`Placement::from_env_with`] over the process environment.
    pub fn from_env() -> Self {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// The CUDA ordinal to bind, given how many devices the runtime reports: the local rank
    /// modulo that count (0 without a rank); `None` when there is no device.
    pub fn gpu_index(&self, device_count: usize) -> Option<usize> {
        if device_count == 0 || self.visible_devices.as_ref().is_some_and(Vec::is_empty) {
            return None;
        }
        Some(self.local_rank.unwrap_or(0) % device_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn slurm_local_rank_picks_the_gpu() {
        let p = Placement::from_env_with(env(&[("SLURM_LOCALID", "3"), ("LOCAL_RANK", "1")]));
        assert_eq!(p.local_rank, Some(3));
        assert_eq!(p.gpu_index(4), Some(3));
        assert_eq!(p.gpu_index(2), Some(1));
        assert_eq!(p.gpu_index(0), None);
    }

    #[test]
    fn visible_devices_and_defaults() {
        let p = Placement::from_env_with(env(&[("CUDA_VISIBLE_DEVICES", "2,5")]));
        assert_eq!(p.visible_devices, Some(vec!["2".to_string(), "5".to_string()]));
        assert_eq!(p.gpu_index(2), Some(0));
        let none = Placement::from_env_with(env(&[("CUDA_VISIBLE_DEVICES", "")]));
        assert_eq!(none.gpu_index(8), None);
        let torchrun = Placement::from_env_with(env(&[("LOCAL_RANK", "1")]));
        assert_eq!(torchrun.gpu_index(8), Some(1));
        assert_eq!(torchrun.local_world_size, None);
        let tr = Placement::from_env_with(env(&[("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "4")]));
        assert_eq!(tr.local_world_size, Some(4));
        let slurm = Placement::from_env_with(env(&[("SLURM_STEP_TASKS_PER_NODE", "4(x2),3")]));
        assert_eq!(slurm.local_world_size, Some(4));
    }
}
