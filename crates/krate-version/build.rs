//! Embeds where this build came from, as upstream's `hack/lib/version.sh` does with
//! ldflags: `git describe` of the tree (with `-dirty` when it has changes), the full
//! commit, the tree state and a reproducible build date (`SOURCE_DATE_EPOCH`, else the
//! commit's date). A build outside git (a tarball) sets none of them and reports the
//! version in the source (`SOURCE_VERSION` in `src/lib.rs`).

use std::path::Path;
use std::process::Command;

fn main() {
    // Read when the script runs, not baked in when it is compiled: a shared target
    // directory reuses this script's binary across checkouts (cargo hashes workspace
    // members by relative path), and a baked-in path may name a clone that is gone.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest_dir).join("../..");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // A commit, a tag or a change to the tree changes the version; the tree's sources
    // are watched so that an edit flips the state to dirty.
    for watched in [".git/HEAD", ".git/index", ".git/refs", ".git/packed-refs", "crates", "scripts", "Cargo.lock"] {
        if root.join(watched).exists() {
            println!("cargo:rerun-if-changed={}", root.join(watched).display());
        }
    }
    let git = |args: &[&str]| {
        let out = Command::new("git").arg("-C").arg(&root).args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success()).then_some(text)
    };
    let date = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse::<i64>().ok());
    let Some(commit) = git(&["rev-parse", "HEAD"]) else {
        if let Some(epoch) = date {
            println!("cargo:rustc-env=KRATE_BUILD_DATE={}", rfc3339(epoch));
        }
        return;
    };
    let dirty = git(&["status", "--porcelain"]).is_none_or(|status| !status.is_empty());
    let suffix = if dirty { "-dirty" } else { "" };
    // Upstream's form: the nearest `v*` tag, commits since, `g` and 14 hex digits.
    // A repository without a release tag yet: the source's version and the commit.
    let described = git(&["describe", "--tags", "--match", "v*", "--abbrev=14", "HEAD"]).unwrap_or_else(|| {
        let source = std::fs::read_to_string(Path::new(&manifest_dir).join("src/lib.rs")).unwrap_or_default();
        let version = source
            .lines()
            .find_map(|l| l.strip_prefix("pub const SOURCE_VERSION: &str = \""))
            .and_then(|l| l.strip_suffix("\";"))
            .unwrap_or("v0.0-dev")
            .to_string();
        format!("{version}-g{}", &commit[..14.min(commit.len())])
    });
    println!("cargo:rustc-env=KRATE_GIT_VERSION={described}{suffix}");
    println!("cargo:rustc-env=KRATE_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=KRATE_GIT_TREE_STATE={}", if dirty { "dirty" } else { "clean" });
    let committed = git(&["log", "-1", "--format=%ct", "HEAD"]).and_then(|s| s.parse::<i64>().ok());
    if let Some(epoch) = date.or(committed) {
        println!("cargo:rustc-env=KRATE_BUILD_DATE={}", rfc3339(epoch));
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (Howard Hinnant's civil_from_days).
fn rfc3339(epoch: i64) -> String {
    let (days, secs) = (epoch.div_euclid(86_400), epoch.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}
