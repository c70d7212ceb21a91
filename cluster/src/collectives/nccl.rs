//! All-reduce (sum of `f32`) and broadcast between GPUs with NCCL, through cudarc's raw bindings
//! (behind the `cuda` cargo feature).
//!
//! cudarc is built with `dynamic-loading`: it compiles without any CUDA installed and opens
//! `libcuda`, `libcudart` and `libnccl` on first use. Its loaders *panic* when a library is
//! missing, so every entry point here first checks [`libraries`] (cudarc's `is_culib_present`,
//! cached) and returns [`NcclError::LibraryMissing`] instead. A CPU-only node therefore gets a clean
//! error and falls back to the ring over QUIC ([`super::quic`]).
//!
//! # Use
//!
//! One process per GPU. Rank 0 creates an [`NcclUniqueId`] (this needs `libnccl` only, no GPU),
//! sends its bytes to every rank over the transport, and each rank calls [`NcclComm::init_rank`]
//! with its device, rank and the world size (a collective call: it returns once every rank has
//! joined). Gradients are summed in place on device memory owned by someone else (e.g.
//! `tch::Tensor::data_ptr()` of a contiguous CUDA `f32` tensor) with
//! [`NcclComm::all_reduce_sum_f32`], enqueued on the given stream (null: the legacy default stream,
//! the one libtorch uses unless told otherwise, so the reduction is ordered after the backward
//! pass). Synchronize the stream before reading the result on the host.
//!
//! # Finding libnccl
//!
//! cudarc looks for `libnccl.so`, `libnccl.so.<cuda major>` and a few other names, but not
//! `libnccl.so.2`, the only file the `nvidia-nccl-cu13` wheel ships. Link it under a folder on
//! `LD_LIBRARY_PATH` before the process starts (the dynamic loader reads that variable once):
//! `ln -sf $SITE/nvidia/nccl/lib/libnccl.so.2 $RUN/lib/libnccl.so`.
//!
//! Unlike the ring ([`super::ring`]), NCCL's reduction order depends on its algorithm and
//! topology, so results are reproducible for a fixed topology but not bit-identical to the ring.

use std::{
    ffi::{c_void, CStr},
    mem::MaybeUninit,
    sync::OnceLock,
};

use cudarc::{nccl::sys as nccl, runtime::sys as cudart};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// Size of an NCCL unique id, in bytes.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Errors of the NCCL collectives; each says what is missing or what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NcclError {
    /// A CUDA library could not be opened; nothing was called (cudarc would have panicked).
    #[error("{lib} is not available on this machine; {hint}")]
    LibraryMissing {
        /// Which library: `libcuda` (driver), `libcudart` or `libnccl`.
        lib: &'static str,
        /// What to do about it.
        hint: &'static str,
    },
    /// No CUDA device is visible (none installed, or `CUDA_VISIBLE_DEVICES` hides them all).
    #[error("no CUDA device is visible ({0}); use the ring over QUIC on this node")]
    NoDevice(String),
    /// The device index is not below the number of visible devices.
    #[error("CUDA device {device} does not exist: {count} visible")]
    InvalidDevice {
        /// The device asked for.
        device: usize,
        /// Visible devices.
        count: usize,
    },
    /// `rank` must be below `size`, and `size` must fit NCCL's `int`.
    #[error("invalid NCCL rank {rank} of world size {size}")]
    InvalidRank {
        /// The rank given.
        rank: usize,
        /// The world size given.
        size: usize,
    },
    /// A unique id received over the wire has the wrong length.
    #[error("an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, got {0}")]
    BadUniqueId(usize),
    /// A null device pointer was passed with a non-empty length.
    #[error("null device pointer for a buffer of {0} elements")]
    NullPointer(usize),
    /// A CUDA runtime call failed.
    #[error("CUDA call {call} failed: {code}")]
    Cuda {
        /// The CUDA function.
        call: &'static str,
        /// The error code, as cudarc names it.
        code: String,
    },
    /// An NCCL call failed; the communicator may be unusable (abort it and rebuild).
    #[error("NCCL call {call} failed: {code} ({message})")]
    Nccl {
        /// The NCCL function.
        call: &'static str,
        /// The result code, as cudarc names it.
        code: String,
        /// NCCL's description of the code.
        message: String,
    },
}

/// Which CUDA libraries this process can open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaLibraries {
    /// `libcuda` (the driver).
    pub driver: bool,
    /// `libcudart` (the runtime).
    pub runtime: bool,
    /// `libnccl`.
    pub nccl: bool,
}

/// Probes (once per process, then cached) which CUDA libraries can be opened, without panicking.
pub fn libraries() -> CudaLibraries {
    static LIBS: OnceLock<CudaLibraries> = OnceLock::new();
    *LIBS.get_or_init(|| {
        // SAFETY: these only try to dlopen the candidate names and drop the handles.
        let libs = unsafe {
            CudaLibraries {
                driver: cudarc::driver::sys::is_culib_present(),
                runtime: cudart::is_culib_present(),
                nccl: nccl::is_culib_present(),
            }
        };
        debug!(?libs, "CUDA libraries probed");
        libs
    })
}

const HINT_DRIVER: &str = "no NVIDIA driver (libcuda.so) was found: run on a GPU node";
const HINT_RUNTIME: &str = "put the CUDA runtime (e.g. the wheel's nvidia/cuda_runtime/lib) on \
                            LD_LIBRARY_PATH";
const HINT_NCCL: &str = "link the wheel's libnccl.so.2 as libnccl.so in a folder on \
                         LD_LIBRARY_PATH (cudarc does not look for libnccl.so.2)";

fn require_nccl() -> Result<(), NcclError> {
    if libraries().nccl {
        Ok(())
    } else {
        Err(NcclError::LibraryMissing { lib: "libnccl", hint: HINT_NCCL })
    }
}

/// Checks that everything a GPU collective needs can be opened: the driver, the CUDA runtime and
/// NCCL. Returns the first missing one as [`NcclError::LibraryMissing`].
pub fn check_available() -> Result<(), NcclError> {
    let libs = libraries();
    if !libs.driver {
        return Err(NcclError::LibraryMissing { lib: "libcuda", hint: HINT_DRIVER });
    }
    if !libs.runtime {
        return Err(NcclError::LibraryMissing { lib: "libcudart", hint: HINT_RUNTIME });
    }
    require_nccl()
}

fn cuda(call: &'static str, code: cudart::cudaError_t) -> Result<(), NcclError> {
    if code == cudart::cudaError_t::cudaSuccess {
        Ok(())
    } else {
        Err(NcclError::Cuda { call, code: format!("{code:?}") })
    }
}

fn check(call: &'static str, code: nccl::ncclResult_t) -> Result<(), NcclError> {
    if code == nccl::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: libnccl is loaded (every caller checked); the string is static in libnccl.
    let message = unsafe {
        let p = nccl::ncclGetErrorString(code);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(NcclError::Nccl { call, code: format!("{code:?}"), message })
}

/// The version of the libnccl that was loaded (e.g. 22907 for 2.29.7). Needs no GPU.
pub fn nccl_version() -> Result<i32, NcclError> {
    require_nccl()?;
    let mut version = 0;
    // SAFETY: libnccl is present; `version` is a valid out pointer.
    check("ncclGetVersion", unsafe { nccl::ncclGetVersion(&mut version) })?;
    Ok(version)
}

/// Number of visible CUDA devices.
pub fn device_count() -> Result<usize, NcclError> {
    check_available()?;
    let mut count = 0;
    // SAFETY: the runtime is present; `count` is a valid out pointer.
    let code = unsafe { cudart::cudaGetDeviceCount(&mut count) };
    if code != cudart::cudaError_t::cudaSuccess {
        return Err(NcclError::NoDevice(format!("cudaGetDeviceCount: {code:?}")));
    }
    if count <= 0 {
        return Err(NcclError::NoDevice("cudaGetDeviceCount returned 0".into()));
    }
    Ok(count as usize)
}

/// The id that ties the ranks of one communicator together: made by one rank, sent to all.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NcclUniqueId(Vec<u8>);

impl std::fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclUniqueId({} bytes)", self.0.len())
    }
}

impl NcclUniqueId {
    /// A fresh id from `ncclGetUniqueId` (needs libnccl, no GPU).
    pub fn new() -> Result<Self, NcclError> {
        require_nccl()?;
        let mut id = MaybeUninit::<nccl::ncclUniqueId>::uninit();
        // SAFETY: libnccl is present; NCCL fills the whole struct on success.
        check("ncclGetUniqueId", unsafe { nccl::ncclGetUniqueId(id.as_mut_ptr()) })?;
        // SAFETY: initialized by the successful call above.
        let id = unsafe { id.assume_init() };
        Ok(Self(id.internal.iter().map(|&c| c as u8).collect()))
    }

    /// An id from bytes received over the wire; fails unless it has [`NCCL_UNIQUE_ID_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, NcclError> {
        if bytes.len() != NCCL_UNIQUE_ID_BYTES {
            return Err(NcclError::BadUniqueId(bytes.len()));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// The id's bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn raw(&self) -> Result<nccl::ncclUniqueId, NcclError> {
        if self.0.len() != NCCL_UNIQUE_ID_BYTES {
            return Err(NcclError::BadUniqueId(self.0.len()));
        }
        let mut internal = [0 as std::ffi::c_char; NCCL_UNIQUE_ID_BYTES];
        for (d, &s) in internal.iter_mut().zip(&self.0) {
            *d = s as std::ffi::c_char;
        }
        Ok(nccl::ncclUniqueId { internal })
    }
}

/// One rank's NCCL communicator, bound to one CUDA device. Destroyed when dropped.
#[derive(Debug)]
pub struct NcclComm {
    comm: nccl::ncclComm_t,
    rank: usize,
    size: usize,
    device: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `&self` calls
// only enqueue work, and `NcclComm` is not `Sync`, so calls cannot overlap.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Makes `device` current and joins communicator `id` as `rank` of `size`. Blocks until
    /// every rank has called it (run it on a blocking thread in async code).
    pub fn init_rank(
        device: usize,
        rank: usize,
        size: usize,
        id: &NcclUniqueId,
    ) -> Result<Self, NcclError> {
        if rank >= size || i32::try_from(size).is_err() {
            return Err(NcclError::InvalidRank { rank, size });
        }
        let raw = id.raw()?;
        let count = device_count()?;
        if device >= count {
            return Err(NcclError::InvalidDevice { device, count });
        }
        // SAFETY: the runtime is present and `device` is a valid ordinal.
        cuda("cudaSetDevice", unsafe { cudart::cudaSetDevice(device as i32) })?;
        let mut comm = MaybeUninit::<nccl::ncclComm_t>::uninit();
        // SAFETY: libnccl is present; `comm` is a valid out pointer; rank < size fit an int.
        check("ncclCommInitRank", unsafe {
            nccl::ncclCommInitRank(comm.as_mut_ptr(), size as i32, raw, rank as i32)
        })?;
        // SAFETY: initialized by the successful call above.
        let comm = unsafe { comm.assume_init() };
        debug!(rank, size, device, "NCCL communicator ready");
        Ok(Self { comm, rank, size, device })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The world size.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The CUDA device the communicator is bound to.
    pub fn device(&self) -> usize {
        self.device
    }

    /// Enqueues an in-place sum of `len` `f32`s at device address `buf` over all ranks, on
    /// `stream` (null: the legacy default stream). Every rank must call it with the same `len`.
    ///
    /// # Safety
    /// `buf` must point to at least `len` `f32`s of device memory on this communicator's device
    /// that stay allocated until the stream has run the reduction, and `stream` must be null or a
    /// live stream of that device.
    pub unsafe fn all_reduce_sum_f32(
        &self,
        buf: *mut f32,
        len: usize,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        if len == 0 {
            return Ok(());
        }
        if buf.is_null() {
            return Err(NcclError::NullPointer(len));
        }
        let p = buf.cast::<c_void>();
        check(
            "ncclAllReduce",
            nccl::ncclAllReduce(
                p,
                p,
                len,
                nccl::ncclDataType_t::ncclFloat32,
                nccl::ncclRedOp_t::ncclSum,
                self.comm,
                stream as nccl::cudaStream_t,
            ),
        )
    }

    /// Enqueues an in-place copy of `root`'s `len` `f32`s at `buf` to every rank, on `stream`.
    ///
    /// # Safety
    /// As for [`NcclComm::all_reduce_sum_f32`].
    pub unsafe fn broadcast_f32(
        &self,
        root: usize,
        buf: *mut f32,
        len: usize,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        if root >= self.size {
            return Err(NcclError::InvalidRank { rank: root, size: self.size });
        }
        if len == 0 {
            return Ok(());
        }
        if buf.is_null() {
            return Err(NcclError::NullPointer(len));
        }
        let p = buf.cast::<c_void>();
        check(
            "ncclBroadcast",
            nccl::ncclBroadcast(
                p,
                p,
                len,
                nccl::ncclDataType_t::ncclFloat32,
                root as i32,
                self.comm,
                stream as nccl::cudaStream_t,
            ),
        )
    }

    /// Waits until all work on this communicator's device has finished (e.g. before reading a
    /// reduced buffer on the host).
    pub fn synchronize(&self) -> Result<(), NcclError> {
        // SAFETY: the runtime is present (the communicator exists) and the device is valid.
        unsafe {
            cuda("cudaSetDevice", cudart::cudaSetDevice(self.device as i32))?;
            cuda("cudaDeviceSynchronize", cudart::cudaDeviceSynchronize())
        }
    }

    /// Aborts the communicator at once (pending operations are cancelled): use it when a peer is
    /// lost, then rebuild with the surviving ranks.
    pub fn abort(mut self) -> Result<(), NcclError> {
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        // SAFETY: `comm` came from ncclCommInitRank and is released exactly once.
        check("ncclCommAbort", unsafe { nccl::ncclCommAbort(comm) })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // SAFETY: `comm` came from ncclCommInitRank and is released exactly once.
        if let Err(e) = check("ncclCommDestroy", unsafe { nccl::ncclCommDestroy(self.comm) }) {
            warn!(error = %e, "destroying the NCCL communicator failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_bytes_are_length_checked() {
        assert_eq!(NcclUniqueId::from_bytes(&[0; 5]), Err(NcclError::BadUniqueId(5)));
        let id = NcclUniqueId::from_bytes(&[7; NCCL_UNIQUE_ID_BYTES]).unwrap();
        assert_eq!(id.as_bytes(), &[7; NCCL_UNIQUE_ID_BYTES][..]);
        assert_eq!(id.raw().unwrap().internal[127], 7);
    }

    /// Without CUDA (as on CI), every entry point returns a clear error instead of panicking;
    /// with CUDA and NCCL, a one-rank communicator sums in place (checked on GPU nodes only).
    #[test]
    fn missing_cuda_is_an_error_not_a_panic() {
        let libs = libraries();
        if check_available().is_ok() {
            eprintln!("CUDA and NCCL present: {libs:?}");
            return;
        }
        let err = check_available().unwrap_err();
        assert!(matches!(err, NcclError::LibraryMissing { .. }), "{err}");
        assert!(err.to_string().contains("not available"), "{err}");
        assert!(device_count().is_err());
        let id = NcclUniqueId::from_bytes(&[0; NCCL_UNIQUE_ID_BYTES]).unwrap();
        let err = NcclComm::init_rank(0, 0, 1, &id).unwrap_err();
        assert!(matches!(err, NcclError::LibraryMissing { .. } | NcclError::NoDevice(_)), "{err}");
        if !libs.nccl {
            assert!(matches!(NcclUniqueId::new(), Err(NcclError::LibraryMissing { .. })));
            assert!(matches!(
                nccl_version(),
                Err(NcclError::LibraryMissing { lib: "libnccl", .. })
            ));
        }
        assert!(matches!(
            NcclComm::init_rank(0, 2, 2, &id),
            Err(NcclError::InvalidRank { rank: 2, size: 2 })
        ));
    }
}
