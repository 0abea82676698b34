#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distr_agent_fuzz_targets::policy(data));
