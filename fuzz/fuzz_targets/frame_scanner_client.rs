#![no_main]
//! Fuzz target `frame_scanner_client`: see `checks::frame_scanner_client` for what is checked.

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::frame_scanner_client(data, checks::Depth::Fuzz));
