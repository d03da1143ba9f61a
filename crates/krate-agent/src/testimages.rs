//! krate's test images, built on this machine: `busybox` (Debian's busybox-static with a
//! link per applet) and `test-server` (the same plus krate's test server, see
//! `testdata/test_server.rs`). `krate test-images --registry` pushes them to a registry,
//! as a user's CI would, so that nodes pull them like any other image.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::oci::{Entry, Image, RunConfig};

const TEST_SERVER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-server"));
const BUSYBOX: &str = "/bin/busybox";

/// Whether the ELF file has no program interpreter (is statically linked).
fn is_static_elf(bytes: &[u8]) -> bool {
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else { return false };
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| u32_at(phoff + i * phentsize) != Some(PT_INTERP))
}

fn busybox_entries(busybox: &Path) -> Result<Vec<Entry>> {
    let data = std::fs::read(busybox)
        .with_context(|| format!("reading {} (apt-get install -y busybox-static)", busybox.display()))?;
    if !is_static_elf(&data) {
        bail!(
            "{} is linked dynamically and would not run in an image; apt-get install -y busybox-static",
            busybox.display()
        );
    }
    let list = std::process::Command::new(busybox).arg("--list").output().context("listing busybox's applets")?;
    let mut entries = vec![
        Entry::Dir { path: "bin".into() },
        Entry::Dir { path: "tmp".into() },
        Entry::Dir { path: "etc".into() },
        Entry::Dir { path: "root".into() },
    ];
    entries.push(Entry::File { path: "bin/busybox".into(), data, mode: 0o755 });
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        entries.push(Entry::Symlink { path: format!("bin/{applet}"), target: "busybox".into() });
    }
    entries.push(Entry::File {
        path: "etc/passwd".into(),
        data: b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n".to_vec(),
        mode: 0o644,
    });
    entries.push(Entry::File {
        path: "etc/group".into(),
        data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        mode: 0o644,
    });
    Ok(entries)
}

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn busybox() -> Result<Image> {
    busybox_with(Vec::new())
}

/// The busybox image with `extra` files (e.g. filler that makes an image big).
pub fn busybox_with(extra: Vec<Entry>) -> Result<Image> {
    let mut entries = busybox_entries(Path::new(BUSYBOX))?;
    entries.extend(extra);
    Image::build(&entries, &RunConfig { cmd: vec!["sh".into()], env: vec![PATH_ENV.into()], ..Default::default() })
}

/// The test server program itself (static), for benchmarks that run it outside images.
pub fn test_server_program() -> &'static [u8] {
    TEST_SERVER
}

pub fn test_server() -> Result<Image> {
    let mut entries = busybox_entries(Path::new(BUSYBOX))?;
    entries.push(Entry::File { path: "test-server".into(), data: TEST_SERVER.to_vec(), mode: 0o755 });
    Image::build(
        &entries,
        &RunConfig { entrypoint: vec!["/test-server".into()], env: vec![PATH_ENV.into()], ..Default::default() },
    )
}

/// Builds both images and pushes them to `registry` (plain HTTP) as `busybox` and
/// `test-server`, tagged `1` and `latest`.
pub fn push_all(registry: &str) -> Result<()> {
    for (name, image) in [("busybox", busybox()?), ("test-server", test_server()?)] {
        for tag in ["1", "latest"] {
            image.push(registry, name, tag).with_context(|| format!("pushing {name}:{tag} to {registry}"))?;
        }
    }
    Ok(())
}

/// Writes both images as archives `busybox.tar` and `test-server.tar` into `dir`, named
/// `krate.local/busybox:1` and `krate.local/test-server:1` (for `--airgap-images`).
pub fn write_archives(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut names = Vec::new();
    for (file, image) in [("busybox", busybox()?), ("test-server", test_server()?)] {
        let name = format!("krate.local/{file}:1");
        let path = dir.join(format!("{file}.tar"));
        let out = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        image.write_archive(std::io::BufWriter::new(out), &name)?;
        names.push(name);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_embedded_test_server_is_static() {
        assert!(super::is_static_elf(super::TEST_SERVER));
        assert!(!super::is_static_elf(b"#!/bin/sh\n"));
    }
}
