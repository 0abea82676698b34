//! Replays every committed fuzz corpus and crash file (`fuzz/corpus/<target>/`,
//! `fuzz/artifacts/<target>/`) through the same functions the fuzzers call, on stable Rust.

use std::path::Path;

#[test]
fn every_committed_input_passes_its_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for (name, target) in distr_agent_fuzz_targets::TARGETS {
        let mut inputs = 0;
        for kind in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(name)) else {
                continue;
            };
            for entry in entries.flatten() {
                let data = std::fs::read(entry.path()).expect("readable input");
                target(&data);
                inputs += 1;
            }
        }
        assert!(inputs > 0, "no seed corpus for {name}");
        replayed += inputs;
    }
    eprintln!("replayed {replayed} inputs");
}
