//! NCCL check for a GPU machine (run by `scripts/gpu-check.sh`; not a test: CI has no GPU).
//!
//! Exercises `collectives::nccl` end to end on real devices and prints what it measured:
//! 1. library probe, NCCL version, visible devices; error paths (bad device, bad rank, bad id);
//! 2. a world-size-1 communicator: in-place all-reduce and broadcast of device buffers, read back
//!    and compared with the input bit for bit, then latency for 12 KiB and 4 MiB;
//! 3. a world of `min(devices, 8)` ranks, one child process per GPU, the unique id sent as hex on
//!    the command line (as the coordinator sends it over QUIC): every rank fills its buffer with
//!    `rank + i * 2^-10`, and the reduced buffer must equal the exactly representable sum; where
//!    only one GPU is visible it tries two ranks on that GPU and reports NCCL's answer;
//! 4. abort of a live communicator.
//!
//! Build: `cargo build --release -p fusion_cluster --features cuda --example nccl_check`.

use std::{ffi::c_void, process::Command, time::Instant};

use cudarc::runtime::sys as cudart;
use fusion_cluster::collectives::nccl::{self, NcclComm, NcclError, NcclUniqueId};

fn cuda(call: &str, code: cudart::cudaError_t) -> Result<(), String> {
    if code == cudart::cudaError_t::cudaSuccess {
        Ok(())
    } else {
        Err(format!("{call}: {code:?}"))
    }
}

/// A device buffer of `len` f32s on the current device.
struct DeviceBuf {
    ptr: *mut c_void,
    len: usize,
}

impl DeviceBuf {
    fn new(len: usize) -> Result<Self, String> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: valid out pointer; the runtime was found by the library probe.
        cuda("cudaMalloc", unsafe { cudart::cudaMalloc(&mut ptr, len * 4) })?;
        Ok(Self { ptr, len })
    }

    fn upload(&self, host: &[f32]) -> Result<(), String> {
        assert_eq!(host.len(), self.len);
        // SAFETY: both regions hold `len` f32s.
        cuda("cudaMemcpy H2D", unsafe {
            cudart::cudaMemcpy(
                self.ptr,
                host.as_ptr().cast(),
                self.len * 4,
                cudart::cudaMemcpyKind::cudaMemcpyHostToDevice,
            )
        })
    }

    fn download(&self) -> Result<Vec<f32>, String> {
        let mut host = vec![0f32; self.len];
        // SAFETY: both regions hold `len` f32s; cudaMemcpy synchronizes with the default stream.
        cuda("cudaMemcpy D2H", unsafe {
            cudart::cudaMemcpy(
                host.as_mut_ptr().cast(),
                self.ptr,
                self.len * 4,
                cudart::cudaMemcpyKind::cudaMemcpyDeviceToHost,
            )
        })?;
        Ok(host)
    }

    fn f32_ptr(&self) -> *mut f32 {
        self.ptr.cast()
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by cudaMalloc, freed once.
        unsafe { cudart::cudaFree(self.ptr) };
    }
}

fn pattern(rank: usize, len: usize) -> Vec<f32> {
    // Multiples of 2^-10 below 2^10: sums of up to 8 ranks are exact in f32 whatever the order.
    (0..len).map(|i| rank as f32 + (i % 1024) as f32 / 1024.0).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0)).collect()
}

/// One rank of a multi-process world: `--rank R --size N --device D --id HEX`.
fn child(rank: usize, size: usize, device: usize, id_hex: &str) -> Result<(), String> {
    let id = NcclUniqueId::from_bytes(&unhex(id_hex)).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let comm = NcclComm::init_rank(device, rank, size, &id).map_err(|e| e.to_string())?;
    let init = t0.elapsed();
    let len = 1 << 20;
    let buf = DeviceBuf::new(len)?;
    buf.upload(&pattern(rank, len))?;
    // SAFETY: `buf` holds `len` f32s on the communicator's device and outlives the sync below.
    unsafe { comm.all_reduce_sum_f32(buf.f32_ptr(), len, std::ptr::null_mut()) }
        .map_err(|e| e.to_string())?;
    comm.synchronize().map_err(|e| e.to_string())?;
    let got = buf.download()?;
    let want: Vec<f32> = (0..len)
        .map(|i| {
            (0..size).map(|r| r as f32).sum::<f32>() + size as f32 * (i % 1024) as f32 / 1024.0
        })
        .collect();
    let bad = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let lat = latency(&comm, &[3 * 1024, 1 << 20])?;
    println!(
        "rank {rank}/{size} on GPU {device}: init {:.0} ms, all-reduce 4 MiB exact: {} ({bad} \
         mismatches); latency 12 KiB {:.3} ms, 4 MiB {:.3} ms",
        init.as_secs_f64() * 1e3,
        if bad == 0 { "PASS" } else { "FAIL" },
        lat[0],
        lat[1]
    );
    if bad != 0 {
        return Err("all-reduce result differs".into());
    }
    Ok(())
}

/// Median milliseconds of one in-place all-reduce for each length (f32 elements).
fn latency(comm: &NcclComm, lens: &[usize]) -> Result<Vec<f64>, String> {
    let mut out = Vec::new();
    for &len in lens {
        let buf = DeviceBuf::new(len)?;
        buf.upload(&vec![1.0; len])?;
        let mut times = Vec::new();
        for i in 0..60 {
            let t = Instant::now();
            // SAFETY: as in `child`.
            unsafe { comm.all_reduce_sum_f32(buf.f32_ptr(), len, std::ptr::null_mut()) }
                .map_err(|e| e.to_string())?;
            comm.synchronize().map_err(|e| e.to_string())?;
            if i >= 10 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        out.push(times[times.len() / 2]);
    }
    Ok(out)
}

fn spawn_world(size: usize, devices: &[usize]) -> Result<bool, String> {
    let id = NcclUniqueId::new().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let children: Vec<_> = (0..size)
        .map(|r| {
            Command::new(&exe)
                .args(["--rank", &r.to_string(), "--size", &size.to_string()])
                .args(["--device", &devices[r].to_string(), "--id", &hex(id.as_bytes())])
                .spawn()
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let mut ok = true;
    for mut c in children {
        ok &= c.wait().map_err(|e| e.to_string())?.success();
    }
    Ok(ok)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--rank") {
        let get =
            |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
        let num = |flag: &str| get(flag).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        let rank = args.get(pos + 1).and_then(|v| v.parse().ok()).unwrap_or(0);
        let result = child(rank, num("--size"), num("--device"), &get("--id").unwrap_or_default());
        if let Err(e) = result {
            println!("rank {rank}: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run() {
        println!("FAIL: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let libs = nccl::libraries();
    println!("libraries: {libs:?}");
    if let Err(e) = nccl::check_available() {
        println!("{e}");
        return Err("CUDA libraries missing".into());
    }
    println!("NCCL version: {}", nccl::nccl_version().map_err(|e| e.to_string())?);
    let count = nccl::device_count().map_err(|e| e.to_string())?;
    println!("visible devices: {count}");

    // Error paths return errors, not panics.
    let id = NcclUniqueId::new().map_err(|e| e.to_string())?;
    let bad_device = NcclComm::init_rank(count, 0, 1, &id);
    println!("device {count} of {count}: {:?}", bad_device.as_ref().map(|_| ()));
    assert!(matches!(bad_device, Err(NcclError::InvalidDevice { .. })));
    assert!(matches!(NcclComm::init_rank(0, 1, 1, &id), Err(NcclError::InvalidRank { .. })));
    assert!(matches!(NcclUniqueId::from_bytes(&[1, 2]), Err(NcclError::BadUniqueId(2))));
    println!("error paths: PASS");

    // World of one: all-reduce and broadcast are identities, bit for bit.
    let t0 = Instant::now();
    let comm = NcclComm::init_rank(0, 0, 1, &id).map_err(|e| e.to_string())?;
    println!("world 1 init: {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
    let len = 1 << 20;
    let host = pattern(3, len);
    let buf = DeviceBuf::new(len)?;
    buf.upload(&host)?;
    // SAFETY: `buf` holds `len` f32s on device 0 and lives until after the synchronize.
    unsafe {
        comm.all_reduce_sum_f32(buf.f32_ptr(), len, std::ptr::null_mut())
            .map_err(|e| e.to_string())?;
        comm.broadcast_f32(0, buf.f32_ptr(), len, std::ptr::null_mut())
            .map_err(|e| e.to_string())?;
    }
    comm.synchronize().map_err(|e| e.to_string())?;
    let same = buf.download()? == host;
    println!("world 1 all-reduce + broadcast identity: {}", if same { "PASS" } else { "FAIL" });
    let lat = latency(&comm, &[3 * 1024, 1 << 20])?;
    println!("world 1 latency: 12 KiB {:.3} ms, 4 MiB {:.3} ms", lat[0], lat[1]);
    drop(buf);
    comm.abort().map_err(|e| e.to_string())?;
    println!("abort: PASS");
    if !same {
        return Err("world-1 identity failed".into());
    }

    // Several processes.
    if count >= 2 {
        let size = count.min(8);
        let devices: Vec<usize> = (0..size).collect();
        let ok = spawn_world(size, &devices)?;
        println!("world {size}, one process per GPU: {}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            return Err("multi-GPU all-reduce failed".into());
        }
    } else {
        // NCCL normally refuses two ranks on one device; report what this version says.
        let ok = spawn_world(2, &[0, 0])?;
        println!(
            "world 2 on one GPU (two processes): {}",
            if ok { "works" } else { "refused by NCCL (expected: one rank per GPU)" }
        );
    }
    Ok(())
}
