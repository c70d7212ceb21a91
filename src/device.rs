//! Device choice: FusionBench's `fabric.accelerator` / `fabric.devices`, and which GPU this process
//! binds (`SLURM_LOCALID`, `LOCAL_RANK`, `CUDA_VISIBLE_DEVICES`; see
//! [`fusion_cluster::placement`]). CPU when no GPU is present and none was demanded.

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

/// [`choose`] with this process's environment and libtorch's device count.
pub fn select(accelerator: Accelerator) -> Result<Device, DeviceError> {
    let count =
        if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
    let device = choose(accelerator, &Placement::from_env(), count)?;
    tracing::info!(?device, cuda_devices = count, "device selected");
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerator_and_placement_decide() {
        let rank2 = Placement { local_rank: Some(2), visible_devices: None };
        assert_eq!(choose(Accelerator::Auto, &rank2, 0).unwrap(), Device::Cpu);
        assert_eq!(choose(Accelerator::Auto, &rank2, 4).unwrap(), Device::Cuda(2));
        assert_eq!(choose(Accelerator::Cpu, &rank2, 4).unwrap(), Device::Cpu);
        assert!(choose(Accelerator::Cuda, &rank2, 0).is_err());
        assert_eq!("GPU".parse::<Accelerator>().unwrap(), Accelerator::Cuda);
        assert!("tpu".parse::<Accelerator>().is_err());
    }
}
