//! The project's client-go program (`clients/go-protobuf`), built with `go build` on
//! first use: the tests and benchmarks drive krate with it as Go controllers do, over
//! protobuf.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Builds the client once per process and returns its path.
pub fn path() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../clients/go-protobuf");
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("krate-go-client");
            let status = Command::new("go")
                .args(["build", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(&source)
                .env("CGO_ENABLED", "0")
                .status()
                .expect("run `go build` for clients/go-protobuf (is Go installed?)");
            assert!(status.success(), "building clients/go-protobuf failed");
            out
        })
        .clone()
}
