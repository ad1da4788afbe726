#![no_main]

// The checks live in the main crate (ringlb::fuzzing) so that tests/fuzz_corpus.rs
// replays this target's corpus on stable with the same properties.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringlb::fuzzing::check_probe(data));
