#![no_main]
//! Fuzz target `token`: see `checks::token` for what is checked.

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::token(data, checks::Depth::Fuzz));
