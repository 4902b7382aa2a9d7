#![no_main]
//! Fuzz target `request_head`: see `checks::request_head` for what is checked.

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::request_head(data, checks::Depth::Fuzz));
