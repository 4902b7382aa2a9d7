#![no_main]
//! Fuzz target `route`: see `checks::route_target` for what is checked.

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::route_target(data, checks::Depth::Fuzz));
