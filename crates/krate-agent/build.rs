//! Builds two small static programs that krate embeds: the sandbox ("pause") program of
//! every pod (`pause/pause.rs`) and the test server of krate's test images
//! (`testdata/test_server.rs`). Static (glibc's libc.a, from libc6-dev) so that they run
//! in images that hold nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

fn build(source: &str, out: &Path) {
    println!("cargo:rerun-if-changed={source}");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "-O",
            "-C",
            "panic=abort",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
            "--edition",
            "2021",
            source,
            "-o",
        ])
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("running rustc for {source}: {e}"));
    assert!(status.success(), "building {source} failed (a static glibc, libc6-dev, is needed)");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    build("pause/pause.rs", &out.join("pause"));
    build("testdata/test_server.rs", &out.join("test-server"));
}
