#![no_main]
//! Fuzz target `upstream_response`: see `checks::upstream_response` for what is checked.

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::upstream_response(data, checks::Depth::Fuzz));
