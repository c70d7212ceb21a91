//! Helpers of the streaming merge kernels: run-time choice of the vector unit, and software
//! prefetch for inputs read from mapped files.

/// Defines a kernel once and compiles it three times: for AVX-512, for AVX2 and for the build's
/// baseline; each call runs the widest version this CPU has (checked at run time, cached by the
/// standard library). The kernels work element by element (no reassociated reductions), so
/// every version gives the same bits.
///
/// ```ignore
/// widest_simd! {
///     /// Docs of the kernel.
///     fn kernel(a: &[f32], out: &mut [f32]) -> bool { /* plain loops that vectorise */ }
/// }
/// ```
macro_rules! widest_simd {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) -> $ret $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,bmi2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,bmi2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    generic($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("bmi2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use widest_simd;

/// How far ahead (in elements) the streaming loops ask for the cache line they will read: the
/// inputs are mapped files in 4 KiB pages, where the hardware prefetcher stops at each page end.
pub(crate) const PREFETCH_AHEAD: usize = 1024;

/// Hints the CPU to fetch `values[i]`'s cache line (nothing when `i` is out of range).
#[inline(always)]
pub(crate) fn prefetch(values: &[f32], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = values.get(i) {
        // SAFETY: a prefetch never faults; the address is inside `values`.
        unsafe {
            std::arch::x86_64::_mm_prefetch(
                (x as *const f32).cast::<i8>(),
                std::arch::x86_64::_MM_HINT_T0,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, i);
}
