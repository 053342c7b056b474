//! Executables as a broker might ship them, malformed included: finding markers, USDT
//! notes and framework functions (what attach and inspect read) in any bytes must give
//! an answer or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|executable: &[u8]| {
    let _ = probe_userspace::inspect::inspect(executable).map(|found| found.to_string());
});
