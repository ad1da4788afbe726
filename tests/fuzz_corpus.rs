//! Replays the fuzz corpora in `fuzz/corpus/<target>/` through the same checks the
//! cargo-fuzz targets run (`ringlb::fuzzing`), so a regression on any input the fuzzer
//! once found interesting fails `cargo test` on stable without the fuzzer.
//! To fuzz further: `cd fuzz && cargo +nightly fuzz run <target>` (see tests/README.md).

use std::path::PathBuf;

use ringlb::fuzzing;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no inputs", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs failed:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn config() {
    replay("config", fuzzing::check_config);
}

#[test]
fn prefix_file() {
    replay("prefix_file", fuzzing::check_prefix_file);
}

#[test]
fn control_request() {
    replay("control_request", fuzzing::check_control_request);
}

#[test]
fn proxy_header() {
    replay("proxy_header", fuzzing::check_proxy_header);
}

#[test]
fn region_map() {
    replay("region_map", fuzzing::check_region_map);
}

#[test]
fn proxy_accept() {
    replay("proxy_accept", fuzzing::check_proxy_accept);
}

#[test]
fn client_hello() {
    replay("client_hello", fuzzing::check_client_hello);
}

#[test]
fn probe() {
    replay("probe", fuzzing::check_probe);
}
