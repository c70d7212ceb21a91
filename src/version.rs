//! The version of this build's numbers, which sweep cell keys, cached zero-shot heads and
//! `<report>.meta.json` carry.

/// The version of the numbers this build computes. Bump it, on purpose and in the same commit,
/// whenever a change could change any result of any method (a kernel's summation order, a
/// preprocessing step, a default): finished sweep cells are then computed again instead of being
/// served from an older build. Changes that cannot alter results (logging, speed with the same
/// bits, new methods) leave it alone, so their finished cells stay valid.
pub const NUMERICS_VERSION: u32 = 1;

/// The program's version as it enters cell keys: `<crate version>+numerics.<NUMERICS_VERSION>`.
pub fn code_version() -> String {
    format!("{}+numerics.{NUMERICS_VERSION}", env!("CARGO_PKG_VERSION"))
}
